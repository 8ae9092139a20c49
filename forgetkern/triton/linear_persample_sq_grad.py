"""Triton ``linear_persample_sq_grad_``: per-sample squared Linear-weight gradients, one GEMM-shaped kernel.

Math (see ``forgetkern.reference.linear_persample_sq_grad``)::

    sample:  F += scale * sum_n drop_nonfinite( (sum_t g_nt x_nt^T)^2 )
    token:   F += scale * sum_n drop_nonfinite(  sum_t (g_nt^2)(x_nt^2)^T )

Each program owns one [BM, BN] tile of ``F`` (rows: output features, columns: input features) and a range of
samples. For each sample it runs the weight-gradient GEMM over the sample's tokens into an fp32 register
tile ``G_n`` (16-bit operands go to the tensor cores: HMMA on sm_80, HGMMA on sm_90), squares it in the
epilogue, drops non-finite elements and adds it to a second fp32 register tile. Masked (padding) tokens
are not loaded. At the end the tile is added to ``F`` (rounded once to its dtype) -- or, when the tile grid
is too small to fill the GPU, the sample range is split over ``S`` programs that write fp32 partials into a
workspace [S, out, in], summed in a fixed order by ``_finish_kernel`` (deterministic, no float atomics).
A program that dropped a non-finite element stores 1.0 into the flag (benign same-value race).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forgetkern import _backend
from forgetkern.triton import AotSpec

GROUP_M = 8
FINISH_BLOCK = 1024
# (BM, BN, BK, num_warps, num_stages) per input kind; "interp" keeps the interpreter fast on tiny tests.
# "fp32" also serves the token path (squared operands in fp32); "fp32_vec1": unaligned fp32 operands.
_CFG = {"16bit": (64, 128, 64, 8, 3), "fp32": (64, 64, 16, 4, 4), "fp32_vec1": (64, 64, 16, 8, 2),
        "interp": (32, 32, 16, 4, 1)}
_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _persample_sq_grad_kernel(
        f_ptr, x_ptr, g_ptr, m_ptr, ws_ptr, flag_ptr,
        N, T, OUT, IN,
        stride_xn, stride_xt, stride_gn, stride_gt, stride_mn,
        per_split, scale,
        TOKEN: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, VEC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        GROUP: tl.constexpr):
    # VEC = 8 when the host checked that strides and feature sizes are multiples of 8 and the bases 16-byte
    # aligned: they arrive divided by VEC, so the compiler sees the divisibility (vectorised loads) even in
    # an ahead-of-time compile without specialisation hints.
    stride_xn = stride_xn * VEC
    stride_gn = stride_gn * VEC
    stride_xt = stride_xt * VEC
    stride_gt = stride_gt * VEC
    OUT = OUT * VEC
    IN = IN * VEC
    # grouped tile order: GROUP row tiles reuse the same columns of x while they sit in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(OUT, BM)
    tiles_n = tl.cdiv(IN, BN)
    width = GROUP * tiles_n
    first_m = (pid // width) * GROUP
    group_rows = tl.minimum(tiles_m - first_m, GROUP)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask = rm < OUT
    nmask = rn < IN
    n0 = tl.program_id(1).to(tl.int64) * per_split  # int64 loop variable: 64-bit sample offsets
    n1 = tl.minimum(N, n0 + per_split)
    acc_f = tl.zeros((BM, BN), dtype=tl.float32)
    bad = tl.zeros((BM,), dtype=tl.int32)  # per row: a [BM, BN] int tile would cost 64 registers
    for n in range(n0, n1):
        x_base = x_ptr + n * stride_xn
        g_base = g_ptr + n * stride_gn
        if VEC > 1:
            x_base = tl.multiple_of(x_base, 16)
            g_base = tl.multiple_of(g_base, 16)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t0 in range(0, T, BK):
            tt = t0 + rk
            tmask = tt < T
            if HAS_MASK:
                tmask = tmask & (tl.load(m_ptr + n * stride_mn + tt, mask=tmask, other=0) != 0)
            # a = g^T tile [BM, BK] (out x tokens), b = x tile [BK, BN] (tokens x in)
            a = tl.load(g_base + (tt[None, :] * stride_gt + rm[:, None]),
                        mask=mmask[:, None] & tmask[None, :], other=0.0)
            b = tl.load(x_base + (tt[:, None] * stride_xt + rn[None, :]),
                        mask=tmask[:, None] & nmask[None, :], other=0.0)
            if TOKEN:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
                acc = tl.dot(a * a, b * b, acc, input_precision=PRECISION)
            elif UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, b, acc)
        if not TOKEN:
            acc = acc * acc
        ok = tl.abs(acc) < float("inf")  # false for inf and nan
        acc_f += tl.where(ok, acc, 0.0)
        bad = tl.maximum(bad, tl.max((~ok).to(tl.int32), axis=1))
    tile = rm.to(tl.int64)[:, None] * IN + rn[None, :]
    tmask2 = mmask[:, None] & nmask[None, :]
    if SPLIT:
        tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * OUT * IN + tile, acc_f, mask=tmask2)
    else:
        old = tl.load(f_ptr + tile, mask=tmask2, other=0.0)
        new = (old.to(tl.float32) + acc_f * tl.cast(scale, tl.float32)).to(f_ptr.dtype.element_ty)
        fin = tl.abs(new.to(tl.float32)) < float("inf")  # the sum or the add can overflow: keep the old F
        tl.store(f_ptr + tile, tl.where(fin, new, old), mask=tmask2)
        bad = tl.maximum(bad, tl.max((~fin & tmask2).to(tl.int32), axis=1))
    nbad = tl.max(bad, axis=0)
    tl.store(flag_ptr, 1.0, mask=nbad != 0)


@triton.jit
def _finish_kernel(f_ptr, ws_ptr, flag_ptr, numel, splits, scale, BLOCK: tl.constexpr):
    """F += scale * sum_s ws[s] (fixed order); an element whose update overflows keeps F and sets the flag."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(ws_ptr + s * numel + offs, mask=mask, other=0.0)
    old = tl.load(f_ptr + offs, mask=mask, other=0.0)
    new = (old.to(tl.float32) + acc * tl.cast(scale, tl.float32)).to(f_ptr.dtype.element_ty)
    fin = tl.abs(new.to(tl.float32)) < float("inf")
    tl.store(f_ptr + offs, tl.where(fin, new, old), mask=mask)
    tl.store(flag_ptr, 1.0, mask=tl.max((~fin & mask).to(tl.int32), axis=0) != 0)


def _cfg_key(dtype: torch.dtype, token_level: bool, vec: int) -> str:
    if token_level or dtype == torch.float32:
        return "fp32" if vec > 1 else "fp32_vec1"
    return "16bit"


def _config(x: torch.Tensor, token_level: bool, vec: int):
    """``((BM, BN, BK, warps, stages), upcast, input_precision)``."""
    if x.device.type != "cuda" or _backend.triton_interpreting():
        return _CFG["interp"], True, "ieee"
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    key = _cfg_key(x.dtype, token_level, vec)
    return _CFG[key], key != "16bit", precision


def _aligned(*ts) -> bool:
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0 and t.shape[2] % 8 == 0
               for t in ts)


def _num_splits(n: int, tiles: int, fisher: torch.Tensor, splits) -> int:
    if splits is not None:
        return max(1, min(int(splits), n))
    if fisher.device.type != "cuda" or n <= 1:
        return 1
    target = 2 * torch.cuda.get_device_properties(fisher.device).multi_processor_count
    if tiles >= target:
        return 1
    # workspace capped at ~2x the float32 size of F (at least 16 MiB: negligible for the small layers that
    # need it, e.g. LoRA factors)
    cap = max(2, (16 << 20) // max(fisher.numel() * 4, 1))
    return max(1, min(n, triton.cdiv(target, tiles), cap))


def linear_persample_sq_grad_(fisher: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, mask, scale: float,
                              token_level: bool, *, splits=None) -> torch.Tensor:
    """Host launcher (validated inputs: fisher [out, in] contiguous, x [N, T, in], grad_out [N, T, out])."""
    flag = torch.zeros((), dtype=torch.float32, device=fisher.device)
    n, t, d_in = x.shape
    d_out = grad_out.shape[-1]
    if n == 0 or t == 0 or fisher.numel() == 0:
        return flag
    if x.stride(-1) != 1:
        x = x.contiguous()
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if t == 1:
        token_level = True  # G_n^2 = (g_n^2)(x_n^2)^T: identical math, the squared-operand path
    vec = 8 if _aligned(x, grad_out) else 1
    (bm, bn, bk, warps, stages), upcast, precision = _config(x, token_level, vec)
    tiles = triton.cdiv(d_out, bm) * triton.cdiv(d_in, bn)
    s = _num_splits(n, tiles, fisher, splits)
    per_split = triton.cdiv(n, s)
    s = triton.cdiv(n, per_split)
    ws = torch.empty((s, d_out, d_in), dtype=torch.float32, device=fisher.device) if s > 1 else fisher
    m = mask.to(torch.int8).contiguous() if mask is not None else flag.view(1).view(torch.int8)
    _persample_sq_grad_kernel[(tiles, s)](
        fisher, x, grad_out, m, ws, flag, n, t, d_out // vec, d_in // vec,
        x.stride(0) // vec, x.stride(1) // vec, grad_out.stride(0) // vec, grad_out.stride(1) // vec,
        m.stride(0) if mask is not None else 0, per_split, float(scale),
        TOKEN=bool(token_level), HAS_MASK=mask is not None, SPLIT=s > 1, UPCAST=upcast, PRECISION=precision,
        VEC=vec,
        BM=bm, BN=bn, BK=bk, GROUP=GROUP_M, num_warps=warps, num_stages=stages)
    if s > 1:
        numel = fisher.numel()
        _finish_kernel[(triton.cdiv(numel, FINISH_BLOCK),)](fisher, ws, flag, numel, s, float(scale),
                                                            BLOCK=FINISH_BLOCK, num_warps=4)
    return flag


# ---- ahead-of-time compile specs: every variant the GPU launcher can produce --------------------------------
def _aot_specs() -> list:
    specs = []
    variants = [  # (input dtype, token, mask, split, state dtype, VEC)
        (torch.bfloat16, False, False, False, torch.float32, 8), (torch.bfloat16, False, True, True, torch.float32, 8),
        (torch.float16, False, True, False, torch.bfloat16, 8), (torch.bfloat16, False, True, False, torch.bfloat16, 8),
        (torch.bfloat16, False, True, False, torch.float32, 1), (torch.float32, False, True, False, torch.float32, 8),
        (torch.bfloat16, True, True, False, torch.float32, 8), (torch.float32, True, False, True, torch.bfloat16, 8),
        (torch.float32, True, True, False, torch.float32, 1),
    ]
    for dt, token, has_mask, split, state, vec in variants:
        bm, bn, bk, warps, stages = _CFG[_cfg_key(dt, token, vec)]
        upcast = token or dt == torch.float32
        for precision in (("tf32x3", "tf32") if upcast else ("tf32x3",)):
            sig = {"f_ptr": "*" + _TY[state], "x_ptr": "*" + _TY[dt], "g_ptr": "*" + _TY[dt], "m_ptr": "*i8",
                   "ws_ptr": "*fp32", "flag_ptr": "*fp32", "N": "i32", "T": "i32", "OUT": "i32", "IN": "i32",
                   "stride_xn": "i64", "stride_xt": "i32", "stride_gn": "i64", "stride_gt": "i32",
                   "stride_mn": "i64", "per_split": "i32", "scale": "fp32",
                   "TOKEN": "constexpr", "HAS_MASK": "constexpr", "SPLIT": "constexpr", "UPCAST": "constexpr",
                   "PRECISION": "constexpr", "VEC": "constexpr", "BM": "constexpr", "BN": "constexpr",
                   "BK": "constexpr", "GROUP": "constexpr"}
            const = {"TOKEN": token, "HAS_MASK": has_mask, "SPLIT": split, "UPCAST": upcast,
                     "PRECISION": precision, "VEC": vec, "BM": bm, "BN": bn, "BK": bk, "GROUP": GROUP_M}
            desc = (f"{'token' if token else 'sample'} x={_TY[dt]} F={_TY[state]} mask={int(has_mask)} "
                    f"split={int(split)} vec={vec}" + (f" {precision}" if upcast else ""))
            specs.append(AotSpec(_persample_sq_grad_kernel, sig, const, desc,
                                 {"num_warps": warps, "num_stages": stages}))
    for state in (torch.float32, torch.bfloat16):
        sig = {"f_ptr": "*" + _TY[state], "ws_ptr": "*fp32", "flag_ptr": "*fp32", "numel": "i64",
               "splits": "i32", "scale": "fp32", "BLOCK": "constexpr"}
        specs.append(AotSpec(_finish_kernel, sig, {"BLOCK": FINISH_BLOCK}, f"finish F={_TY[state]}",
                             {"num_warps": 4}))
    return specs


AOT_SPECS = _aot_specs()
