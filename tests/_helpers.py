"""Shared test utilities: which backends can run here, tolerances per dtype, random tensor lists."""

from __future__ import annotations

import pytest
import torch

from forgetkern import _backend

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


# A CUDA device: with one the op tests run every backend on CUDA tensors too (and Triton compiles for it);
# without one Triton runs interpreted on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 only then).
HAS_CUDA = torch.cuda.is_available()


def backends(device: str = "cpu") -> list:
    """Every concrete backend, each skipped with the reason when it cannot run on ``device`` here."""
    avail = _backend.availability(device)
    out = []
    for name in ("torch", "cpp", "cuda", "triton"):
        reason = avail.get(name)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def backend_devices(supported=None, *, op: str = None) -> list:
    """``(backend, device)`` pairs for ``@pytest.mark.parametrize("backend,device", ...)``.

    CPU tensors: ``torch``, ``cpp``, ``triton`` (interpreted; ids ``torch``, ``cpp``, ``triton``); CUDA tensors:
    ``cuda`` (id ``cuda``) and, with a GPU, ``torch`` and ``triton`` (ids ``torch-cuda``, ``triton-cuda``). A pair
    that cannot run here is kept, skipped with the reason, so a CPU-only run has the same tests as before the
    CUDA pairs existed. ``supported``: the backends that implement the op (others are skipped, "not implemented").
    """
    pairs = [("torch", "cpu"), ("cpp", "cpu"), ("cuda", "cuda"), ("triton", "cpu")]
    if HAS_CUDA:
        pairs += [("torch", "cuda"), ("triton", "cuda")]
    out = []
    for name, dev in pairs:
        reason = _backend.availability(dev, op).get(name)
        if dev == "cuda" and not HAS_CUDA:
            reason = f"no CUDA device ({reason})" if reason else "no CUDA device"
        if supported is not None and name not in supported:
            reason = f"the {name} backend does not implement this op"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        ident = name if (dev == "cpu" or name == "cuda") else f"{name}-{dev}"
        out.append(pytest.param(name, dev, marks=marks, id=ident))
    return out


def devices() -> list:
    """The devices of tests of torch-only ops: ``cpu``, and ``cuda`` with a GPU."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def to_dev(obj, device):
    """``obj`` (a tensor, or nested lists/tuples of them; other values unchanged) on ``device``; on CPU the very
    same objects (in-place updates stay visible to the caller). Leaves requiring grad stay leaves requiring grad."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == torch.device(device).type:
            return obj
        return obj.detach().to(device).requires_grad_(obj.requires_grad)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_dev(o, device) for o in obj)
    if isinstance(obj, tuple):  # a NamedTuple (LoraAdapter)
        return type(obj)(*(to_dev(o, device) for o in obj))
    return obj


def to_cpu(obj):
    """The inverse of :func:`to_dev` for results: tensors (nested in lists/tuples) on CPU."""
    return to_dev(obj, "cpu")


# Sizes from the foundation checklist: empty, one element, odd, one past a power of two, and a long list of
# small tensors with empty ones among them (multi-tensor chunking and the empty-tensor skip).
def size_sets() -> dict:
    g = torch.Generator().manual_seed(0)
    many = [int(n) for n in torch.randint(0, 300, (520,), generator=g)]
    many[::7] = [0] * len(many[::7])
    return {"empty": [0], "one": [1], "seven": [7], "65537": [65537], "520-tensors": many,
            "shapes": [(3, 5), (0, 4), (128, 257), (2, 3, 4)]}


def rand_list(shapes, dtype, gen, *, scale=1.0, positive=False) -> list:
    out = []
    for s in shapes:
        s = (s,) if isinstance(s, int) else s
        x = torch.randn(s, generator=gen, dtype=torch.float64) * scale
        out.append((x.abs() if positive else x).to(dtype))
    return out


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype,
                        ulps: float = 2.0, what: str = "") -> None:
    """|got - want| <= ulps * eps(dtype) * mag elementwise (mag: magnitude of the terms that were summed)."""
    got64, want64 = got.double(), want.double()
    bound = ulps * EPS[dtype] * mag.double() + 1e-300
    bad = (got64 - want64).abs() > bound
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off; first at {idx}: "
                             f"got {got64[bad][:5].tolist()} want {want64[bad][:5].tolist()}")
