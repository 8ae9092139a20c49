"""Triton ``fisher_accumulate_``: one multi-tensor launch per dtype group.

Math, per element, for each pair ``(F, g)`` of the lists::

    u = S(decay * F + (scale * g) * g)   (float32 math, float64 for float64 state; S rounds to the state dtype)
    F <- u                               if g and u are finite
    F <- F                               otherwise            (and the returned flag becomes 1.0)

Returns a 0-dim float32 tensor on the device: 1.0 if any element was skipped (a gradient that was inf/nan, or
a finite one whose update overflowed), else 0.0. Each
program handles one chunk (see ``_multi_tensor``): ``F`` and ``g`` are read once and ``F`` written once; a
program that saw a non-finite gradient stores 1.0 into the flag (every writer stores the same value, so the
race is benign and the result deterministic). No host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forgetkern.triton import AotSpec
from forgetkern.triton._multi_tensor import build_groups

BLOCK = 1024
CHUNK = BLOCK * 16
NUM_WARPS = 4


@triton.jit
def _up(x, F64: tl.constexpr):
    if F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _scalar(v, F64: tl.constexpr):
    # Float arguments are float64 (annotated): exact for float64 math, rounded once for float32 math. Use
    # it inline (never assign the result): the interpreter turns an assigned Python float into float32.
    if F64:
        return v
    else:
        return tl.cast(v, tl.float32)


@triton.jit
def _fisher_step(f_ptr, g_ptr, offs, mask, decay, scale, F64: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        f = _up(tl.load(f_ptr + offs, mask=mask, other=0.0), F64)
        g = _up(tl.load(g_ptr + offs, mask=mask, other=0.0), F64)
    else:
        f = _up(tl.load(f_ptr + offs), F64)
        g = _up(tl.load(g_ptr + offs), F64)
    new = (f * _scalar(decay, F64) + _scalar(scale, F64) * g * g).to(f_ptr.dtype.element_ty)
    # false for +-inf and nan: of g, and of the update as stored (a finite g can overflow g*g or the store)
    finite = (tl.abs(g) < float("inf")) & (tl.abs(_up(new, F64)) < float("inf"))
    out = tl.where(finite, new, f.to(f_ptr.dtype.element_ty))
    if MASKED:
        tl.store(f_ptr + offs, out, mask=mask)
        bad = (~finite) & mask
    else:
        tl.store(f_ptr + offs, out)
        bad = ~finite
    return bad.to(tl.int32)


@triton.jit
def _fisher_chunk(f_addr, g_addr, count, F_TY, G_TY, decay, scale, F64: tl.constexpr, BLOCK: tl.constexpr,
                  HINT: tl.constexpr):
    f_ptr = f_addr.to(F_TY.dtype, bitcast=True)
    g_ptr = g_addr.to(G_TY.dtype, bitcast=True)
    lane = tl.arange(0, BLOCK)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    if HINT:  # 16-byte aligned: unmasked full blocks (128-bit accesses), then one masked tail
        f_ptr = tl.multiple_of(f_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        n_full = count // BLOCK
        for i in range(0, n_full):
            bad |= _fisher_step(f_ptr, g_ptr, i * BLOCK + lane, None, decay, scale, F64, False)
        offs = n_full * BLOCK + lane
        bad |= _fisher_step(f_ptr, g_ptr, offs, offs < count, decay, scale, F64, True)
    else:  # plain path (misaligned views): masked blocks throughout
        for start in range(0, count, BLOCK):
            offs = start + lane
            bad |= _fisher_step(f_ptr, g_ptr, offs, offs < count, decay, scale, F64, True)
    return tl.max(bad, axis=0)


# The *_TY pointers only carry dtypes: no alignment specialisation on them (no recompiles when the first
# tensor of a group happens to be a misaligned view); chunk alignment comes from the table instead.
@triton.jit(do_not_specialize_on_alignment=["F_TY", "G_TY"])
def fisher_accumulate_kernel(table, F_TY, G_TY, flag, decay: tl.float64, scale: tl.float64,
                             F64: tl.constexpr, BLOCK: tl.constexpr):
    """One program per chunk; ``F_TY``/``G_TY`` are typed pointers that only carry the group's dtypes."""
    row = table + tl.program_id(0) * 4  # [f_addr, g_addr, count, aligned]
    f_addr = tl.load(row)
    g_addr = tl.load(row + 1)
    count = tl.load(row + 2).to(tl.int32)
    aligned = tl.load(row + 3)
    if aligned != 0:
        bad = _fisher_chunk(f_addr, g_addr, count, F_TY, G_TY, decay, scale, F64, BLOCK, True)
    else:
        bad = _fisher_chunk(f_addr, g_addr, count, F_TY, G_TY, decay, scale, F64, BLOCK, False)
    tl.store(flag, 1.0, mask=bad != 0)


def fisher_accumulate_(fishers, grads, decay: float, scale: float) -> torch.Tensor:
    """In place ``F <- decay*F + scale*g^2`` over the lists (see the module docstring); returns the flag."""
    device = fishers[0].device if fishers else torch.device("cpu")
    flag = torch.zeros((), dtype=torch.float32, device=device)
    if not fishers:
        return flag
    for grp in build_groups([fishers, grads], CHUNK):
        first = grp.indices[0]
        fisher_accumulate_kernel[(grp.num_programs,)](
            grp.table, fishers[first], grads[first], flag, float(decay), float(scale),
            F64=fishers[first].dtype == torch.float64, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return flag


# ---- ahead-of-time compile specs: every variant the launcher can produce --------------------------------
_TRITON_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _aot_specs() -> list:
    specs = []
    for fd in STATE_DTYPES:
        for gd in GRAD_DTYPES:
            sig = {"table": "*i64", "F_TY": "*" + _TRITON_TY[fd], "G_TY": "*" + _TRITON_TY[gd], "flag": "*fp32",
                   "decay": "fp64", "scale": "fp64",
                   "F64": "constexpr", "BLOCK": "constexpr"}
            specs.append(AotSpec(fisher_accumulate_kernel, sig, {"F64": fd == torch.float64, "BLOCK": BLOCK},
                                 f"F={_TRITON_TY[fd]} g={_TRITON_TY[gd]}", {"num_warps": NUM_WARPS}))
    return specs


AOT_SPECS = _aot_specs()
