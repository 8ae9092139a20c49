"""Loader of the compiled extensions ``forgetkern._C`` (CPU) and ``forgetkern._cuda`` (CUDA).

The extension modules are empty; importing one loads its shared library, whose static registrations add the
ops to ``torch.ops.forgetkern_cpu`` / ``torch.ops.forgetkern_cuda``. They are imported lazily, once, on the
first call of any function here, and only after the build metadata (``forgetkern/_build_info.json``, written
by setup.py) says they match the running torch: a library compiled against another torch version can fail to
load or crash (C++ ABI), so on a mismatch it is not loaded and the ops fall back to the other backends.

Every problem is reported by ONE :class:`ForgetkernBuildWarning` (saying which backends remain and how to
rebuild), and the reasons stay available from :func:`cpu_ext_error` / :func:`cuda_ext_error` (shown by
``forgetkern env``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["ForgetkernBuildWarning", "build_info", "cpu_ops", "cuda_ops", "cpu_ext_error", "cuda_ext_error"]

BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")
REBUILD = 'pip install --no-build-isolation -e ".[dev]"  (or: pip install --no-build-isolation .)'


class ForgetkernBuildWarning(UserWarning):
    """The compiled extensions of forgetkern are missing or do not match the running torch."""


_lock = threading.Lock()
_loaded = False
_ops: dict = {"cpu": None, "cuda": None}
_errors: dict = {"cpu": None, "cuda": None}
_info: Optional[dict] = None


def build_info() -> dict:
    """The build metadata written by setup.py (``{}`` when forgetkern was not built)."""
    global _info
    if _info is None:
        try:
            _info = json.loads(BUILD_INFO_PATH.read_text())
        except (OSError, ValueError):
            _info = {}
    return dict(_info)


def _base(version: str) -> str:
    return str(version).split("+", 1)[0]


def _cuda_major(version) -> Optional[str]:
    return str(version).split(".", 1)[0] if version else None


def compat_error(kind: str, info: dict, torch_version: str, torch_cuda: Optional[str]) -> Optional[str]:
    """Why the extension ``kind`` ("cpu" or "cuda") built as ``info`` must not be loaded under the given torch,
    or None. Pure function (no import), so it is unit-testable."""
    built_torch = info.get("torch_version")
    if built_torch and _base(built_torch) != _base(torch_version):
        return (f"forgetkern was built against torch {built_torch}, you have torch {torch_version}; rebuild "
                f"with: {REBUILD}")
    if kind == "cuda":
        if info and not info.get("built_cuda", False):
            return ("forgetkern was built without CUDA (no nvcc or a CPU-only torch at build time); rebuild with "
                    f"FORGETKERN_BUILD_CUDA=1 {REBUILD}")
        if torch_cuda is None:
            return f"torch {torch_version} is a CPU-only build, the CUDA extension needs a CUDA build of torch"
        built_cuda = info.get("cuda_version")
        if built_cuda and _cuda_major(built_cuda) != _cuda_major(torch_cuda):
            return (f"forgetkern's CUDA extension was built for CUDA {built_cuda}, your torch uses CUDA "
                    f"{torch_cuda}; rebuild with: {REBUILD}")
    return None


def _import(kind: str) -> None:
    module = {"cpu": "forgetkern._C", "cuda": "forgetkern._cuda"}[kind]
    namespace = {"cpu": "forgetkern_cpu", "cuda": "forgetkern_cuda"}[kind]
    if importlib.util.find_spec(module) is None:
        _errors[kind] = f"{module} is not built (no shared library found); build it with: {REBUILD}"
        return
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as exc:
        _errors[kind] = f"{module} failed to load ({exc}); rebuild with: {REBUILD}"
        return
    ops = getattr(torch.ops, namespace)
    if not hasattr(ops, "ewc_fused"):
        _errors[kind] = f"{module} loaded but registered no ops in torch.ops.{namespace}; rebuild with: {REBUILD}"
        return
    _ops[kind] = ops


def _remaining(kinds) -> str:
    names = ["torch"] + [{"cpu": "cpp", "cuda": "cuda"}[k] for k in kinds if _ops[k] is not None]
    if importlib.util.find_spec("triton") is not None:
        names.append("triton")
    return ", ".join(names)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        info = build_info()
        problems = []
        for kind in ("cpu", "cuda"):
            reason = compat_error(kind, info, torch.__version__, torch.version.cuda)
            if reason is None:
                _import(kind)
            else:
                _errors[kind] = reason
            # A CUDA extension that was deliberately not built (or cannot apply to a CPU-only torch) is not a
            # problem worth a warning; everything else is.
            quiet = kind == "cuda" and (
                (info and not info.get("built_cuda", False)) or (not info and _errors["cpu"] is not None)
                or torch.version.cuda is None)
            if _errors[kind] is not None and not quiet:
                problems.append(f"{'CPU' if kind == 'cpu' else 'CUDA'} extension: {_errors[kind]}")
        _loaded = True
    if problems:
        warnings.warn(
            "forgetkern: compiled kernels unavailable, falling back to the remaining backends ("
            + _remaining(("cpu", "cuda")) + "). " + " | ".join(problems),
            ForgetkernBuildWarning,
            stacklevel=3,
        )


def cpu_ops():
    """``torch.ops.forgetkern_cpu`` when the CPU extension is loaded, else None."""
    _load()
    return _ops["cpu"]


def cuda_ops():
    """``torch.ops.forgetkern_cuda`` when the CUDA extension is loaded, else None."""
    _load()
    return _ops["cuda"]


def cpu_ext_error() -> Optional[str]:
    """Why the CPU extension is not loaded, or None when it is."""
    _load()
    return _errors["cpu"]


def cuda_ext_error() -> Optional[str]:
    """Why the CUDA extension is not loaded, or None when it is."""
    _load()
    return _errors["cuda"]
