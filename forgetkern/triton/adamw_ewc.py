"""Triton ``adamw_ewc_``: one AdamW step with the EWC gradient fused in, one launch per dtype group.

Math (``forgetkern/ops/adamw_ewc.py``; operation order of ``csrc/include/forgetkern/adamw_ewc.h``), in float32
(float64 for float64 parameters), every stored tensor rounded once::

    g = sign * g;  d = p - p*;  fd = F * d;  g = g + fd * lam;  term = fd * d          (EWC terms: if given)
    p = p * decay;  m = lerp(m, g, w);  v = v * beta2 + (c2 * g) * g;  vhat = max(vmax, v) | v
    p = p + (neg_step_size * m) / (sqrt(vhat) / bc2_sqrt + eps)

Each program handles one chunk of the ``_multi_tensor`` tables (rows ``[p, g, m, v, vmax, p*, F, count,
aligned]``): it reads ``p, g, m, v`` (``vmax``, ``p*``, ``F``) once and writes ``p, m, v`` (``vmax``) once, and
stores ``lam/2 * sum(F d^2)`` of its chunk in its own workspace slot (a fixed-order two-stage reduction, no
float atomics). Launched with ``enable_fp_fusion=False`` and IEEE ``sqrt_rn`` / ``div_rn``: the same roundings
as the reference and the C++ kernel (bitwise equal in the interpreter, checked by tests/test_adamw_ewc.py).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from forgetkern.reference.adamw_ewc import coefficients
from forgetkern.triton import AotSpec
from forgetkern.triton._multi_tensor import build_groups
from forgetkern.triton.fisher_accumulate import _scalar, _up

BLOCK = 1024
CHUNK = BLOCK * 16
NUM_WARPS = 4
OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    if F64:
        return tl.sqrt(x)  # float64 sqrt is IEEE (there is no approximate one)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(a, b, F64: tl.constexpr):
    if F64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _adamw_step(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, a_ptr, f_ptr, offs, mask, decay, w, omw, beta2, c2, nss,
                bc2s, eps, lam, sign, F64: tl.constexpr, MASKED: tl.constexpr, EWC: tl.constexpr,
                AMS: tl.constexpr, LERP_SMALL: tl.constexpr):
    if MASKED:
        p = _up(tl.load(p_ptr + offs, mask=mask, other=0.0), F64)
        g = _up(tl.load(g_ptr + offs, mask=mask, other=0.0), F64)
        m = _up(tl.load(m_ptr + offs, mask=mask, other=0.0), F64)
        v = _up(tl.load(v_ptr + offs, mask=mask, other=0.0), F64)
    else:
        p = _up(tl.load(p_ptr + offs), F64)
        g = _up(tl.load(g_ptr + offs), F64)
        m = _up(tl.load(m_ptr + offs), F64)
        v = _up(tl.load(v_ptr + offs), F64)
    g = g * _scalar(sign, F64)
    term = p * 0.0
    if EWC:
        if MASKED:
            a = _up(tl.load(a_ptr + offs, mask=mask, other=0.0), F64)
            f = _up(tl.load(f_ptr + offs, mask=mask, other=0.0), F64)
        else:
            a = _up(tl.load(a_ptr + offs), F64)
            f = _up(tl.load(f_ptr + offs), F64)
        d = p - a
        fd = f * d
        term = fd * d
        g = g + fd * _scalar(lam, F64)
    p = p * _scalar(decay, F64)
    diff = g - m
    if LERP_SMALL:
        m = m + _scalar(w, F64) * diff
    else:
        m = g - diff * _scalar(omw, F64)
    v = v * _scalar(beta2, F64) + (_scalar(c2, F64) * g) * g
    vh = v
    if AMS:
        if MASKED:
            x = _up(tl.load(x_ptr + offs, mask=mask, other=0.0), F64)
        else:
            x = _up(tl.load(x_ptr + offs), F64)
        vh = tl.where((x != x) | (x > v), x, v)  # torch.maximum: NaN propagates
        vh = tl.where(v != v, v, vh)
        if MASKED:
            tl.store(x_ptr + offs, vh.to(x_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(x_ptr + offs, vh.to(x_ptr.dtype.element_ty))
    den = _div(_sqrt(vh, F64), _scalar(bc2s, F64), F64) + _scalar(eps, F64)
    p = p + _div(_scalar(nss, F64) * m, den, F64)
    if MASKED:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty))
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty))
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty))
    return term  # masked-off lanes loaded zeros: d = 0, they add 0


@triton.jit
def _adamw_chunk(row, count, P_TY, AF_TY, decay, w, omw, beta2, c2, nss, bc2s, eps, lam, sign,
                 F64: tl.constexpr, BLOCK: tl.constexpr, HINT: tl.constexpr, EWC: tl.constexpr,
                 AMS: tl.constexpr, LERP_SMALL: tl.constexpr):
    p_ptr = tl.load(row).to(P_TY.dtype, bitcast=True)
    g_ptr = tl.load(row + 1).to(P_TY.dtype, bitcast=True)
    m_ptr = tl.load(row + 2).to(P_TY.dtype, bitcast=True)
    v_ptr = tl.load(row + 3).to(P_TY.dtype, bitcast=True)
    x_ptr = tl.load(row + 4).to(P_TY.dtype, bitcast=True)
    a_ptr = tl.load(row + 5).to(AF_TY.dtype, bitcast=True)
    f_ptr = tl.load(row + 6).to(AF_TY.dtype, bitcast=True)
    lane = tl.arange(0, BLOCK)
    if F64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    if HINT:  # 16-byte aligned: unmasked full blocks (128-bit accesses), then one masked tail
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        x_ptr = tl.multiple_of(x_ptr, 16)
        a_ptr = tl.multiple_of(a_ptr, 16)
        f_ptr = tl.multiple_of(f_ptr, 16)
        n_full = count // BLOCK
        for i in range(0, n_full):
            acc += _adamw_step(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, a_ptr, f_ptr, i * BLOCK + lane, None, decay, w,
                               omw, beta2, c2, nss, bc2s, eps, lam, sign, F64, False, EWC, AMS, LERP_SMALL)
        offs = n_full * BLOCK + lane
        acc += _adamw_step(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, a_ptr, f_ptr, offs, offs < count, decay, w, omw,
                           beta2, c2, nss, bc2s, eps, lam, sign, F64, True, EWC, AMS, LERP_SMALL)
    else:  # plain path (misaligned views): masked blocks throughout
        for start in range(0, count, BLOCK):
            offs = start + lane
            acc += _adamw_step(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, a_ptr, f_ptr, offs, offs < count, decay, w,
                               omw, beta2, c2, nss, bc2s, eps, lam, sign, F64, True, EWC, AMS, LERP_SMALL)
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize_on_alignment=["P_TY", "AF_TY", "partials"])
def adamw_ewc_kernel(table, P_TY, AF_TY, partials, decay: tl.float64, w: tl.float64, omw: tl.float64,
                     beta2: tl.float64, c2: tl.float64, nss: tl.float64, bc2s: tl.float64, eps: tl.float64,
                     lam: tl.float64, sign: tl.float64, half_lam: tl.float64, F64: tl.constexpr,
                     BLOCK: tl.constexpr, EWC: tl.constexpr, AMS: tl.constexpr, LERP_SMALL: tl.constexpr):
    """One program per chunk; ``P_TY`` / ``AF_TY`` are typed pointers that only carry the group's dtypes."""
    pid = tl.program_id(0)
    row = table + pid * 9  # [p, g, m, v, vmax, anchor, fisher, count, aligned]
    count = tl.load(row + 7).to(tl.int32)
    aligned = tl.load(row + 8)
    if aligned != 0:
        s = _adamw_chunk(row, count, P_TY, AF_TY, decay, w, omw, beta2, c2, nss, bc2s, eps, lam, sign, F64, BLOCK,
                         True, EWC, AMS, LERP_SMALL)
    else:
        s = _adamw_chunk(row, count, P_TY, AF_TY, decay, w, omw, beta2, c2, nss, bc2s, eps, lam, sign, F64, BLOCK,
                         False, EWC, AMS, LERP_SMALL)
    if EWC:
        tl.store(partials + pid, s * _scalar(half_lam, F64))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _one_minus(w: float, f64: bool) -> float:
    """``1 - w`` in the compute type, as torch's lerp computes it (the weight rounded first)."""
    if f64:
        return 1.0 - w
    return float(np.float32(1.0) - np.float32(w))


def adamw_ewc_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, fishers, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, step: float, lam: float, amsgrad: bool,
               maximize: bool) -> torch.Tensor:
    """One AdamW (+ EWC) step over the lists; the EWC penalty (module docstring)."""
    device = params[0].device if params else torch.device("cpu")
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    ewc = len(anchors) > 0
    amsgrad = bool(amsgrad)
    if not params:
        return torch.zeros((), dtype=out_dtype, device=device)
    co = coefficients(lr, beta1, beta2, eps, weight_decay, step, lam, maximize)
    groups = build_groups([params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None,
                           anchors if ewc else None, fishers if ewc else None], CHUNK)
    sizes: dict = {}
    for grp in groups:
        sizes[_acc_dtype(grp.dtypes[0])] = sizes.get(_acc_dtype(grp.dtypes[0]), 0) + grp.num_programs
    ws = {dt: torch.zeros(n, dtype=dt, device=device) for dt, n in sizes.items()}
    offsets = dict.fromkeys(ws, 0)
    for grp in groups:
        i = grp.indices[0]
        p = params[i]
        acc = _acc_dtype(p.dtype)
        f64 = acc == torch.float64
        # torch rounds the lerp weight to the compute type, then compares |w| < 0.5
        w_c = co["w"] if f64 else float(np.float32(co["w"]))
        off = offsets[acc]
        adamw_ewc_kernel[(grp.num_programs,)](
            grp.table, p, anchors[i] if ewc else p, ws[acc][off:], co["decay"], co["w"], _one_minus(co["w"], f64),
            co["beta2"], co["c2"], co["neg_step_size"], co["bc2_sqrt"], co["eps"], co["lam"], co["sign"],
            float(lam) * 0.5, F64=f64, BLOCK=BLOCK, EWC=ewc, AMS=amsgrad, LERP_SMALL=abs(w_c) < 0.5, **OPTIONS)
        offsets[acc] = off + grp.num_programs
    if not ewc or not ws:
        return torch.zeros((), dtype=out_dtype, device=device)
    if len(ws) == 1:
        return next(iter(ws.values())).sum().to(out_dtype)
    return ws[torch.float64].sum() + ws[torch.float32].sum().to(torch.float64)


# ---- ahead-of-time compile specs (few variants: the other dtypes are the same code with other loads) ---------
_TRITON_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_VARIANTS = (  # (param dtype, anchor/Fisher dtype, EWC, amsgrad)
    (torch.float32, torch.float32, False, False),
    (torch.float32, torch.float32, True, False),
    (torch.float32, torch.bfloat16, True, True),
    (torch.bfloat16, torch.bfloat16, True, False),
    (torch.bfloat16, torch.bfloat16, False, True),
    (torch.float16, torch.float32, True, False),
)


def _aot_specs() -> list:
    names = ("table", "P_TY", "AF_TY", "partials", "decay", "w", "omw", "beta2", "c2", "nss", "bc2s", "eps", "lam",
             "sign", "half_lam", "F64", "BLOCK", "EWC", "AMS", "LERP_SMALL")
    specs = []
    for pd, ad, ewc, ams in _VARIANTS:
        ws = "*fp64" if pd == torch.float64 else "*fp32"
        types = ("*i64", "*" + _TRITON_TY[pd], "*" + _TRITON_TY[ad], ws) + ("fp64",) * 11 + ("constexpr",) * 5
        const = {"F64": pd == torch.float64, "BLOCK": BLOCK, "EWC": ewc, "AMS": ams, "LERP_SMALL": True}
        specs.append(AotSpec(adamw_ewc_kernel, dict(zip(names, types)), const,
                             f"p={_TRITON_TY[pd]} anchor/F={_TRITON_TY[ad]} ewc={int(ewc)} amsgrad={int(ams)}",
                             dict(OPTIONS)))
    return specs


AOT_SPECS = _aot_specs()
