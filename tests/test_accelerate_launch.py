"""examples/accelerate_lora_ewc.py under a real ``accelerate launch`` with 2 CPU processes (gloo) prints what one
process prints: the same losses and EWC penalties at every step, the same Fisher token count.

``accelerate launch --multi_gpu`` is accelerate's torch.distributed.run launcher (``--cpu`` with more than one
process needs mpirun and a hostfile); on a machine without a visible GPU, ``Accelerator(cpu=True)`` in the
ranks joins the gloo process group that launcher set up. Both runs start at once and are bounded in time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "accelerate_lora_ewc.py"
STEPS = 3
TIMEOUT_S = 300
STEP_LINE = re.compile(r"^step (\d+): loss (\S+)  ewc penalty (\S+)$", re.M)
END_LINE = re.compile(r"^processes: (\d+), fisher tokens \(all ranks\): (\d+),", re.M)
LAUNCH = ["-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def _env(tmp_path, name: str) -> dict:
    (tmp_path / name).mkdir()
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "CUDA_VISIBLE_DEVICES": "",       # CPU processes over gloo, also on a machine with GPUs
            "OMP_NUM_THREADS": "1",
            "HF_HOME": str(tmp_path / "hf"),  # no user `accelerate config` default file can change the launch
            "CKPT_DIR": str(tmp_path / name)}


def _parse(name: str, proc: subprocess.Popen) -> tuple:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{name} did not finish in {TIMEOUT_S} s:\n{out[-2000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
    steps = [(int(s), float(loss), float(pen)) for s, loss, pen in STEP_LINE.findall(out)]
    end = END_LINE.search(out)
    assert [s for s, _, _ in steps] == list(range(STEPS)) and end, f"{name}: unexpected output\n{out[-2000:]}"
    return steps, int(end.group(1)), int(end.group(2))


@pytest.mark.slow  # 4 interpreters (launcher, 2 ranks, the reference) importing torch: 15-25 s on 2 cores
def test_accelerate_launch_two_cpu_processes_match_one(tmp_path):
    kw = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = {"accelerate launch, 2 processes": subprocess.Popen(
                 [sys.executable, *LAUNCH, str(EXAMPLE), str(STEPS)], env=_env(tmp_path, "launched"), **kw),
             "one process": subprocess.Popen([sys.executable, str(EXAMPLE), str(STEPS)],
                                             env=_env(tmp_path, "single"), **kw)}
    try:
        (got, n_got, tokens_got), (ref, n_ref, tokens_ref) = (_parse(name, p) for name, p in procs.items())
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert (n_got, n_ref) == (2, 1)
    assert tokens_got == tokens_ref > 0          # the Fisher of each rank's share, all-reduced = all the data
    assert any(pen > 0 for _, _, pen in ref)     # EWC is active after the first step
    for (step, loss, pen), (_, loss_1, pen_1) in zip(got, ref):
        assert loss == pytest.approx(loss_1, rel=1e-5), f"step {step}: loss {loss} (2 processes) vs {loss_1}"
        assert pen == pytest.approx(pen_1, rel=1e-4, abs=1e-9), f"step {step}: penalty {pen} vs {pen_1}"
    saved = sorted(p.name for p in (tmp_path / "launched" / "forgetkern").iterdir())
    assert any(n.endswith(".safetensors") for n in saved), saved
