"""Backend selection: context manager, environment variable, per-op scope, clear errors."""

import subprocess
import sys

import pytest
import torch

import forgetkern
from forgetkern import _backend


def test_auto_picks_an_available_backend_on_cpu():
    chosen = _backend.resolve("ewc_fused", torch.device("cpu"))
    assert chosen in ("cpp", "torch")
    assert _backend.availability("cpu")[chosen] is None


def test_use_backend_nests_and_restores():
    assert _backend.requested("ewc_fused") == "auto"
    with forgetkern.use_backend("torch"):
        assert _backend.requested("ewc_fused") == "torch"
        with forgetkern.use_backend("triton", op="fisher_accumulate_"):
            assert _backend.requested("fisher_accumulate_") == "triton"
            assert _backend.requested("ewc_fused") == "torch"
        assert _backend.requested("fisher_accumulate_") == "torch"
    assert _backend.requested("ewc_fused") == "auto"


def test_env_variable(monkeypatch):
    monkeypatch.setenv("FORGETKERN_BACKEND", "torch")
    assert _backend.resolve("ewc_fused", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FORGETKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="FORGETKERN_BACKEND must be one of"):
        _backend.resolve("ewc_fused", torch.device("cpu"))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with forgetkern.use_backend("numba"):
            pass


def test_explicit_backend_on_wrong_device_raises():
    with forgetkern.use_backend("cuda"):
        with pytest.raises(forgetkern.BackendError, match="backend 'cuda' cannot run on cpu"):
            forgetkern.fisher_accumulate_([torch.zeros(2)], [torch.ones(2)])


def test_env_command_reports_builds_and_backends():
    out = subprocess.run([sys.executable, "-m", "forgetkern", "env"], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "0"}).stdout
    assert "CPU extension" in out and "CUDA extension" in out and "Triton" in out
    assert "fisher_accumulate_" in out and "cpu" in out


def test_use_backend_refuses_an_unknown_op_name():
    with pytest.raises(ValueError, match=r"unknown op 'ewc_fsued'.*ewc_penalty_and_grad_"):
        with forgetkern.use_backend("torch", op="ewc_fsued"):
            pass


def test_use_backend_accepts_the_public_op_names():
    for name in ("ewc_penalty_and_grad_", "ewc_penalty", "ewc_fused"):
        with forgetkern.use_backend("torch", op=name):
            assert _backend.requested("ewc_fused") == "torch"
            assert _backend.requested("fisher_accumulate_") == "auto"


def test_a_thread_started_inside_use_backend_sees_the_default(monkeypatch):
    import contextvars
    import threading

    monkeypatch.delenv("FORGETKERN_BACKEND", raising=False)
    seen = {}
    with forgetkern.use_backend("torch"):
        t = threading.Thread(target=lambda: seen.setdefault("plain", _backend.requested("ewc_fused")))
        t.start(), t.join()
        ctx = contextvars.copy_context()
        t = threading.Thread(target=lambda: ctx.run(lambda: seen.setdefault("copied", _backend.requested("ewc_fused"))))
        t.start(), t.join()
    assert seen == {"plain": "auto", "copied": "torch"}
