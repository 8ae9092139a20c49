"""Pure-PyTorch LoRA linear (``lora_linear_fwd`` / ``lora_linear_bwd``): the oracle and the CPU fallback.

One call serves ``L`` sibling layers that read the same input ``x`` [M, K] (L = 1 for a plain layer).
Adapter ``k`` belongs to layer ``layer[k]`` and contributes to that layer's output::

    y_l = x W_l^T + b_l + sum_{k: layer[k] = l} s_k * (drop_k(x) A_k^T B_k^T + lora_bias_k)

(``lora_bias_k`` is the bias of PEFT's ``lora_B`` linear, so it is scaled like the rest of the branch; the
op layer folds it into the layer's bias vector before calling a backend.)
``xa`` = [drop_1(x) A_1^T | drop_2(x) A_2^T | ...] [M, sum r_k] is returned for the backward; it is the only
x-sized-by-rank tensor saved. Adapters without active dropout share one GEMM ``x [A_1 | A_2 | ...]^T``
(horizontal fusion); an adapter with dropout needs its own GEMM since its masked input differs.

Dropout masks come from a counter-based hash of (key, row, column) (:func:`keep_mask`), implemented bit for
bit identically in Triton (``forgetkern/triton/lora_linear.py``) and C++ (``csrc/include/forgetkern/
lora_linear.h``): every backend drops the same elements for the same seed, and the backward regenerates the
mask instead of storing it. :func:`keep_mask_int64` defines the hash in exact int64 arithmetic; the fast
path computes the same bits in int32 (wrap-around ``+``/``*``, masked shifts), one cache-sized row block at a time.

The dropout reaches the GEMMs through a masker (``masker=`` of :func:`lora_linear_fwd` / :func:`lora_linear_bwd`),
one per adapter and call, built as ``masker(key, p, x)``; for a row block ``r0:r1`` of x (:func:`_blocks`):

* ``blk = mk.block(r0, r1)``: whatever the masker needs for those rows (:class:`_Masker`: the drop mask);
* ``mk.apply(v, blk)``: a new tensor ``drop(v) = v * keep / (1 - p)`` for ``v`` of the block's shape, rounded as
  ``(v * (1 / (1 - p))).masked_fill_(~keep, 0)`` in v's dtype;
* ``mk.add_(dst, v, blk)``: ``dst += drop(v)`` (``drop(v)`` rounded as above, then the add).

:class:`_Masker` (pure torch) is the default; ``forgetkern/cpu/lora_linear.py`` passes one backed by a fused C++
kernel, bit-identical.
"""

from __future__ import annotations

import math
from typing import List

import torch

M32 = 0xFFFFFFFF
ROW_MUL = 0x9E3779B9   # key + row * ROW_MUL, then mixed: one 32-bit state per row
COL_MUL = 0x85EBCA77   # row state + col * COL_MUL, then mixed: the element's 32-bit hash
MIX_MUL1 = 0x21F0AAAD  # both multipliers < 2^31: products with 32-bit values stay below 2^63 in int64
MIX_MUL2 = 0x735A2D97


def mix32(h: int) -> int:
    """32-bit finaliser (xorshift-multiply, two rounds) on a Python int in [0, 2^32)."""
    h ^= h >> 16
    h = (h * MIX_MUL1) & M32
    h ^= h >> 15
    h = (h * MIX_MUL2) & M32
    return h ^ (h >> 15)


def _mix32_(h: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` in place on an int64 tensor of values in [0, 2^32)."""
    h.bitwise_xor_(h >> 16).mul_(MIX_MUL1).bitwise_and_(M32)
    h.bitwise_xor_(h >> 15).mul_(MIX_MUL2).bitwise_and_(M32)
    return h.bitwise_xor_(h >> 15)


def dropout_keys(seed: int, n: int) -> List[int]:
    """Per-adapter 32-bit keys derived from a 64-bit seed (adapter ``k`` of a call gets ``keys[k]``)."""
    seed &= (1 << 64) - 1
    lo, hi = seed & M32, seed >> 32
    return [mix32(lo ^ mix32((hi + (k + 1) * ROW_MUL) & M32)) for k in range(n)]


def keep_threshold(p: float) -> int:
    """An element is kept iff ``hash >> 8 >= keep_threshold(p)``: P(keep) = 1 - t / 2^24 with t ~ p 2^24."""
    return int(math.floor(p * 16777216.0 + 0.5))


def keep_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def keep_mask_int64(key: int, p: float, rows: int, cols: int, device=None, row0: int = 0) -> torch.Tensor:
    """The hash's definition in plain int64 arithmetic (exact); :func:`keep_mask` must match it bit for bit."""
    r = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device)
    rh = _mix32_(r.mul_(ROW_MUL).add_(key).bitwise_and_(M32))
    c = torch.arange(cols, dtype=torch.int64, device=device).mul_(COL_MUL)
    h = _mix32_((rh[:, None] + c[None, :]).bitwise_and_(M32))
    return (h >> 8) >= keep_threshold(p)


# The fast path hashes in int32: + and * wrap modulo 2^32 like uint32, and a logical shift right by s is the
# arithmetic one with the top s bits cleared. On CPU x is processed in row blocks of ~_CHUNK elements, so the
# hash state, its scratch and the mask stay in cache across the ~14 passes of the hash.
_CHUNK = 1 << 16
_COLS: dict = {}


def _signed32(t: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the int32 tensor with the same bits."""
    return t.sub_((t >> 31) << 32).to(torch.int32)


def _col_term(cols: int, device) -> torch.Tensor:
    k = (cols, str(device))
    c = _COLS.get(k)
    if c is None:
        c = _signed32(torch.arange(cols, dtype=torch.int64, device=device).mul_(COL_MUL).bitwise_and_(M32))
        if len(_COLS) > 64:
            _COLS.clear()
        _COLS[k] = c
    return c


def _row_hash32(key: int, row0: int, rows: int, device) -> torch.Tensor:
    r = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device)
    return _signed32(_mix32_(r.mul_(ROW_MUL).add_(key).bitwise_and_(M32)))


def _drop_block(rh: torch.Tensor, col: torch.Tensor, thr: int, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Bool [len(rh), len(col)]: the DROPPED elements (``hash >> 8 < thr``); ``h``, ``t`` are int32 scratch."""
    torch.add(rh[:, None], col[None, :], out=h)
    for shift, mask, mul in ((16, 0xFFFF, MIX_MUL1), (15, 0x1FFFF, MIX_MUL2), (15, 0x1FFFF, None)):
        torch.bitwise_right_shift(h, shift, out=t)
        h.bitwise_xor_(t.bitwise_and_(mask))
        if mul is not None:
            h.mul_(mul)
    torch.bitwise_right_shift(h, 8, out=t)
    return t.bitwise_and_(0xFFFFFF) < thr


def _blocks(x: torch.Tensor):
    """Row ranges ``(r0, r1)`` covering x [M, K]: cache-sized blocks on CPU, one block elsewhere."""
    m, k = x.shape
    step = max(1, _CHUNK // max(1, k)) if x.device.type == "cpu" else max(1, m)
    return [(r0, min(m, r0 + step)) for r0 in range(0, m, step)]


class _Masker:
    """The pure-torch masker (module docstring): regenerates one adapter's drop mask block by block, the scratch
    buffers reused across blocks."""

    def __init__(self, key: int, p: float, x: torch.Tensor):
        self.rh = _row_hash32(key, 0, x.shape[0], x.device)
        self.col = _col_term(x.shape[1], x.device)
        self.thr, self.scale = keep_threshold(p), keep_scale(p)
        step = _blocks(x)[0][1] if x.shape[0] else 0
        self.h = torch.empty((step, x.shape[1]), dtype=torch.int32, device=x.device)
        self.t = torch.empty_like(self.h)

    def block(self, r0: int, r1: int) -> torch.Tensor:
        """Bool [r1 - r0, K]: the dropped elements of rows ``r0:r1``."""
        n = r1 - r0
        return _drop_block(self.rh[r0:r1], self.col, self.thr, self.h[:n], self.t[:n])

    def apply(self, v: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """``v * keep / (1 - p)`` (a new tensor) for a block ``v`` of x's shape."""
        return (v * self.scale).masked_fill_(drop, 0)

    def add_(self, dst: torch.Tensor, v: torch.Tensor, drop: torch.Tensor) -> None:
        """``dst += v * keep / (1 - p)``."""
        dst.add_(self.apply(v, drop))


def keep_mask(key: int, p: float, rows: int, cols: int, device=None, row0: int = 0) -> torch.Tensor:
    """Bool [rows, cols]: which elements of x (rows ``row0..``) dropout keeps for ``key`` and rate ``p``."""
    rh = _row_hash32(key, row0, rows, device)
    h = torch.empty((rows, cols), dtype=torch.int32, device=device)
    return _drop_block(rh, _col_term(cols, device), keep_threshold(p), h, torch.empty_like(h)).logical_not_()


def dropped(x: torch.Tensor, key: int, p: float) -> torch.Tensor:
    """drop(x) = x * mask / (1 - p) in x's dtype (the mask regenerated from ``key``)."""
    keep = keep_mask(key, p, x.shape[0], x.shape[1], x.device)
    return x * keep.to(x.dtype) * keep_scale(p)


def _active(p: float) -> bool:
    return p > 0.0


def _groups(lora_a, dropout_p):
    """Column offsets of each adapter in xa, and the indices of adapters without / with active dropout."""
    offs, o = [], 0
    for a in lora_a:
        offs.append(o)
        o += a.shape[0]
    plain = [k for k in range(len(lora_a)) if not _active(dropout_p[k])]
    drop = [k for k in range(len(lora_a)) if _active(dropout_p[k])]
    return offs, o, plain, drop


def _cat(ts: list, dim: int) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def lora_linear_fwd(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                    bias_layer: List[int], lora_a: List[torch.Tensor], lora_b: List[torch.Tensor],
                    layer: List[int], scaling: List[float], dropout_p: List[float], keys: List[int], *,
                    masker=_Masker):
    """Return ``(ys, xa)``. Each ``y_l`` is ONE buffer: addmm(bias, x, W^T), then addmm_ of the LoRA term.

    ``biases[i]`` is the (already combined ``b + sum s_k lora_bias_k``) bias of layer ``bias_layer[i]``;
    ``masker`` computes the dropout (module docstring).
    """
    m = x.shape[0]
    offs, r_total, plain, drop = _groups(lora_a, dropout_p)
    xa = x.new_empty((m, r_total))
    if plain:
        a_cat = _cat([lora_a[k] for k in plain], 0)
        if len(plain) == len(lora_a):
            torch.mm(x, a_cat.t(), out=xa)
        else:
            res, c = x @ a_cat.t(), 0
            for k in plain:
                r = lora_a[k].shape[0]
                xa[:, offs[k]:offs[k] + r].copy_(res[:, c:c + r])
                c += r
    for k in drop:  # drop(x) only ever exists one cache-sized row block at a time
        r, at, mk = lora_a[k].shape[0], lora_a[k].t(), masker(keys[k], dropout_p[k], x)
        for r0, r1 in _blocks(x):
            xa[r0:r1, offs[k]:offs[k] + r].copy_(mk.apply(x[r0:r1], mk.block(r0, r1)) @ at)
    ys = []
    for li, w in enumerate(weights):
        bias = biases[bias_layer.index(li)] if li in bias_layer else None
        y = torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())
        for k in range(len(lora_a)):
            if layer[k] == li and lora_a[k].shape[0] > 0:
                y.addmm_(xa[:, offs[k]:offs[k] + lora_a[k].shape[0]], lora_b[k].t(), alpha=scaling[k])
        ys.append(y)
    return ys, xa


def lora_linear_bwd(dys: List[torch.Tensor], x: torch.Tensor, weights: List[torch.Tensor],
                    lora_a: List[torch.Tensor], lora_b: List[torch.Tensor], xa: torch.Tensor,
                    layer: List[int], scaling: List[float], dropout_p: List[float], keys: List[int],
                    need_dx: bool, need_da: bool, need_db: bool, *, masker=_Masker):
    """Return ``(dx, dA, dB)`` (empty tensors for the ones not needed). Never a weight gradient.

    ``g_k = s_k dy_{layer k} B_k`` [M, r_k] carries the scaling; ``dB_k = s_k dy^T xa_k``,
    ``dA_k = g_k^T drop_k(x)``, ``dx = sum_l dy_l W_l + sum_k drop_k^T(g_k A_k)`` with the plain adapters'
    rank-r products summed in one GEMM ``[g_1 | g_2 | ...] [A_1; A_2; ...]``.
    """
    m, n_ad = x.shape[0], len(lora_a)
    offs, r_total, plain, drop = _groups(lora_a, dropout_p)
    empty = x.new_empty((0,))
    d_b = [empty] * n_ad
    if need_db:
        d_b = [torch.mm(dys[layer[k]].t(), xa[:, offs[k]:offs[k] + lora_a[k].shape[0]]).mul_(scaling[k])
               for k in range(n_ad)]
    d_a, dx = [empty] * n_ad, empty
    if not (need_dx or need_da):
        return dx, d_a, d_b
    g = x.new_empty((m, r_total))
    gk = [g[:, offs[k]:offs[k] + lora_a[k].shape[0]] for k in range(n_ad)]
    for k in range(n_ad):
        if n_ad == 1:
            torch.mm(dys[layer[k]], lora_b[k], out=g)
        else:
            gk[k].copy_(dys[layer[k]] @ lora_b[k])
        gk[k].mul_(scaling[k])
    if need_da:
        d_a = [None] * n_ad
        for k in plain:
            d_a[k] = torch.mm(gk[k].t(), x)
    if need_dx:  # no weights: the LoRA part of dx alone (the mixed-precision path adds the base part itself)
        dx = torch.mm(dys[0], weights[0]) if weights else x.new_zeros(x.shape)
        for li in range(1, len(weights)):
            dx.addmm_(dys[li], weights[li])
        if plain and r_total > 0:
            if len(plain) == n_ad:
                dx.addmm_(g, _cat(list(lora_a), 0))
            else:
                for k in plain:
                    dx.addmm_(gk[k], lora_a[k])
    # each dropout mask is regenerated once, block by block, and serves dA and dx
    for k in drop:
        mk = masker(keys[k], dropout_p[k], x)
        half = x.dtype in (torch.float16, torch.bfloat16)  # blocks' partial sums are added in float32
        acc = x.new_zeros(lora_a[k].shape, dtype=torch.float32 if half else x.dtype) if need_da else None
        for r0, r1 in _blocks(x):
            blk = mk.block(r0, r1)
            if need_da and half:
                acc.add_(torch.mm(gk[k][r0:r1].t(), mk.apply(x[r0:r1], blk)))
            elif need_da:
                acc.addmm_(gk[k][r0:r1].t(), mk.apply(x[r0:r1], blk))
            if need_dx:
                mk.add_(dx[r0:r1], gk[k][r0:r1] @ lora_a[k], blk)
        if need_da:
            d_a[k] = acc.to(x.dtype)
    return dx, d_a, d_b
