"""Triton ``project_out_``: ``X <- X - U (U^T X)`` (left) or ``X <- X - (X V) V^T`` (right) for all layers at once.

Both sides are one kernel on the view ``Y`` (L x n) of ``X`` whose rows are indexed by the basis' rows:
left ``Y = X`` (out x r, strides (r, 1)), right ``Y = X^T`` (in x r, strides (1, in)); the basis ``U`` is
(L x k), contiguous. Columns of ``Y`` are independent (``U^T Y`` column ``j`` depends only on ``Y`` column
``j``), so one program owns (layer, BLOCK_N columns) and needs no other program. Phase 1 computes
``C = U^T Y`` (k x BLOCK_N) in BLOCK_KB-row blocks (reductions over L in BLOCK_L slabs, fp32 ``tl.dot`` at
IEEE precision) into a float32 scratch block of its own (k x BLOCK_N per program: small); after a barrier,
phase 2 streams ``Y`` once more and writes ``Y - U C`` slab by slab, rounded once to ``X``'s dtype. ``X`` is
read twice and written once whatever ``k``. Each program reads a row of an int64 table (addresses, shapes, strides, column origin): one
launch per (X dtype, U dtype) pair. The m x m projector is never formed. float64 goes to the torch backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forgetkern.triton import AotSpec

BLOCK_L = 64
BLOCK_KB = 32
NUM_WARPS = 4
NUM_STAGES = 1  # no software pipelining: with 2-3 stages the slab loads outgrow the register file (spills)


@triton.jit(do_not_specialize_on_alignment=["X_TY", "U_TY", "scratch"])
def project_out_kernel(table, X_TY, U_TY, scratch, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_KB: tl.constexpr):
    pid = tl.program_id(0)
    row = table + pid * 9  # [x_addr, u_addr, L, n, k, n_start, stride_l, stride_n, scratch_off]
    x_ptr = tl.load(row).to(X_TY.dtype, bitcast=True)
    u_ptr = tl.load(row + 1).to(U_TY.dtype, bitcast=True)
    L = tl.load(row + 2).to(tl.int32)
    n = tl.load(row + 3).to(tl.int32)
    k = tl.load(row + 4).to(tl.int32)
    n0 = tl.load(row + 5).to(tl.int32)
    s_l = tl.load(row + 6).to(tl.int32)
    s_n = tl.load(row + 7).to(tl.int32)
    c_ptr = scratch + tl.load(row + 8)  # this program's (k x BLOCK_N) float32 block of C = U^T Y
    cols = n0 + tl.arange(0, BLOCK_N)
    jn = tl.arange(0, BLOCK_N)
    ls = tl.arange(0, BLOCK_L)
    kb = tl.arange(0, BLOCK_KB)
    # phase 1: C = U^T Y, one BLOCK_KB-row block at a time (reads Y once per block of the basis)
    for b0 in range(0, k, BLOCK_KB):
        kk = b0 + kb
        c = tl.zeros([BLOCK_KB, BLOCK_N], dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            ll = l0 + ls
            u = tl.load(u_ptr + ll[:, None] * k + kk[None, :], mask=(ll[:, None] < L) & (kk[None, :] < k),
                        other=0.0).to(tl.float32)
            y = tl.load(x_ptr + ll[:, None] * s_l + cols[None, :] * s_n,
                        mask=(ll[:, None] < L) & (cols[None, :] < n), other=0.0).to(tl.float32)
            c += tl.dot(tl.trans(u), y, input_precision="ieee")
        tl.store(c_ptr + kk[:, None] * BLOCK_N + jn[None, :], c, mask=kk[:, None] < k)
    tl.debug_barrier()
    # phase 2: Y <- Y - U C slab by slab, in float32, rounded once to Y's dtype
    for l0 in range(0, L, BLOCK_L):
        ll = l0 + ls
        m = (ll[:, None] < L) & (cols[None, :] < n)
        ptrs = x_ptr + ll[:, None] * s_l + cols[None, :] * s_n
        y = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
        for b0 in range(0, k, BLOCK_KB):
            kk = b0 + kb
            u = tl.load(u_ptr + ll[:, None] * k + kk[None, :], mask=(ll[:, None] < L) & (kk[None, :] < k),
                        other=0.0).to(tl.float32)
            c = tl.load(c_ptr + kk[:, None] * BLOCK_N + jn[None, :], mask=kk[:, None] < k, other=0.0)
            y -= tl.dot(u, c, input_precision="ieee")
        tl.store(ptrs, y.to(x_ptr.dtype.element_ty), mask=m)


def project_out_(tensors, bases, side: str) -> None:
    device = tensors[0].device
    bases = [u.contiguous() for u in bases]  # the kernel reads U row-major (L x k); kept alive through the launch
    groups: dict = {}
    for i, (x, u) in enumerate(zip(tensors, bases)):
        if x.numel() == 0 or u.shape[1] == 0:
            continue
        groups.setdefault((x.dtype, u.dtype), []).append(i)
    for idx in groups.values():
        n_max = max(tensors[i].shape[1 if side == "left" else 0] for i in idx)
        block_n = 16 if n_max <= 16 else 32
        rows, off = [], 0
        for i in idx:
            x, u = tensors[i], bases[i]
            if side == "left":
                L, n, s_l, s_n = x.shape[0], x.shape[1], x.shape[1], 1
            else:
                L, n, s_l, s_n = x.shape[1], x.shape[0], 1, x.shape[1]
            for n0 in range(0, n, block_n):
                rows.append((x.data_ptr(), u.data_ptr(), L, n, u.shape[1], n0, s_l, s_n, off))
                off += u.shape[1] * block_n
        table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        scratch = torch.empty(off, dtype=torch.float32, device=device)
        project_out_kernel[(table.shape[0],)](table, tensors[idx[0]], bases[idx[0]], scratch, BLOCK_L=BLOCK_L,
                                              BLOCK_N=block_n, BLOCK_KB=BLOCK_KB, num_warps=NUM_WARPS,
                                              num_stages=NUM_STAGES)


def _aot_specs() -> list:
    names = ("table", "X_TY", "U_TY", "scratch", "BLOCK_L", "BLOCK_N", "BLOCK_KB")
    specs = []
    for xt, ut, bn in (("fp32", "fp32", 16), ("bf16", "fp32", 16), ("bf16", "bf16", 32), ("fp16", "fp32", 16)):
        sig = dict(zip(names, ("*i64", "*" + xt, "*" + ut, "*fp32") + ("constexpr",) * 3))
        specs.append(AotSpec(project_out_kernel, sig, {"BLOCK_L": BLOCK_L, "BLOCK_N": bn, "BLOCK_KB": BLOCK_KB},
                             f"X={xt} U={ut} BLOCK_N={bn}", {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}))
    return specs


AOT_SPECS = _aot_specs()
