"""Triton ``ewc_fused``: EWC penalty (+ its gradient) over whole lists, one launch per dtype group.

Math, with ``d = theta - theta_star`` in float32 (float64 for float64 parameters)::

    penalty = lam / 2 * sum_i F_i * d_i^2                  (0-dim; float64 if any param is float64)
    g_i     = (g_i if accumulate else 0) + lam * F_i * d_i   (only when write_grad; stored in g's dtype)

Each program handles one chunk (see ``_multi_tensor``): it reads ``theta``, ``theta*``, ``F`` (and ``g`` when
accumulating) once, writes ``g`` once, and stores ``lam/2 * sum(F d^2)`` of its chunk into its own slot of
a workspace. The penalty is ``workspace.sum()``: a fixed-order two-stage reduction, no float atomics, so
the result is bitwise reproducible run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forgetkern.triton import AotSpec
from forgetkern.triton._multi_tensor import build_groups
from forgetkern.triton.fisher_accumulate import _scalar, _up

BLOCK = 1024
CHUNK = BLOCK * 16
NUM_WARPS = 4


@triton.jit
def _ewc_step(p_ptr, a_ptr, f_ptr, g_ptr, offs, mask, lam, F64: tl.constexpr, MASKED: tl.constexpr,
              WRITE_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr):
    if MASKED:
        p = _up(tl.load(p_ptr + offs, mask=mask, other=0.0), F64)
        a = _up(tl.load(a_ptr + offs, mask=mask, other=0.0), F64)
        f = _up(tl.load(f_ptr + offs, mask=mask, other=0.0), F64)
    else:
        p = _up(tl.load(p_ptr + offs), F64)
        a = _up(tl.load(a_ptr + offs), F64)
        f = _up(tl.load(f_ptr + offs), F64)
    d = p - a
    fd = f * d
    if WRITE_GRAD:
        step = fd * _scalar(lam, F64)
        if ACCUMULATE:
            if MASKED:
                step = _up(tl.load(g_ptr + offs, mask=mask, other=0.0), F64) + step
            else:
                step = _up(tl.load(g_ptr + offs), F64) + step
        if MASKED:
            tl.store(g_ptr + offs, step.to(g_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(g_ptr + offs, step.to(g_ptr.dtype.element_ty))
    return fd * d  # masked-off lanes loaded zeros: they add 0


@triton.jit
def _ewc_chunk(p_addr, a_addr, f_addr, g_addr, count, P_TY, A_TY, F_TY, G_TY, lam, F64: tl.constexpr,
               BLOCK: tl.constexpr, HINT: tl.constexpr, WRITE_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr):
    p_ptr = p_addr.to(P_TY.dtype, bitcast=True)
    a_ptr = a_addr.to(A_TY.dtype, bitcast=True)
    f_ptr = f_addr.to(F_TY.dtype, bitcast=True)
    g_ptr = g_addr.to(G_TY.dtype, bitcast=True)
    lane = tl.arange(0, BLOCK)
    if F64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    if HINT:  # 16-byte aligned: unmasked full blocks (128-bit accesses), then one masked tail
        p_ptr = tl.multiple_of(p_ptr, 16)
        a_ptr = tl.multiple_of(a_ptr, 16)
        f_ptr = tl.multiple_of(f_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        n_full = count // BLOCK
        for i in range(0, n_full):
            acc += _ewc_step(p_ptr, a_ptr, f_ptr, g_ptr, i * BLOCK + lane, None, lam, F64, False,
                             WRITE_GRAD, ACCUMULATE)
        offs = n_full * BLOCK + lane
        acc += _ewc_step(p_ptr, a_ptr, f_ptr, g_ptr, offs, offs < count, lam, F64, True,
                         WRITE_GRAD, ACCUMULATE)
    else:  # plain path (misaligned views): masked blocks throughout
        for start in range(0, count, BLOCK):
            offs = start + lane
            acc += _ewc_step(p_ptr, a_ptr, f_ptr, g_ptr, offs, offs < count, lam, F64, True,
                             WRITE_GRAD, ACCUMULATE)
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize_on_alignment=["P_TY", "A_TY", "F_TY", "G_TY", "partials"])
def ewc_fused_kernel(table, P_TY, A_TY, F_TY, G_TY, partials, lam: tl.float64, half_lam: tl.float64,
                     F64: tl.constexpr, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr):
    """One program per chunk; ``*_TY`` are typed pointers that only carry the group's dtypes."""
    pid = tl.program_id(0)
    row = table + pid * 6  # [p_addr, a_addr, f_addr, g_addr, count, aligned]
    p_addr = tl.load(row)
    a_addr = tl.load(row + 1)
    f_addr = tl.load(row + 2)
    g_addr = tl.load(row + 3)
    count = tl.load(row + 4).to(tl.int32)
    aligned = tl.load(row + 5)
    if aligned != 0:
        s = _ewc_chunk(p_addr, a_addr, f_addr, g_addr, count, P_TY, A_TY, F_TY, G_TY, lam,
                       F64, BLOCK, True, WRITE_GRAD, ACCUMULATE)
    else:
        s = _ewc_chunk(p_addr, a_addr, f_addr, g_addr, count, P_TY, A_TY, F_TY, G_TY, lam,
                       F64, BLOCK, False, WRITE_GRAD, ACCUMULATE)
    tl.store(partials + pid, s * _scalar(half_lam, F64))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ewc_fused(params, anchors, fishers, grads, lam: float, write_grad: bool, accumulate: bool) -> torch.Tensor:
    """EWC penalty over the lists, and the gradient into ``grads`` when ``write_grad`` (module docstring)."""
    device = params[0].device if params else torch.device("cpu")
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    if not params:
        return torch.zeros((), dtype=out_dtype, device=device)
    write_grad = bool(write_grad)
    accumulate = bool(accumulate) and write_grad
    groups = build_groups([params, anchors, fishers, grads if write_grad else None], CHUNK)
    # One workspace slot per program, in the group's accumulation dtype (float64 groups, float32 groups).
    sizes: dict = {}
    for grp in groups:
        sizes[_acc_dtype(grp.dtypes[0])] = sizes.get(_acc_dtype(grp.dtypes[0]), 0) + grp.num_programs
    ws = {dt: torch.empty(n, dtype=dt, device=device) for dt, n in sizes.items()}
    offsets = dict.fromkeys(ws, 0)
    lam = float(lam)
    for grp in groups:
        i = grp.indices[0]
        p = params[i]
        acc = _acc_dtype(p.dtype)
        off = offsets[acc]
        ewc_fused_kernel[(grp.num_programs,)](
            grp.table, p, anchors[i], fishers[i], grads[i] if write_grad else p, ws[acc][off:], lam, lam * 0.5,
            F64=acc == torch.float64, BLOCK=BLOCK, WRITE_GRAD=write_grad, ACCUMULATE=accumulate,
            num_warps=NUM_WARPS)
        offsets[acc] = off + grp.num_programs
    if not ws:
        return torch.zeros((), dtype=out_dtype, device=device)
    if len(ws) == 1:
        return next(iter(ws.values())).sum().to(out_dtype)
    # float64 and float32 groups in one call (rare: float64 is for gradcheck): sum each, add in float64
    return ws[torch.float64].sum() + ws[torch.float32].sum().to(torch.float64)


# ---- ahead-of-time compile specs: every variant the launcher can produce --------------------------------
_TRITON_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_MODES = ((False, False), (True, False), (True, True))  # (WRITE_GRAD, ACCUMULATE)


def _aot_specs() -> list:
    specs = []
    names = ("table", "P_TY", "A_TY", "F_TY", "G_TY", "partials", "lam", "half_lam", "F64", "BLOCK",
             "WRITE_GRAD", "ACCUMULATE")
    for pd, pt in _TRITON_TY.items():
        for at in _TRITON_TY.values():
            for ft in _TRITON_TY.values():
                for wg, acc in _MODES:
                    ws = "*fp64" if pd == torch.float64 else "*fp32"
                    types = ("*i64", "*" + pt, "*" + at, "*" + ft, "*" + pt, ws, "fp64", "fp64") + ("constexpr",) * 4
                    const = {"F64": pd == torch.float64, "BLOCK": BLOCK, "WRITE_GRAD": wg, "ACCUMULATE": acc}
                    specs.append(AotSpec(ewc_fused_kernel, dict(zip(names, types)), const,
                                         f"p={pt} a={at} F={ft} write_grad={int(wg)} accumulate={int(acc)}",
                                         {"num_warps": NUM_WARPS}))
    return specs


AOT_SPECS = _aot_specs()
