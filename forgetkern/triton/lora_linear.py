"""Triton LoRA linear: fused forward and backward for ``y_l = x W_l^T + b_l + sum_k s_k drop_k(x) A_k^T B_k^T``.

Same signatures and semantics as ``forgetkern.reference.lora_linear`` (see there). Kernels:

* ``_rows_kernel``  C[M, Q] = drop(X)[M, Kd] @ Y[Kd, Q] (* column scale): ``xa = drop(x) A^T`` (one launch for
  all adapters without dropout: ``x [A_1 | A_2 ...]^T``) and ``g = s * dy B`` [M, r] in the backward.
* ``_fwd_kernel``   y tile = x W^T tile + (xa * s) B^T tile + bias, one pass, one output buffer.
* ``_dx_kernel``    dx tile = dy W tile + sum over LoRA segments of (g A) tile, each dropout segment masked
  by its regenerated keep mask (the mask is never stored).
* ``_tn_kernel``    C[P, Q] = drop(L)^T R (* column scale on R), reduced over the M rows, split over M into
  fp32 partials when the tile grid is too small: ``dA^T = drop(x)^T g`` and ``dB = dy^T (xa * s)``.

All math accumulates in fp32; 16-bit operands feed the tensor cores (HMMA on sm_80, HGMMA/wgmma on sm_90).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forgetkern import _backend
from forgetkern.reference.lora_linear import keep_scale, keep_threshold
from forgetkern.triton._dropout import dot, keep_tile, scale_cast
from forgetkern.triton._jit import AlignedPair

BR = 16  # LoRA rank chunk in the fused kernels (any rank; loops over chunks of 16)


def _rows_kernel(x_ptr, y_ptr, c_ptr, scale_ptr, M, Q, KD, stride_xm, stride_yk, stride_yq, stride_cm,
                 key, thresh, drop_scale,
                 DROPOUT: tl.constexpr, COL_SCALE: tl.constexpr, BM: tl.constexpr, BQ: tl.constexpr,
                 BK: tl.constexpr, DOT_F32: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rq = tl.program_id(1) * BQ + tl.arange(0, BQ)
    rk = tl.arange(0, BK)
    mmask, qmask = rm < M, rq < Q
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BM, BQ), dtype=tl.float32)
    for k0 in range(0, KD, BK):
        kk = k0 + rk
        kmask = kk < KD
        xt = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        if DROPOUT:
            keep = keep_tile(key, thresh, rm, kk)
            xt = scale_cast(xt, tl.where(keep, drop_scale, 0.0), x_ptr.dtype.element_ty)
        yt = tl.load(y_ptr + kk[:, None] * stride_yk + rq[None, :] * stride_yq,
                     mask=kmask[:, None] & qmask[None, :], other=0.0)
        acc = dot(xt, yt, acc, DOT_F32)
    if COL_SCALE:
        acc = acc * tl.load(scale_ptr + rq, mask=qmask, other=0.0)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rq[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & qmask[None, :])


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped order: GROUP_M row tiles share their column tiles of the weight while they sit in L2
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    return first_m + (pid % size_m), (pid % (GROUP_M * n_n)) // size_m


def _fwd_kernel(x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, scale_ptr, y_ptr, M, N, K, R,
                stride_xm, stride_wn, stride_xam, stride_bn, stride_ym,
                HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                BR: tl.constexpr, GROUP_M: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask, nmask = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        kmask = kk < K
        xt = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_cols + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = dot(xt, wt, acc, DOT_F32)
    # LoRA: the rank-r product xa, scaled per column by s_k, times B^T, into the same accumulator
    rr0 = tl.arange(0, BR)
    for r0 in range(0, R, BR):
        rr = r0 + rr0
        rmask = rr < R
        xat = tl.load(xa_ptr + rm.to(tl.int64)[:, None] * stride_xam + rr[None, :],
                      mask=mmask[:, None] & rmask[None, :], other=0.0)
        s = tl.load(scale_ptr + rr, mask=rmask, other=0.0)
        xat = scale_cast(xat, s[None, :], xa_ptr.dtype.element_ty)
        bt = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None], mask=rmask[:, None] & nmask[None, :],
                     other=0.0)
        acc = dot(xat, bt, acc, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def _dx_kernel(dy_ptr, w_ptr, g_ptr, a_ptr, seg_ptr, seg_scale_ptr, dx_ptr, M, N, K, n_seg,
               stride_dym, stride_wn, stride_gm, stride_am, stride_dxm,
               ACCUM: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROP: tl.constexpr, BM: tl.constexpr,
               BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
               DOT_F32: tl.constexpr):
    pid_m, pid_k = _tile_ids(M, K, BM, BK, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    rn = tl.arange(0, BN)
    mmask, kmask = rm < M, rk < K
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * stride_dym
    for n0 in range(0, N, BN):
        nn = n0 + rn
        nmask = nn < N
        dyt = tl.load(dy_rows + nn[None, :], mask=mmask[:, None] & nmask[None, :], other=0.0)
        wt = tl.load(w_ptr + nn.to(tl.int64)[:, None] * stride_wn + rk[None, :],
                     mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = dot(dyt, wt, acc, DOT_F32)
    if HAS_LORA:
        rr0 = tl.arange(0, BR)
        for si in range(0, n_seg):
            c0 = tl.load(seg_ptr + 4 * si)
            r = tl.load(seg_ptr + 4 * si + 1)
            if HAS_DROP:
                part = tl.zeros((BM, BK), dtype=tl.float32)
            for r0 in range(0, r, BR):
                rmask = (r0 + rr0) < r
                rr = c0 + r0 + rr0
                gt = tl.load(g_ptr + rm.to(tl.int64)[:, None] * stride_gm + rr[None, :],
                             mask=mmask[:, None] & rmask[None, :], other=0.0)
                at = tl.load(a_ptr + rr[:, None] * stride_am + rk[None, :], mask=rmask[:, None] & kmask[None, :],
                             other=0.0)
                if HAS_DROP:
                    part = dot(gt, at, part, DOT_F32)
                else:
                    acc = dot(gt, at, acc, DOT_F32)
            if HAS_DROP:  # plain segments carry threshold 0 (keep all) and scale 1
                keep = keep_tile(tl.load(seg_ptr + 4 * si + 2), tl.load(seg_ptr + 4 * si + 3), rm, rk)
                acc += tl.where(keep, part * tl.load(seg_scale_ptr + si), 0.0)
    # the output tile's addresses only now: live across the loops they cost a register per element when dx is
    # not 16-byte aligned (ACCUM then reads the previous layers' sum here too, not before the loops)
    out = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rk[None, :]
    omask = mmask[:, None] & kmask[None, :]
    if ACCUM:
        acc += tl.load(out, mask=omask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=omask)


def _tn_kernel(l_ptr, r_ptr, scale_ptr, c_ptr, M, P, Q, m_per_split,
               stride_lm, stride_rm, stride_cs, stride_cp, stride_cq, key, thresh, drop_scale,
               DROPOUT: tl.constexpr, COL_SCALE: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
               BM: tl.constexpr, DOT_F32: tl.constexpr):
    rp = tl.program_id(0) * BP + tl.arange(0, BP)
    rq = tl.program_id(1) * BQ + tl.arange(0, BQ)
    m_lo = tl.program_id(2) * m_per_split
    rm0 = tl.arange(0, BM)
    pmask, qmask = rp < P, rq < Q
    if COL_SCALE:
        s = tl.load(scale_ptr + rq, mask=qmask, other=0.0)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for i in range(0, m_per_split, BM):
        mm = m_lo + i + rm0
        mmask = (mm < M) & ((i + rm0) < m_per_split)
        lt = tl.load(l_ptr + mm.to(tl.int64)[None, :] * stride_lm + rp[:, None],
                     mask=pmask[:, None] & mmask[None, :], other=0.0)          # [BP, BM] = L^T tile
        if DROPOUT:
            keep = tl.trans(keep_tile(key, thresh, mm, rp))
            lt = scale_cast(lt, tl.where(keep, drop_scale, 0.0), l_ptr.dtype.element_ty)
        rt = tl.load(r_ptr + mm.to(tl.int64)[:, None] * stride_rm + rq[None, :],
                     mask=mmask[:, None] & qmask[None, :], other=0.0)
        if COL_SCALE:
            rt = scale_cast(rt, s[None, :], r_ptr.dtype.element_ty)
        acc = dot(lt, rt, acc, DOT_F32)
    out = c_ptr + tl.program_id(2).to(tl.int64) * stride_cs + rp[:, None] * stride_cp + rq[None, :] * stride_cq
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=pmask[:, None] & qmask[None, :])


# ---- JIT specialisations and configurations -------------------------------------------------------------
# A kernel runs ``aligned`` when every hinted argument (those of the wide loads) is 16-divisible, else ``unaligned``
# (no hints; see ``_jit``). Rank-sized arguments are never hinted: a rank of 8 would force the unaligned path.
_ROWS = AlignedPair(_rows_kernel, ("x_ptr", "y_ptr", "KD", "stride_xm", "stride_yq"), ("M", "key", "thresh"))
_FWD = AlignedPair(_fwd_kernel, ("x_ptr", "w_ptr", "bias_ptr", "y_ptr", "N", "K", "stride_xm", "stride_wn",
                                 "stride_ym"), ("M",))
_DX = AlignedPair(_dx_kernel, ("dy_ptr", "w_ptr", "a_ptr", "dx_ptr", "N", "K", "stride_dym", "stride_wn",
                               "stride_am", "stride_dxm"), ("M", "n_seg"))
_TN = AlignedPair(_tn_kernel, ("l_ptr", "c_ptr", "P", "stride_lm"), ("M", "key", "thresh"))

# fwd (BM, BN, BK, warps, stages), dx (BM, BK, BN, ...): rows, output columns, reduction block. rows / tn
# (BM, BK, ...) / (BP, BM, ...): the long side and the reduction block; the rank side is 16 (r <= 16) or 64.
# Unaligned, each element is a scalar load with its own address, pipelined in registers (no cp.async): narrower
# tiles and fewer stages keep them in the register file (zero spills: AOT_SPECS). fp32 (FMA dots: operands held
# in registers along the whole reduction block): short reduction blocks.
_BIG = {("sm90", True): (128, 128, 64, 8, 4), ("sm80", True): (128, 128, 32, 8, 4),
        ("sm90", False): (128, 64, 32, 8, 2), ("sm80", False): (128, 64, 32, 8, 2),
        "fp32": (32, 64, 16, 4, 3), "interp": (32, 32, 32, 4, 1)}
_SKINNY = {("sm90", True): (128, 64, 8, 3), ("sm80", True): (128, 64, 8, 3),
           ("sm90", False): (128, 32, 8, 2), ("sm80", False): (128, 32, 8, 2),
           "fp32": (64, 8, 4, 3), "interp": (32, 32, 4, 1)}
_CFG = {"fwd": _BIG, "dx": _BIG, "rows": _SKINNY, "tn": _SKINNY}
GROUP_M = 8


def _arch(x: torch.Tensor) -> str:
    if x.device.type != "cuda" or _backend.triton_interpreting():
        return "interp"
    if x.dtype == torch.float32:
        return "fp32"
    return "sm90" if torch.cuda.get_device_capability(x.device)[0] >= 9 else "sm80"


def _select(pair: AlignedPair, kind: str, arch: str, **values):
    """The specialisation the argument values allow (``values``: every hinted argument) and its config."""
    aligned = pair.holds(**values)
    cfg = _CFG[kind][arch] if arch in ("fp32", "interp") else _CFG[kind][arch, aligned]
    return pair.pick(aligned), cfg


def _i32(key: int) -> int:
    return key - (1 << 32) if key >= (1 << 31) else key


def _rows(x, y, c, scale, yk_stride, yq_stride, key=0, p=0.0):
    """c[M, Q] = drop(x) @ y (y given by strides) * scale[Q] (scale None: 1)."""
    m, kd, q = x.shape[0], x.shape[1], c.shape[1]
    arch = _arch(x)
    kern, (bm, bk, warps, stages) = _select(_ROWS, "rows", arch, x_ptr=x, y_ptr=y, KD=kd, stride_xm=x.stride(0),
                                            stride_yq=yq_stride)
    bq = 16 if q <= 16 else 64  # the rank side of the tile
    kern[(triton.cdiv(m, bm), triton.cdiv(q, bq))](
        x, y, c, scale if scale is not None else c, m, q, kd, x.stride(0), yk_stride, yq_stride, c.stride(0),
        _i32(key), keep_threshold(p), keep_scale(p), DROPOUT=p > 0, COL_SCALE=scale is not None, BM=bm, BQ=bq,
        BK=bk, DOT_F32=arch in ("fp32", "interp"), num_warps=warps, num_stages=stages)


def _tn(lhs, rhs, out_pq_strides, out, scale=None, key=0, p=0.0):
    """out[P, Q] (given by its strides) = drop(lhs)^T @ (rhs * scale) over the M rows; returns out."""
    m, pdim, qdim = lhs.shape[0], lhs.shape[1], rhs.shape[1]
    arch = _arch(lhs)
    # c_ptr: out, or a fresh (aligned) fp32 buffer of split-M partials
    kern, (bp, bm, warps, stages) = _select(_TN, "tn", arch, l_ptr=lhs, c_ptr=out, P=pdim, stride_lm=lhs.stride(0))
    bq = 16 if qdim <= 16 else 64
    tiles = triton.cdiv(pdim, bp) * triton.cdiv(qdim, bq)
    sms = 132 if arch == "sm90" else 108
    split = 1 if arch == "interp" else max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(m, 4 * bm)))
    m_per = triton.cdiv(triton.cdiv(max(m, 1), split), bm) * bm
    split = triton.cdiv(max(m, 1), m_per)
    dst = out if split == 1 else torch.empty((split, out.numel()), dtype=torch.float32, device=out.device)
    cs = 0 if split == 1 else dst.stride(0)
    kern[(triton.cdiv(pdim, bp), triton.cdiv(qdim, bq), split)](
        lhs, rhs, scale if scale is not None else rhs, dst, m, pdim, qdim, m_per, lhs.stride(0), rhs.stride(0),
        cs, out_pq_strides[0], out_pq_strides[1], _i32(key), keep_threshold(p), keep_scale(p),
        DROPOUT=p > 0, COL_SCALE=scale is not None, BP=bp, BQ=bq, BM=bm, DOT_F32=arch in ("fp32", "interp"),
        num_warps=warps, num_stages=stages)
    if split > 1:
        out.view(-1).copy_(dst.sum(0))
    return out


def _runs(layer, dropout_p):
    """Maximal runs of consecutive adapters: ``(first, last+1)`` with the same layer (for B/dB) and the
    runs of consecutive adapters without dropout (for the shared x A^T / dA GEMMs)."""
    by_layer, plain, n = [], [], len(layer)
    for k in range(n):
        if by_layer and layer[by_layer[-1][0]] == layer[k]:
            by_layer[-1][1] = k + 1
        else:
            by_layer.append([k, k + 1])
        if dropout_p[k] <= 0:
            if plain and plain[-1][1] == k:
                plain[-1][1] = k + 1
            else:
                plain.append([k, k + 1])
    return by_layer, plain


def _cat(ts, dim):
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def _colscale(scaling, lora_a, lo, hi, device):
    return torch.cat([torch.full((lora_a[k].shape[0],), float(scaling[k]), dtype=torch.float32, device=device)
                      for k in range(lo, hi)])


def lora_linear_fwd(x, weights, biases, bias_layer, lora_a, lora_b, layer, scaling, dropout_p, keys):
    m, n_ad = x.shape[0], len(lora_a)
    offs = [sum(a.shape[0] for a in lora_a[:k]) for k in range(n_ad + 1)]
    xa = x.new_empty((m, offs[-1]))
    by_layer, plain = _runs(layer, dropout_p)
    if m > 0:
        for lo, hi in plain:
            if offs[hi] > offs[lo]:
                a_cat = _cat([lora_a[k] for k in range(lo, hi)], 0)
                _rows(x, a_cat, xa[:, offs[lo]:offs[hi]], None, 1, a_cat.stride(0))
        for k in range(n_ad):
            if dropout_p[k] > 0 and lora_a[k].shape[0] > 0:
                _rows(x, lora_a[k], xa[:, offs[k]:offs[k + 1]], None, 1, lora_a[k].stride(0), keys[k], dropout_p[k])
    ys = []
    arch = _arch(x)
    for li, w in enumerate(weights):
        n_out, k_in = w.shape
        runs = [(lo, hi) for lo, hi in by_layer if layer[lo] == li and offs[hi] > offs[lo]]
        if len(runs) == 1:
            lo, hi = runs[0]
            xa_l = xa[:, offs[lo]:offs[hi]]
        else:  # the layer's adapters are not adjacent in the list: gather their columns (rank-sized copy)
            xa_l = _cat([xa[:, offs[lo]:offs[hi]] for lo, hi in runs], 1) if runs else xa[:, :0]
        ks = [k for lo, hi in runs for k in range(lo, hi)]
        r_l = xa_l.shape[1]
        b_cat = _cat([lora_b[k] for k in ks], 1) if ks else w
        scale = (torch.cat([_colscale(scaling, lora_a, k, k + 1, x.device) for k in ks]) if ks
                 else torch.empty(0, dtype=torch.float32, device=x.device))
        bias = biases[bias_layer.index(li)] if li in bias_layer else w  # w: not read (HAS_BIAS False)
        y = x.new_empty((m, n_out))
        if m > 0 and n_out > 0:
            kern, (bm, bn, bk, warps, stages) = _select(_FWD, "fwd", arch, x_ptr=x, w_ptr=w, bias_ptr=bias, y_ptr=y,
                                                        N=n_out, K=k_in, stride_xm=x.stride(0),
                                                        stride_wn=w.stride(0), stride_ym=y.stride(0))
            kern[(triton.cdiv(m, bm) * triton.cdiv(n_out, bn),)](
                x, w, bias, xa_l, b_cat, scale, y, m, n_out, k_in, r_l, x.stride(0), w.stride(0), xa_l.stride(0),
                b_cat.stride(0), y.stride(0), HAS_BIAS=li in bias_layer, BM=bm, BN=bn, BK=bk, BR=BR,
                GROUP_M=GROUP_M, DOT_F32=arch in ("fp32", "interp"), num_warps=warps, num_stages=stages)
        ys.append(y)
    return ys, xa


def lora_linear_bwd(dys, x, weights, lora_a, lora_b, xa, layer, scaling, dropout_p, keys,
                    need_dx, need_da, need_db):
    m, k_in, n_ad = x.shape[0], x.shape[1], len(lora_a)
    offs = [sum(a.shape[0] for a in lora_a[:k]) for k in range(n_ad + 1)]
    by_layer, plain = _runs(layer, dropout_p)
    empty = x.new_empty((0,))
    d_a, d_b, dx = [empty] * n_ad, [empty] * n_ad, empty
    if need_db:
        d_b = [torch.zeros_like(b) for b in lora_b]
        for lo, hi in by_layer:
            if offs[hi] > offs[lo] and m > 0:
                dy = dys[layer[lo]]
                out = torch.empty((dy.shape[1], offs[hi] - offs[lo]), dtype=x.dtype, device=x.device)
                _tn(dy, xa[:, offs[lo]:offs[hi]], (out.stride(0), 1), out,
                    _colscale(scaling, lora_a, lo, hi, x.device))
                for k in range(lo, hi):
                    # a copy, never a view of ``out``: with one output row the column slice is contiguous
                    # already, and .contiguous() would return aliasing views (refused by the custom op)
                    d_b[k] = out if hi - lo == 1 else out[:, offs[k] - offs[lo]:offs[k + 1] - offs[lo]].clone(
                        memory_format=torch.contiguous_format)
    if not (need_dx or need_da):
        return dx, d_a, d_b
    g = x.new_empty((m, offs[-1]))
    if m > 0:
        for lo, hi in by_layer:
            if offs[hi] > offs[lo]:
                b_cat = _cat([lora_b[k] for k in range(lo, hi)], 1)
                _rows(dys[layer[lo]], b_cat, g[:, offs[lo]:offs[hi]], _colscale(scaling, lora_a, lo, hi, x.device),
                      b_cat.stride(0), 1)
    if need_da:
        d_a = [torch.zeros_like(a) for a in lora_a]
        if m > 0:
            for lo, hi in plain:
                if offs[hi] > offs[lo]:
                    out = torch.empty((offs[hi] - offs[lo], k_in), dtype=x.dtype, device=x.device)
                    _tn(x, g[:, offs[lo]:offs[hi]], (1, out.stride(0)), out)   # dA^T = x^T g
                    for k in range(lo, hi):
                        d_a[k] = out if hi - lo == 1 else out[offs[k] - offs[lo]:offs[k + 1] - offs[lo]].clone()
            for k in range(n_ad):
                if dropout_p[k] > 0 and lora_a[k].shape[0] > 0:
                    _tn(x, g[:, offs[k]:offs[k + 1]], (1, k_in), d_a[k], None, keys[k], dropout_p[k])
    if need_dx:
        dx = x.new_empty((m, k_in))
        segs, seg_scale = [], []
        for lo, hi in plain:
            if offs[hi] > offs[lo]:
                segs.append([offs[lo], offs[hi] - offs[lo], 0, 0])
                seg_scale.append(1.0)
        for k in range(n_ad):
            if dropout_p[k] > 0 and lora_a[k].shape[0] > 0:
                segs.append([offs[k], lora_a[k].shape[0], _i32(keys[k]), keep_threshold(dropout_p[k])])
                seg_scale.append(keep_scale(dropout_p[k]))
        seg_t = torch.tensor(segs or [[0, 0, 0, 0]], dtype=torch.int32).to(x.device, non_blocking=True)
        scale_t = torch.tensor(seg_scale or [1.0], dtype=torch.float32).to(x.device, non_blocking=True)
        a_cat = _cat(list(lora_a), 0) if n_ad else x.new_empty((0, k_in))
        arch = _arch(x)
        if m > 0 and k_in > 0:
            for li, (dy, w) in enumerate(zip(dys, weights)):
                lora = li == 0 and bool(segs)
                stride_am = max(a_cat.stride(0), 1)
                kern, (bm, bk, bn, warps, stages) = _select(
                    _DX, "dx", arch, dy_ptr=dy, w_ptr=w, a_ptr=a_cat, dx_ptr=dx, N=w.shape[0], K=k_in,
                    stride_dym=dy.stride(0), stride_wn=w.stride(0), stride_am=stride_am, stride_dxm=dx.stride(0))
                kern[(triton.cdiv(m, bm) * triton.cdiv(k_in, bk),)](
                    dy, w, g, a_cat, seg_t, scale_t, dx, m, w.shape[0], k_in, len(segs), dy.stride(0), w.stride(0),
                    g.stride(0), stride_am, dx.stride(0), ACCUM=li > 0, HAS_LORA=lora,
                    HAS_DROP=lora and any(d > 0 for d in dropout_p), BM=bm, BK=bk, BN=bn, BR=BR, GROUP_M=GROUP_M,
                    DOT_F32=arch in ("fp32", "interp"), num_warps=warps, num_stages=stages)
        elif m > 0:
            dx.zero_()
    return dx, d_a, d_b


# ---- ahead-of-time compile specs: every GPU launch of the launchers above on sm_80 / sm_90, in both the aligned
# and the unaligned specialisation; a launch both archs make with the same config is listed once ------------------
_TILE = {"fwd": ("BM", "BN", "BK"), "dx": ("BM", "BK", "BN"), "rows": ("BM", "BK"), "tn": ("BP", "BM")}


def _aot_specs() -> list:
    found = {}

    def add(pair, kind, variant, types, ones=(), **fixed):
        for aligned in (True, False):
            for arch in ("sm80", "sm90"):
                f32 = types[pair.args[0]] == "*fp32"  # fp32 inputs: the "fp32" config
                *tile, warps, stages = _CFG[kind]["fp32" if f32 else (arch, aligned)]
                ce = {**dict(zip(_TILE[kind], tile)), **fixed, "DOT_F32": f32}
                key = (pair, variant, tuple(tile), warps, stages, aligned)
                found.setdefault(key, [types, ce, ones, []])[-1].append(arch)

    for dt in ("fp16", "bf16", "fp32"):
        t, f32 = "*" + dt, "*fp32"
        for bias in (True, False):
            add(_FWD, "fwd", f"fwd {dt} bias={bias}", dict.fromkeys(_FWD.args[:7], t) | {"scale_ptr": f32},
                HAS_BIAS=bias, BR=BR, GROUP_M=GROUP_M)
        for acc, lora, drop in ((False, True, False), (False, True, True), (True, False, False),
                                (False, False, False)):
            add(_DX, "dx", f"dx {dt} acc={acc} lora={lora} drop={drop}",
                dict.fromkeys(_DX.args[:7], t) | {"seg_ptr": "*i32", "seg_scale_ptr": f32},
                ACCUM=acc, HAS_LORA=lora, HAS_DROP=drop, BR=BR, GROUP_M=GROUP_M)
        for bq in (16, 64):
            # xa = drop(x) A^T (y = A: stride_yk 1), g = (dy B) * s (y = B: stride_yq 1); no scale: c passed
            for drop, colscale, one in ((False, False, "stride_yk"), (True, False, "stride_yk"),
                                        (False, True, "stride_yq")):
                add(_ROWS, "rows", f"rows {dt} bq={bq} drop={drop} colscale={colscale} {one}=1",
                    dict.fromkeys(_ROWS.args[:4], t) | {"scale_ptr": f32 if colscale else t, "drop_scale": "fp32"},
                    (one,), DROPOUT=drop, COL_SCALE=colscale, BQ=bq)
            # dB = dy^T (xa * s) (c [N, r]: stride_cq 1), dA^T = drop(x)^T g (c [r, K]: stride_cp 1); split-M: fp32
            for drop, colscale, one in ((False, True, "stride_cq"), (False, False, "stride_cp"),
                                        (True, False, "stride_cp")):
                for out in dict.fromkeys(("fp32", dt)):
                    add(_TN, "tn", f"tn {dt}->{out} bq={bq} drop={drop} colscale={colscale} {one}=1",
                        {"l_ptr": t, "r_ptr": t, "scale_ptr": f32 if colscale else t, "c_ptr": "*" + out,
                         "drop_scale": "fp32"}, (one,), DROPOUT=drop, COL_SCALE=colscale, BQ=bq)
    return [pair.spec(types, ce, f"{variant} {'+'.join(archs)} {'x'.join(map(str, tile))} w{warps}s{stages}",
                      {"num_warps": warps, "num_stages": stages}, aligned, ones)
            for (pair, variant, tile, warps, stages, aligned), (types, ce, ones, archs) in found.items()]


AOT_SPECS = _aot_specs()
