"""Reference for the fused multi-tensor merge of task vectors (``merge_task_vectors``).

Inputs: ``T`` base tensors ``b_t`` and ``T * N`` inputs ``x_{t,k}`` (tensor-major: ``inputs[t * N + k]``),
one weight ``w_k`` per task. All math in the compute type C (float64 when ``b_t`` or any ``x_{t,k}`` is
float64, else float32); the result is rounded once to ``b_t``'s dtype. Per element ``e`` of tensor ``t``::

    tau_k = x_k - b           (subtract_base: the inputs are fine-tuned weights)   else   tau_k = x_k
    v_k   = tau_k * [|tau_k| >= thr_{t,k}]                            prune = MAGNITUDE (TIES trim)
          = tau_k * keep(key_{t,k}, offset_t + e) * s                 prune = RANDOM (DARE), s = 1/(1-p) or 1
          = tau_k                                                     prune = NONE
    u_k   = w_k v_k  (sign_weighted)  else  v_k                       the value that votes
    consensus = NONE:      delta = sum_k w_k v_k,     div = N (COUNT) | sum_k w_k (WEIGHT, 1 if |.| < 1e-8)
    consensus = TOTAL:     sigma = +1 if sum_k u_k >= 0 else -1
    consensus = FREQUENCY: sigma = +1 if sum_k sign(u_k) >= 0 else -1
                           A = {k : sign(u_k) = sigma}     (zeros never agree)
                           delta = sum_{k in A} w_k v_k,  div = |A| (COUNT, min 1) | sum_{k in A} w_k (WEIGHT, 1 if 0)
    out   = b + lam * (delta / div  if normalize else  delta)

``keep`` is the counter-based hash of the LoRA dropout mask (forgetkern/reference/lora_linear.py) applied to
the flat element index ``i = offset_t + e``: ``rh = mix32(key + (i >> 32) * 0x9E3779B9)``, ``h = mix32(rh +
(i & 0xFFFFFFFF) * 0x85EBCA77)``, kept iff ``(h >> 8) >= floor(p * 2^24 + 0.5)``. ``s`` is rounded to C.

Sums over ``k`` run in task order, each term rounded in C (one IEEE operation at a time); a kernel that
follows the same order gives the same bits. This file is the test oracle and the fallback of every backend.
"""

from __future__ import annotations

from typing import List

import torch

from forgetkern.reference.lora_linear import COL_MUL, M32, ROW_MUL, _mix32_, keep_scale, keep_threshold

PRUNE_NONE, PRUNE_MAGNITUDE, PRUNE_RANDOM = 0, 1, 2
CONSENSUS_NONE, CONSENSUS_TOTAL, CONSENSUS_FREQUENCY = 0, 1, 2
NORM_NONE, NORM_COUNT, NORM_WEIGHT = 0, 1, 2


def compute_dtype(base: torch.Tensor, inputs) -> torch.dtype:
    if base.dtype == torch.float64 or any(x.dtype == torch.float64 for x in inputs):
        return torch.float64
    return torch.float32


def dare_keep(key: int, p: float, numel: int, offset: int = 0, device=None) -> torch.Tensor:
    """Bool [numel]: the elements ``offset .. offset + numel - 1`` (flat index) that DARE keeps for ``key``."""
    i = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    rh = _mix32_(((i >> 32) * ROW_MUL + key).bitwise_and_(M32))
    h = _mix32_((rh + (i & M32) * COL_MUL).bitwise_and_(M32))
    return (h >> 8) >= keep_threshold(p)


def merge_task_vectors(base: List[torch.Tensor], inputs: List[torch.Tensor], weights: List[float],
                       thresholds: torch.Tensor, keys: List[int], offsets: List[int], prune: int, p: float,
                       rescale: bool, consensus: int, sign_weighted: bool, normalize: int, lam: float,
                       subtract_base: bool) -> List[torch.Tensor]:
    n = len(weights)
    outs = []
    for t, b in enumerate(base):
        xs = inputs[t * n:(t + 1) * n]
        c = compute_dtype(b, xs)
        bc = b.reshape(-1).to(c)
        zero = torch.zeros((), dtype=c, device=b.device)
        total = torch.zeros_like(bc)
        vote = torch.zeros_like(bc)
        pos, neg = torch.zeros_like(bc), torch.zeros_like(bc)
        pos_div, neg_div = torch.zeros_like(bc), torch.zeros_like(bc)
        wsum = 0.0
        scale = torch.tensor(keep_scale(p) if rescale else 1.0, dtype=c)
        for k, x in enumerate(xs):
            tau = x.reshape(-1).to(c)
            if subtract_base:
                tau = tau - bc
            if prune == PRUNE_MAGNITUDE:
                v = torch.where(tau.abs() >= thresholds[t * n + k].to(c), tau, zero)
            elif prune == PRUNE_RANDOM:
                keep = dare_keep(keys[t * n + k], p, tau.numel(), offsets[t], b.device)
                v = torch.where(keep, tau * scale.to(b.device), zero)
            else:
                v = tau
            w = torch.tensor(weights[k], dtype=c, device=b.device)
            wv = v * w
            u = wv if sign_weighted else v
            wsum += weights[k]
            if consensus == CONSENSUS_NONE:
                total = total + wv
                continue
            vote = vote + (u if consensus == CONSENSUS_TOTAL else torch.sign(u))
            gt, lt = u > 0, u < 0
            pos = pos + torch.where(gt, wv, zero)
            neg = neg + torch.where(lt, wv, zero)
            if normalize == NORM_COUNT:
                pos_div = pos_div + gt.to(c)
                neg_div = neg_div + lt.to(c)
            elif normalize == NORM_WEIGHT:
                pos_div = pos_div + torch.where(gt, w, zero)
                neg_div = neg_div + torch.where(lt, w, zero)
        if consensus == CONSENSUS_NONE:
            delta = total
            if normalize == NORM_COUNT:
                delta = delta / torch.tensor(float(max(n, 1)), dtype=c)
            elif normalize == NORM_WEIGHT:
                delta = delta / torch.tensor(wsum if abs(wsum) >= 1e-8 else 1.0, dtype=c)
        else:
            up = vote >= 0
            delta = torch.where(up, pos, neg)
            if normalize != NORM_NONE:
                div = torch.where(up, pos_div, neg_div)
                if normalize == NORM_COUNT:
                    div = torch.clamp(div, min=1.0)
                else:
                    div = torch.where(div == 0, torch.ones_like(div), div)
                delta = delta / div
        out = bc + delta * torch.tensor(lam, dtype=c)
        outs.append(out.to(b.dtype).reshape(b.shape))
    return outs
