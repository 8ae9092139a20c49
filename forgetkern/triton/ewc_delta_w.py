"""Triton ``ewc_delta_w``: EWC penalty of LoRA updates ``s_i B_i A_i`` and its factor gradients, never
materialising ``B_i A_i`` (math in ``forgetkern/ops/ewc_delta_w.py``).

Per layer ``i``: ``D = B A`` (out x in, fp32), ``E = F * D``; ``penalty = lam/2 sum_i s_i^2 sum(E * D)``,
``dA_i += s_i^2 lam B^T E`` (r x in), ``dB_i += s_i^2 lam E A^T`` (out x r).

Tile kernel (one launch per (factor dtype, Fisher dtype, padded rank R) group, all the group's layers in it;
``R`` = max(16, next power of two of r); ``BLOCK_N`` = 128 for R <= 32, 64 for R = 64, so nothing spills):
each program reads one row of an int64 work table ``(layer, row chunk, column tile)``: it loads its ``A``
tile ``[R, BLOCK_N]`` once, then walks the chunk's rows in ``BLOCK_M`` steps: loads the ``B`` rows
``[BLOCK_M, R]`` and the ``F`` tile ``[BLOCK_M, BLOCK_N]`` (each element of ``F`` is read by exactly one
program, once), recomputes ``D = B A`` with ``tl.dot`` (fp32, IEEE: the products are those of the fp32
reference), forms ``E = F * D``, accumulates the penalty and ``B^T E`` in registers and writes the tile's
``E A^T`` (``[BLOCK_M, R]``) into its own workspace slot. At the end of its chunk it writes its ``B^T E``
partial (``[R, BLOCK_N]``) and its penalty partial ``s^2 sum(E D)`` into their own slots.

Reduce kernel (two launches per group: ``dA`` and ``dB``): one program per gradient tile sums that tile's
partials in a fixed order (row chunks for ``dA``, column tiles for ``dB``), scales by ``s^2 lam`` and adds
into the gradient, rounded once to its dtype. The penalty is ``partials.sum() * lam / 2``. No float atomics:
the result is bitwise reproducible; it stays on the device (no host sync).

Memory traffic: ``F`` once; ``A`` once per row chunk, ``B`` once per column tile; the gradients read and
written once; the workspaces (``r/BLOCK_N`` of ``F``'s element count for ``dB``, ``r/CHUNK_M`` for ``dA``,
fp32) written once and read once. float64 factors and ranks above 64 are not handled here (the op routes
them to the torch backend).
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from forgetkern.triton import AotSpec

BLOCK_M = 32
BLOCK_N = 128             # column tile for padded ranks <= 32; 64 for rank 64 (register budget: no spills)
CHUNK_M = 8 * BLOCK_M     # rows per program (a multiple of BLOCK_M)
MAX_RANK = 64
NUM_WARPS = 8
RED_WARPS = 4
TABLE_COLS = 13           # [a, b, f, out, in, r, m_start, m_end, n0, wsa_slot, wsb_base, wsb_mstride, layer]
RED_COLS = 9              # [g, ws_off, n_parts, stride, base, ld, nrows, ncols, layer]


@triton.jit(do_not_specialize_on_alignment=["A_TY", "F_TY"])
def ewc_dw_tile_kernel(table, A_TY, F_TY, s2s, partials, ws_a, ws_b, R: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, WRITE_GRAD: tl.constexpr):
    pid = tl.program_id(0)
    row = table + pid * 13
    a_ptr = tl.load(row).to(A_TY.dtype, bitcast=True)
    b_ptr = tl.load(row + 1).to(A_TY.dtype, bitcast=True)
    f_ptr = tl.load(row + 2).to(F_TY.dtype, bitcast=True)
    n_out = tl.load(row + 3)
    n_in = tl.load(row + 4)
    r = tl.load(row + 5)
    m_start = tl.load(row + 6).to(tl.int32)
    m_end = tl.load(row + 7).to(tl.int32)
    n0 = tl.load(row + 8)
    wsa_slot = tl.load(row + 9)
    wsb_base = tl.load(row + 10)
    wsb_mstride = tl.load(row + 11)
    layer = tl.load(row + 12)
    ks = tl.arange(0, R)
    cols = n0 + tl.arange(0, BLOCK_N)
    lm = tl.arange(0, BLOCK_M)
    col_ok = cols[None, :] < n_in
    # A tile [R, BLOCK_N], read once per program; padded ranks / columns load 0 (they add 0 everywhere)
    a = tl.load(a_ptr + ks[:, None] * n_in + cols[None, :], mask=(ks[:, None] < r) & col_ok,
                other=0.0).to(tl.float32)
    d_a = tl.zeros([R, BLOCK_N], dtype=tl.float32)
    pen = tl.zeros([BLOCK_M], dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + lm
        row_ok = rows[:, None] < n_out
        b = tl.load(b_ptr + rows[:, None] * r + ks[None, :], mask=row_ok & (ks[None, :] < r),
                    other=0.0).to(tl.float32)
        f = tl.load(f_ptr + rows[:, None].to(tl.int64) * n_in + cols[None, :], mask=row_ok & col_ok,
                    other=0.0).to(tl.float32)
        d = tl.dot(b, a, input_precision="ieee")
        e = f * d
        pen += tl.sum(e * d, axis=1)
        if WRITE_GRAD:
            d_a += tl.dot(tl.trans(b), e, input_precision="ieee")
            d_b = tl.dot(e, tl.trans(a), input_precision="ieee")
            slot = wsb_base + (m0 // BLOCK_M) * wsb_mstride
            tl.store(ws_b + slot + lm[:, None] * R + ks[None, :], d_b)
    if WRITE_GRAD:
        tl.store(ws_a + wsa_slot + ks[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], d_a)
    s2 = tl.load(s2s + layer)
    tl.store(partials + pid, tl.sum(pen, axis=0) * s2)


@triton.jit(do_not_specialize_on_alignment=["G_TY"])
def ewc_dw_reduce_kernel(table, G_TY, s2s, ws, lam, ROWS: tl.constexpr, COLS: tl.constexpr):
    pid = tl.program_id(0)
    row = table + pid * 9
    g_ptr = tl.load(row).to(G_TY.dtype, bitcast=True)
    ws_off = tl.load(row + 1)
    n_parts = tl.load(row + 2).to(tl.int32)
    stride = tl.load(row + 3)
    base = tl.load(row + 4)
    ld = tl.load(row + 5)
    nrows = tl.load(row + 6)
    ncols = tl.load(row + 7)
    layer = tl.load(row + 8)
    i = tl.arange(0, ROWS)
    j = tl.arange(0, COLS)
    tile = i[:, None] * COLS + j[None, :]
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    for k in range(0, n_parts):  # fixed order: deterministic
        acc += tl.load(ws + ws_off + k * stride + tile)
    coef = tl.load(s2s + layer) * lam
    mask = (i[:, None] < nrows) & (j[None, :] < ncols)
    ptrs = g_ptr + base + i[:, None] * ld + j[None, :]
    g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (g + acc * coef).to(g_ptr.dtype.element_ty), mask=mask)


def padded_rank(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def block_n(rank_pad: int) -> int:
    return BLOCK_N if rank_pad <= 32 else BLOCK_N // 2


def supports(lora_a: List[torch.Tensor]) -> bool:
    """True if these factors run on this kernel (float32/bfloat16/float16, every rank <= 64)."""
    return all(a.dtype in (torch.float32, torch.bfloat16, torch.float16) and a.shape[0] <= MAX_RANK
               for a in lora_a)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _groups(lora_a, fishers) -> list:
    groups: dict = {}
    for i, (a, f) in enumerate(zip(lora_a, fishers)):
        if f.numel() == 0 or a.shape[0] == 0:
            continue  # a 0-size layer adds 0 to the penalty and to the gradients
        groups.setdefault((a.dtype, f.dtype, padded_rank(a.shape[0])), []).append(i)
    return list(groups.items())


def plan(lora_a, lora_b, fishers, grads_a, grads_b, idx, rank_pad):
    """The work tables of one group: ``(tile_rows, reduce_a_rows, reduce_b_rows, ws_a_size, ws_b_size)``."""
    tiles, red_a, red_b = [], [], []
    wsa, wsb = 0, 0
    BLOCK_N = block_n(rank_pad)  # noqa: N806
    for i in idx:
        n_out, n_in = fishers[i].shape
        r = lora_a[i].shape[0]
        n_ct, n_mt, n_ch = _cdiv(n_in, BLOCK_N), _cdiv(n_out, BLOCK_M), _cdiv(n_out, CHUNK_M)
        wsb_layer, wsa_layer = wsb, wsa
        for ct in range(n_ct):
            for ch in range(n_ch):
                m_start = ch * CHUNK_M
                tiles.append((lora_a[i].data_ptr(), lora_b[i].data_ptr(), fishers[i].data_ptr(), n_out, n_in, r,
                              m_start, min(m_start + CHUNK_M, n_out), ct * BLOCK_N,
                              wsa_layer + (ct * n_ch + ch) * rank_pad * BLOCK_N,
                              wsb_layer + ct * BLOCK_M * rank_pad, n_ct * BLOCK_M * rank_pad, i))
            if grads_a is not None:
                red_a.append((grads_a[i].data_ptr(), wsa_layer + ct * n_ch * rank_pad * BLOCK_N, n_ch,
                              rank_pad * BLOCK_N, ct * BLOCK_N, n_in, r, n_in - ct * BLOCK_N, i))
        if grads_b is not None:
            for mt in range(n_mt):
                red_b.append((grads_b[i].data_ptr(), wsb_layer + mt * n_ct * BLOCK_M * rank_pad, n_ct,
                              BLOCK_M * rank_pad, mt * BLOCK_M * r, r, n_out - mt * BLOCK_M, r, i))
        wsa += n_ct * n_ch * rank_pad * BLOCK_N
        wsb += n_mt * n_ct * BLOCK_M * rank_pad
    return tiles, red_a, red_b, wsa, wsb


def _table(rows, device):
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def ewc_delta_w(lora_a: List[torch.Tensor], lora_b: List[torch.Tensor], fishers: List[torch.Tensor],
                scaling: List[float], lam: float, grads_a: List[torch.Tensor], grads_b: List[torch.Tensor],
                write_grad: bool) -> torch.Tensor:
    """The ``forgetkern_cpu::ewc_delta_w`` contract on Triton: the penalty (0-dim float32 on the device); with
    ``write_grad``, ``dP/dA_i`` / ``dP/dB_i`` added into ``grads_a`` / ``grads_b`` in place."""
    if not supports(lora_a):
        raise ValueError("forgetkern.ewc_delta_w: the triton kernel handles float32/bfloat16/float16 factors of "
                         f"rank <= {MAX_RANK}; use the torch backend for the others")
    device = lora_a[0].device if lora_a else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    if not lora_a:
        return total
    s2s = torch.tensor([float(s) ** 2 for s in scaling], dtype=torch.float32).to(device, non_blocking=True)
    ga = grads_a if write_grad else None
    gb = grads_b if write_grad else None
    for (a_dtype, f_dtype, rank_pad), idx in _groups(lora_a, fishers):
        tiles, red_a, red_b, wsa, wsb = plan(lora_a, lora_b, fishers, ga, gb, idx, rank_pad)
        table = _table(tiles, device)
        partials = torch.empty(len(tiles), dtype=torch.float32, device=device)
        ws_a = torch.empty(wsa if write_grad else 1, dtype=torch.float32, device=device)
        ws_b = torch.empty(wsb if write_grad else 1, dtype=torch.float32, device=device)
        ewc_dw_tile_kernel[(len(tiles),)](table, lora_a[idx[0]], fishers[idx[0]], s2s, partials, ws_a, ws_b,
                                          R=rank_pad, BLOCK_M=BLOCK_M, BLOCK_N=block_n(rank_pad),
                                          WRITE_GRAD=bool(write_grad), num_warps=NUM_WARPS)
        total = total + partials.sum()
        if write_grad:
            ewc_dw_reduce_kernel[(len(red_a),)](_table(red_a, device), grads_a[idx[0]], s2s, ws_a, float(lam),
                                                ROWS=rank_pad, COLS=block_n(rank_pad), num_warps=RED_WARPS)
            ewc_dw_reduce_kernel[(len(red_b),)](_table(red_b, device), grads_b[idx[0]], s2s, ws_b, float(lam),
                                                ROWS=BLOCK_M, COLS=rank_pad, num_warps=RED_WARPS)
    return total * (lam / 2)


# ---- ahead-of-time compile specs ------------------------------------------------------------------------
def _aot_specs() -> list:
    specs = []
    tile_names = ("table", "A_TY", "F_TY", "s2s", "partials", "ws_a", "ws_b", "R", "BLOCK_M", "BLOCK_N",
                  "WRITE_GRAD")
    for a_ty, f_ty, rank, wg in (("fp32", "fp32", 64, True), ("fp32", "bf16", 16, True), ("bf16", "bf16", 64, True),
                                 ("bf16", "fp32", 32, True)):
        sig = dict(zip(tile_names, ("*i64", "*" + a_ty, "*" + f_ty, "*fp32", "*fp32", "*fp32", "*fp32")
                       + ("constexpr",) * 4))
        specs.append(AotSpec(ewc_dw_tile_kernel, sig, {"R": rank, "BLOCK_M": BLOCK_M, "BLOCK_N": block_n(rank),
                                                       "WRITE_GRAD": wg},
                             f"tile A={a_ty} F={f_ty} R={rank} write_grad={int(wg)}", {"num_warps": NUM_WARPS},
                             ("table", "s2s", "partials", "ws_a", "ws_b")))
    red_names = ("table", "G_TY", "s2s", "ws", "lam", "ROWS", "COLS")
    for g_ty, rows, cols in (("bf16", 64, block_n(64)), ("fp32", BLOCK_M, 64)):
        sig = dict(zip(red_names, ("*i64", "*" + g_ty, "*fp32", "*fp32", "fp32", "constexpr", "constexpr")))
        specs.append(AotSpec(ewc_dw_reduce_kernel, sig, {"ROWS": rows, "COLS": cols},
                             f"reduce G={g_ty} {rows}x{cols}", {"num_warps": RED_WARPS},
                             ("table", "s2s", "ws")))
    return specs


AOT_SPECS = _aot_specs()
