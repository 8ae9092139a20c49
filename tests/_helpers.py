"""Shared test utilities: which backends can run here, tolerances per dtype, random tensor lists."""

from __future__ import annotations

import pytest
import torch

from forgetkern import _backend

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def backends(device: str = "cpu") -> list:
    """Every concrete backend, each skipped with the reason when it cannot run on ``device`` here."""
    avail = _backend.availability(device)
    out = []
    for name in ("torch", "cpp", "cuda", "triton"):
        reason = avail.get(name)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


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
