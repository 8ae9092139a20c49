"""Shared hypothesis strategies and oracles for the property suites (tests/test_properties_*.py).

Values are drawn as (shape, seed) and generated with a torch.Generator in float64, then rounded to the dtype
under test: hypothesis shrinks the shape, the layout and the injected special values, and a failing example
prints everything needed to rebuild its tensors. The example counts follow the hypothesis profile chosen in
tests/conftest.py (``FORGETKERN_HYPOTHESIS_PROFILE``: ``ci`` by default, ``nightly`` for many more examples).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

from tests._helpers import EPS, backends

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
PROFILE = os.environ.get("FORGETKERN_HYPOTHESIS_PROFILE", "ci")


def examples(ci: int, nightly: int | None = None) -> settings:
    """Settings with ``ci`` examples under the ci profile (``nightly``, default 25x, under nightly); deadline,
    derandomization and the rest come from the loaded profile."""
    return settings(max_examples=ci if PROFILE != "nightly" else (nightly or 25 * ci))


def backend_params(names=("torch", "cpp", "triton")) -> list:
    """tests._helpers.backends() restricted to ``names`` (each skipped with its reason where it cannot run)."""
    return [p for p in backends() if p.id in names]


# ---- shapes, layouts, values -----------------------------------------------------------------------------

def side(max_side: int = 5):
    """A dimension size, 0 and 1 drawn often."""
    return st.one_of(st.sampled_from([0, 1]), st.integers(0, max_side))


def shapes(max_dims: int = 3, max_side: int = 5, min_dims: int = 1):
    return st.lists(side(max_side), min_size=min_dims, max_size=max_dims).map(tuple)


LAYOUTS = ("contiguous", "offset", "transposed", "strided")


def materialize(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``values`` (same dtype and shape) with the memory ``layout``:

    * ``contiguous``; ``offset``: contiguous at a storage offset of 3 elements (misaligned for vector loads);
    * ``transposed``: a transposed view of a contiguous tensor (first and last dimensions swapped back);
    * ``strided``: every second row of a larger tensor.
    Views of sizes 0 / 1 may still be contiguous: the tests ask ``is_contiguous()``, not the layout name.
    """
    if layout == "contiguous":
        return values.clone()
    if layout == "offset":
        buf = torch.zeros(values.numel() + 3, dtype=values.dtype)
        out = buf[3:].view(values.shape)
    elif layout == "transposed" and values.dim() >= 2:
        out = torch.zeros(values.transpose(0, -1).shape, dtype=values.dtype).transpose(0, -1)
    else:  # strided (and "transposed" of a 1-D tensor)
        if values.dim() == 0:
            return values.clone()
        big = torch.zeros((2 * values.shape[0] + 1,) + tuple(values.shape[1:]), dtype=values.dtype)
        out = big[1::2]
    out.copy_(values)
    return out


def randn(shape, dtype, seed: int, *, scale: float = 1.0, positive: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=F64) * scale
    return (x.abs() if positive else x).to(dtype)


# Special values injected into inputs: non-finite ones, finite ones whose square overflows float32 (1e20 once
# squared), values beyond float32 (float64 only; rounded to inf in 16/32 bits) and fp16's largest.
NONFINITE = (float("inf"), float("-inf"), float("nan"))
SPECIALS = NONFINITE + (1e20, -1e20, 1e200, 65504.0)


def injections(values=SPECIALS, max_size: int = 3):
    """``[(position in [0, 1), value)]``: where (as a fraction of numel) to put which special value."""
    return st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(values)), max_size=max_size)


def inject(t: torch.Tensor, specials) -> torch.Tensor:
    """``t`` (contiguous) with the special values written at their positions (in ``t``'s dtype)."""
    if t.numel() == 0 or not specials:
        return t
    flat = t.view(-1)
    for frac, v in specials:  # rounded as a cast would (1e200 -> inf in 32 bits), not refused
        flat[int(frac * t.numel())] = torch.tensor(v, dtype=F64).to(t.dtype)
    return t


# ---- tolerances --------------------------------------------------------------------------------------------

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


def earned_close(name: str, got: torch.Tensor, plain: torch.Tensor, want: torch.Tensor) -> None:
    """The tolerance of tests/test_lora_linear.py: max error against the fp64 oracle <= 2x plain PyTorch's error
    in the same dtype + one ulp of the result's magnitude."""
    assert got.dtype == plain.dtype and got.shape == want.shape, (name, got.dtype, plain.dtype, got.shape)
    if want.numel() == 0:
        return
    err = (got.double() - want).abs().max().item()
    base = (plain.double() - want).abs().max().item()
    tol = 2 * base + EPS[plain.dtype] * want.abs().max().item() + 1e-300
    assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e} (plain torch {base:.3e})"


def overlapping(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the element spans of two views of one storage intersect (both non-empty)."""
    if a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        lo = t.data_ptr()
        return lo, lo + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def xfail_strict(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)
