"""Triton ``olora_loss``: the O-LoRA orthogonality loss and its gradient over all layers, one launch per dtype pair.

Math (see ``forgetkern/ops/olora_loss.py``), per layer ``i``: ``P_i = A_past_i A_i^T`` (p_i x r_i),
``loss = sum_i sum |P_i|`` (``l1``) or ``sum_i sum P_i^2`` (``fro2``), ``dA_i = S_i^T A_past_i`` with
``S_i = sign(P_i)`` or ``2 P_i``.

Forward: one program per (layer, BLOCK_P rows of P, BLOCK_R columns of P); it streams ``A_past`` and ``A``
along ``in`` in BLOCK_K slabs (fp32 ``tl.dot``, IEEE precision), stores the tile's sum into its own
workspace slot, and, for the backward, the tile of ``P`` itself (``STORE_P``; P is tiny: p x r per layer).
The loss is ``workspace.sum()``: fixed-order, no atomics, bitwise reproducible.

Backward: one program per (layer, BLOCK_R rows of dA, BLOCK_K columns): ``dA_tile = sum_p S^T A_past`` over
BLOCK_P blocks, scaled by the incoming gradient (read from the device: no host sync), stored once in ``A``'s
dtype. Each program reads one row of an int64 table (addresses, shapes, tile origin, workspace offset), like
the multi-tensor kernels (``_multi_tensor``). float64 inputs are not handled here (the op routes them to the
torch backend).
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from forgetkern.triton import AotSpec

BLOCK_P = 32
BLOCK_K = 64
NUM_WARPS = 4


@triton.jit(do_not_specialize_on_alignment=["PAST_TY", "CUR_TY", "partials", "pmat"])
def olora_fwd_kernel(table, PAST_TY, CUR_TY, partials, pmat, L1: tl.constexpr, STORE_P: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    row = table + pid * 8  # [past_addr, cur_addr, p, r, K, p_start, r_start, ws_off]
    past_ptr = tl.load(row).to(PAST_TY.dtype, bitcast=True)
    cur_ptr = tl.load(row + 1).to(CUR_TY.dtype, bitcast=True)
    p = tl.load(row + 2).to(tl.int32)
    r = tl.load(row + 3).to(tl.int32)
    K = tl.load(row + 4).to(tl.int32)
    p0 = tl.load(row + 5).to(tl.int32)
    r0 = tl.load(row + 6).to(tl.int32)
    ws_off = tl.load(row + 7)
    rows = p0 + tl.arange(0, BLOCK_P)
    cols = r0 + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        a = tl.load(past_ptr + rows[:, None] * K + kk[None, :], mask=(rows[:, None] < p) & (kk[None, :] < K),
                    other=0.0).to(tl.float32)
        c = tl.load(cur_ptr + cols[:, None] * K + kk[None, :], mask=(cols[:, None] < r) & (kk[None, :] < K),
                    other=0.0).to(tl.float32)
        acc += tl.dot(a, tl.trans(c), input_precision="ieee")
    if L1:
        s = tl.sum(tl.sum(tl.abs(acc), axis=1), axis=0)
    else:
        s = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    tl.store(partials + pid, s)
    if STORE_P:
        tl.store(pmat + ws_off + rows[:, None] * r + cols[None, :], acc,
                 mask=(rows[:, None] < p) & (cols[None, :] < r))


@triton.jit(do_not_specialize_on_alignment=["PAST_TY", "GRAD_TY", "pmat", "grad_out"])
def olora_bwd_kernel(table, PAST_TY, GRAD_TY, pmat, grad_out, L1: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    row = table + pid * 8  # [past_addr, grad_addr, p, r, K, r_start, k_start, ws_off]
    past_ptr = tl.load(row).to(PAST_TY.dtype, bitcast=True)
    grad_ptr = tl.load(row + 1).to(GRAD_TY.dtype, bitcast=True)
    p = tl.load(row + 2).to(tl.int32)
    r = tl.load(row + 3).to(tl.int32)
    K = tl.load(row + 4).to(tl.int32)
    r0 = tl.load(row + 5).to(tl.int32)
    k0 = tl.load(row + 6).to(tl.int32)
    ws_off = tl.load(row + 7)
    js = r0 + tl.arange(0, BLOCK_R)
    kk = k0 + tl.arange(0, BLOCK_K)
    prow = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for a0 in range(0, p, BLOCK_P):
        aa = a0 + prow
        # S^T tile [BLOCK_R, BLOCK_P]: S^T[j, a] = P[a, j]
        pt = tl.load(pmat + ws_off + aa[None, :] * r + js[:, None], mask=(aa[None, :] < p) & (js[:, None] < r),
                     other=0.0)
        if L1:
            st = tl.where(pt > 0, 1.0, tl.where(pt < 0, -1.0, 0.0))
        else:
            st = pt * 2.0
        a = tl.load(past_ptr + aa[:, None] * K + kk[None, :], mask=(aa[:, None] < p) & (kk[None, :] < K),
                    other=0.0).to(tl.float32)
        acc += tl.dot(st, a, input_precision="ieee")
    g = tl.load(grad_out).to(tl.float32)
    tl.store(grad_ptr + js[:, None] * K + kk[None, :], (acc * g).to(grad_ptr.dtype.element_ty),
             mask=(js[:, None] < r) & (kk[None, :] < K))


def _block_r(cur: List[torch.Tensor], idx: List[int]) -> int:
    return 16 if max(cur[i].shape[0] for i in idx) <= 16 else 32


def _groups(past, cur):
    groups: dict = {}
    for i, (p, c) in enumerate(zip(past, cur)):
        if p.shape[0] == 0 or c.numel() == 0:
            continue
        groups.setdefault((p.dtype, c.dtype), []).append(i)
    return list(groups.values())


def _ws_offsets(past, cur, idx):
    offs, n = {}, 0
    for i in idx:
        offs[i] = n
        n += past[i].shape[0] * cur[i].shape[0]
    return offs, n


def _fwd_table(past, cur, idx, offs, block_r, device):
    rows = []
    for i in idx:
        p, (r, k) = past[i].shape[0], cur[i].shape
        for p0 in range(0, p, BLOCK_P):
            for r0 in range(0, r, block_r):
                rows.append((past[i].data_ptr(), cur[i].data_ptr(), p, r, k, p0, r0, offs[i]))
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def _forward(past, cur, norm, store_p: bool):
    device = cur[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    saved = []
    for idx in _groups(past, cur):
        offs, n = _ws_offsets(past, cur, idx)
        block_r = _block_r(cur, idx)
        table = _fwd_table(past, cur, idx, offs, block_r, device)
        partials = torch.empty(table.shape[0], dtype=torch.float32, device=device)
        pmat = torch.empty(max(n, 1) if store_p else 1, dtype=torch.float32, device=device)
        olora_fwd_kernel[(table.shape[0],)](table, past[idx[0]], cur[idx[0]], partials, pmat, L1=norm == "l1",
                                            STORE_P=store_p, BLOCK_P=BLOCK_P, BLOCK_R=block_r, BLOCK_K=BLOCK_K,
                                            num_warps=NUM_WARPS)
        total = total + partials.sum()
        saved.append((idx, offs, pmat, block_r))
    return total, saved


def olora_loss(past, cur, norm: str) -> torch.Tensor:
    return _forward(past, cur, norm, False)[0]


def olora_loss_backward(past, cur, norm: str, grad_out: torch.Tensor) -> List[torch.Tensor]:
    device = cur[0].device
    grads = [torch.zeros_like(c) for c in cur]
    _, saved = _forward(past, cur, norm, True)
    g = grad_out.to(device=device, dtype=torch.float32).reshape(())
    for idx, offs, pmat, block_r in saved:
        rows = []
        for i in idx:
            p, (r, k) = past[i].shape[0], cur[i].shape
            for r0 in range(0, r, block_r):
                for k0 in range(0, k, BLOCK_K):
                    rows.append((past[i].data_ptr(), grads[i].data_ptr(), p, r, k, r0, k0, offs[i]))
        table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        olora_bwd_kernel[(table.shape[0],)](table, past[idx[0]], grads[idx[0]], pmat, g, L1=norm == "l1",
                                            BLOCK_P=BLOCK_P, BLOCK_R=block_r, BLOCK_K=BLOCK_K,
                                            num_warps=NUM_WARPS)
    return grads


# ---- ahead-of-time compile specs ------------------------------------------------------------------------
def _aot_specs() -> list:
    specs = []
    fwd_names = ("table", "PAST_TY", "CUR_TY", "partials", "pmat", "L1", "STORE_P", "BLOCK_P", "BLOCK_R", "BLOCK_K")
    for ty, l1, store, br in (("fp32", True, False, 16), ("bf16", False, True, 32), ("bf16", True, True, 16)):
        sig = dict(zip(fwd_names, ("*i64", "*" + ty, "*" + ty, "*fp32", "*fp32") + ("constexpr",) * 5))
        specs.append(AotSpec(olora_fwd_kernel, sig, {"L1": l1, "STORE_P": store, "BLOCK_P": BLOCK_P,
                                                      "BLOCK_R": br, "BLOCK_K": BLOCK_K},
                             f"fwd {ty} {'l1' if l1 else 'fro2'} store_p={int(store)} BLOCK_R={br}",
                             {"num_warps": NUM_WARPS}))
    bwd_names = ("table", "PAST_TY", "GRAD_TY", "pmat", "grad_out", "L1", "BLOCK_P", "BLOCK_R", "BLOCK_K")
    for ty, l1, br in (("fp32", True, 16), ("bf16", False, 32), ("bf16", True, 16)):
        sig = dict(zip(bwd_names, ("*i64", "*" + ty, "*" + ty, "*fp32", "*fp32") + ("constexpr",) * 4))
        specs.append(AotSpec(olora_bwd_kernel, sig, {"L1": l1, "BLOCK_P": BLOCK_P, "BLOCK_R": br,
                                                      "BLOCK_K": BLOCK_K},
                             f"bwd {ty} {'l1' if l1 else 'fro2'} BLOCK_R={br}", {"num_warps": NUM_WARPS}))
    return specs


AOT_SPECS = _aot_specs()
