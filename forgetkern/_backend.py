"""Backend selection: which implementation of an op runs for a given device.

Every op exists up to four times:

* ``torch``  - the pure-PyTorch reference (``forgetkern/reference``): the test oracle and the fallback that
  always works, on every device and dtype;
* ``cpp``    - the CPU C++ extension (``forgetkern._C``, OpenMP); for LoRA, Python in ``forgetkern/cpu`` that
  calls its kernels;
* ``cuda``   - the CUDA C++ extension (``forgetkern._cuda``);
* ``triton`` - Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).

The choice, in order of precedence: the innermost :func:`use_backend` context (optionally for one op only),
then the ``FORGETKERN_BACKEND`` environment variable, then ``auto``. ``auto`` picks, per device, the fastest
backend that is available: ``cpp`` on CPU, ``cuda`` then ``triton`` on CUDA, ``torch`` otherwise. A backend
that was asked for explicitly but cannot run on the tensors' device raises a :class:`BackendError` that says
why; it never silently changes the numbers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import types
from typing import Iterator, Mapping, Optional

import torch

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")

_OVERRIDE: contextvars.ContextVar[tuple] = contextvars.ContextVar("forgetkern_backend", default=())


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run the op on the given tensors."""


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


# Op names use_backend(op=...) accepts: every op module registers its name (register_op) when imported, with
# the public names that reach it (the EWC penalty and its fused gradient are one kernel, "ewc_fused").
_OP_NAMES: dict = {}


def register_op(name: str, *aliases: str) -> str:
    """Make ``name`` (and ``aliases``, public names of the same op) valid in ``use_backend(op=...)``."""
    for n in (name, *aliases):
        _OP_NAMES[n] = name
    return name


def _check_op(op) -> Optional[str]:
    if op is None:
        return None
    if not isinstance(op, str):
        raise TypeError(f"use_backend: op must be an op name (str) or None, got {type(op).__name__}")
    if op not in _OP_NAMES:
        raise ValueError(f"use_backend: unknown op {op!r}; expected one of {sorted(_OP_NAMES)} (or op=None for "
                         f"every op)")
    return _OP_NAMES[op]


@contextlib.contextmanager
def use_backend(backend: str, *, op: Optional[str] = None) -> Iterator[None]:
    """Run the ops inside the block on ``backend`` (for every op, or only for ``op``).

    >>> with forgetkern.use_backend("torch"):
    ...     forgetkern.fisher_accumulate_(fishers, grads)       # reference path
    >>> with forgetkern.use_backend("triton", op="ewc_penalty_and_grad_"):
    ...     ...

    The choice is held in a :mod:`contextvars` variable: it applies to this thread (and asyncio task) only. A
    thread started inside the block sees the default (``auto``, or ``FORGETKERN_BACKEND``); enter
    ``use_backend`` in that thread, or copy the context (``contextvars.copy_context().run(fn)``).
    """
    backend = _check_name(backend, "backend")
    op = _check_op(op)
    token = _OVERRIDE.set(_OVERRIDE.get() + ((op, backend),))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def requested(op: str) -> str:
    """The backend requested for ``op`` (before looking at the device): context, env, or ``auto``."""
    for scope, backend in reversed(_OVERRIDE.get()):
        if scope is None or scope == op:
            return backend
    return _check_name(os.environ.get("FORGETKERN_BACKEND", "auto"), "FORGETKERN_BACKEND")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


# The C++ kernels of ``torch.ops.forgetkern_cpu`` each op's cpp backend needs, for ops newer than the first
# extension (an extension built from older sources lacks them: the cpp backend is then unavailable for the op,
# with the reason). lora_linear's cpp backend is Python (forgetkern/cpu/lora_linear.py) calling these kernels.
CPP_KERNELS = {"lora_linear": ("lora_dropout", "lora_dropout_add_"), "ewc_delta_w": ("ewc_delta_w",),
               "adamw_ewc": ("adamw_ewc_",),
               "merge_task_vectors": ("merge_task_vectors", "merge_magnitude_thresholds")}


# The same for the CUDA extension's kernels (``torch.ops.forgetkern_cuda``).
CUDA_KERNELS = {"ewc_delta_w": ("ewc_delta_w",), "adamw_ewc": ("adamw_ewc_",), "project_out_": ("project_out_",),
                "olora_loss": ("olora_loss", "olora_loss_backward")}


def _cpp_kernels_missing(op: str) -> Optional[str]:
    return _kernels_missing(op, CPP_KERNELS, "CPU")


def _kernels_missing(op: str, table: Mapping, which: str) -> Optional[str]:
    from forgetkern import _ext

    ops = _ext.cpu_ops() if which == "CPU" else _ext.cuda_ops()
    missing = [k for k in table[op] if not hasattr(ops, k)]
    if not missing:
        return None
    return (f"the {which} extension lacks the kernels {', '.join(missing)} (built from older sources); rebuild "
            f"with: {_ext.REBUILD}")


def availability(device_type: str, op: Optional[str] = None) -> Mapping[str, Optional[str]]:
    """For each concrete backend: ``None`` if it can run on ``device_type`` (``op`` on it, when given), else the
    reason it cannot."""
    # cached: what was loaded does not change within a process; the Triton interpreter switch is read each time
    return _availability(device_type, op, triton_interpreting())


@functools.lru_cache(maxsize=None)
def _availability(device_type: str, op: Optional[str], interpreting: bool) -> Mapping[str, Optional[str]]:
    from forgetkern import _ext

    out: dict[str, Optional[str]] = {"torch": None}
    if device_type == "cpu":
        out["cpp"] = None if _ext.cpu_ops() is not None else f"CPU extension not loaded: {_ext.cpu_ext_error()}"
        out["cuda"] = "the cuda backend needs CUDA tensors"
    elif device_type == "cuda":
        out["cpp"] = "the cpp backend needs CPU tensors"
        out["cuda"] = None if _ext.cuda_ops() is not None else f"CUDA extension not loaded: {_ext.cuda_ext_error()}"
    else:
        out["cpp"] = f"the cpp backend needs CPU tensors, got device type {device_type!r}"
        out["cuda"] = f"the cuda backend needs CUDA tensors, got device type {device_type!r}"
    if not triton_available():
        out["triton"] = "triton is not installed"
    elif device_type == "cuda":
        out["triton"] = None
    elif device_type == "cpu" and interpreting:
        out["triton"] = None
    else:
        out["triton"] = f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device_type!r}"
    if op in CPP_KERNELS and out["cpp"] is None:
        out["cpp"] = _cpp_kernels_missing(op)
    if op in CUDA_KERNELS and out["cuda"] is None:
        out["cuda"] = _kernels_missing(op, CUDA_KERNELS, "CUDA")
    return types.MappingProxyType(out)


_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
# Ops whose preferred CUDA implementation is the Triton one rather than the CUDA C++ one. lora_linear: Triton
# fuses the frozen GEMM and the LoRA branch in one pass (pipelined tiles, wgmma on sm_90), so y is written once;
# the CUDA C++ backend (cuBLAS for the frozen GEMM, then rank-r shrink/expand kernels that update y in place, the
# punica / S-LoRA design) reads and writes y once more. It needs no Triton and no JIT, and stays selectable.
_AUTO_ORDER_BY_OP = {"lora_linear": {"cuda": ("triton", "cuda", "torch")}}
# The backends that implement each op: filled by the op's :class:`Kernels` when its module is imported.
SUPPORTED_BY_OP: dict = {}


def resolve(op: str, device: torch.device, *, supported: Optional[tuple] = None) -> str:
    """The concrete backend that runs ``op`` on ``device``.

    ``supported`` lists the backends that implement ``op`` for the given inputs (e.g. a dtype a kernel lacks);
    by default every backend that has the op.
    """
    if supported is None:
        supported = SUPPORTED_BY_OP[op]
    want = requested(op)
    avail = availability(device.type, op)
    if want == "auto":
        order = _AUTO_ORDER_BY_OP.get(op, {}).get(device.type) or _AUTO_ORDER.get(device.type, ("torch",))
        for name in order:
            if name in supported and avail.get(name) is None:
                return name
        return "torch"
    if want not in supported:
        raise BackendError(
            f"forgetkern.{op}: backend {want!r} does not implement this op for these inputs "
            f"(implemented: {', '.join(supported)}); use backend 'auto' or one of those"
        )
    reason = avail.get(want)
    if reason is not None:
        raise BackendError(f"forgetkern.{op}: backend {want!r} cannot run on {device}: {reason}")
    return want


class Kernels:
    """The implementations of one op's kernel, one per backend, named where the op is defined.

    An op is defined once, in ``forgetkern/ops/<op>.py`` (``torch.library.custom_op`` in the ``forgetkern::``
    namespace); its body calls ``KERNELS(device)(...)``, which returns the implementation of the backend that
    :func:`resolve` picks. Each value passed here is a function of no arguments that returns the implementation,
    so the compiled extensions and Triton are loaded on first use only, and every implementation is spelt out in
    the op's file (``find usages`` of ``forgetkern.triton.ewc_penalty.ewc_fused`` finds its op)::

        KERNELS = _backend.Kernels(
            "fisher_accumulate_",
            torch=lambda: reference.fisher_accumulate_,
            cpp=lambda: _ext.cpu_ops().fisher_accumulate_,
            triton=lambda: _triton().fisher_accumulate_,
        )

    The backends an op has are the keys given here (they fill :data:`SUPPORTED_BY_OP`); the extensions'
    kernels keep their own namespaces (``forgetkern_cpu``, ``forgetkern_cuda``) and their schemas are checked
    against the op's by the test suite (tests/test_op_schemas.py).
    """

    def __init__(self, op: str, **loaders):
        unknown = sorted(set(loaders) - set(BACKENDS[1:]))
        if unknown or "torch" not in loaders:
            raise ValueError(f"Kernels({op!r}): backends must include 'torch' and be among {BACKENDS[1:]}, got "
                             f"{sorted(loaders)}")
        self.op = op
        self._loaders = loaders
        self._loaded: dict = {}
        self.backends = tuple(b for b in BACKENDS[1:] if b in loaders)
        have = SUPPORTED_BY_OP.setdefault(op, self.backends)
        if have != self.backends:
            raise ValueError(f"Kernels({op!r}): backends {self.backends} differ from those of another kernel of "
                             f"the op, {have}")

    def get(self, backend: str):
        """The implementation on ``backend`` (a backend of this op)."""
        fn = self._loaded.get(backend)
        if fn is None:
            if backend not in self._loaders:
                raise BackendError(f"forgetkern.{self.op}: backend {backend!r} does not implement this op "
                                   f"(implemented: {', '.join(self.backends)})")
            fn = self._loaded[backend] = self._loaders[backend]()
        return fn

    def __call__(self, device: torch.device, *, supported: Optional[tuple] = None):
        """The implementation of the backend that runs the op on ``device`` (see :func:`resolve`)."""
        return self.get(resolve(self.op, device, supported=supported))
