"""Triton ``merge_task_vectors``: one launch per tensor, one program per block of elements, the N inputs read
once each through a table of their addresses (math: ``forgetkern/reference/merge_task_vectors.py``).

Per element: the base is loaded once, then for k = 0..N-1 the task's value is loaded, pruned (magnitude
threshold, or the DARE keep bit: the LoRA dropout hash of the flat element index), weighted and added to the
accumulators (the weighted sum, or the vote and the positive / negative sums and divisors of the sign
election); the result ``b + lam * delta / div`` is stored once. Weights, the DARE rescale, the linear divisor
and ``lam`` come in a small tensor in the compute type (float32, or float64), so they are rounded as the
reference rounds them. Launched with ``enable_fp_fusion=False``: no multiply-add is fused, every operation
rounds as in the reference (division: IEEE ``div_rn``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forgetkern.triton import AotSpec
from forgetkern.triton._dropout import mix32

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _c(x, F64: tl.constexpr):
    if F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _div(a, b, F64: tl.constexpr):
    if F64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit(do_not_specialize=["numel", "n_tasks", "offset", "drop_thr"])
def merge_kernel(base_ptr, out_ptr, in_addrs, X_TY, fparams, thr_ptr, key_ptr, numel, n_tasks, offset, drop_thr,
                 PRUNE: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, SUB: tl.constexpr,
                 SIGN_W: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = _c(tl.load(base_ptr + offs, mask=mask, other=0.0), F64)
    zero = b * 0.0
    total = zero
    vote = zero
    pos = zero
    neg = zero
    pos_div = zero
    neg_div = zero
    scale = tl.load(fparams + n_tasks)
    lin_div = tl.load(fparams + n_tasks + 1)
    lam = tl.load(fparams + n_tasks + 2)
    gidx = offs + offset
    row = (gidx >> 32).to(tl.uint32)
    col = (gidx & 0xFFFFFFFF).to(tl.uint32)
    for k in range(0, n_tasks):
        x_ptr = tl.load(in_addrs + k).to(X_TY.dtype, bitcast=True)
        tau = _c(tl.load(x_ptr + offs, mask=mask, other=0.0), F64)
        if SUB:
            tau = tau - b
        if PRUNE == 1:
            thr = tl.load(thr_ptr + k)
            v = tl.where(tl.abs(tau) >= thr, tau, zero)
        elif PRUNE == 2:
            key = tl.load(key_ptr + k).to(tl.uint32, bitcast=True)
            rh = mix32(key + row * 0x9E3779B9)
            h = mix32(rh + col * 0x85EBCA77)
            keep = (h >> 8).to(tl.int32) >= drop_thr
            v = tl.where(keep, tau * scale, zero)
        else:
            v = tau
        w = tl.load(fparams + k)
        wv = v * w
        if CONSENSUS == 0:
            total = total + wv
        else:
            if SIGN_W:
                u = wv
            else:
                u = v
            gt = u > 0.0
            lt = u < 0.0
            if CONSENSUS == 1:
                vote = vote + u
            else:
                vote = vote + tl.where(gt, zero + 1.0, tl.where(lt, zero - 1.0, zero))
            pos = pos + tl.where(gt, wv, zero)
            neg = neg + tl.where(lt, wv, zero)
            if NORMALIZE == 1:
                pos_div = pos_div + tl.where(gt, zero + 1.0, zero)
                neg_div = neg_div + tl.where(lt, zero + 1.0, zero)
            elif NORMALIZE == 2:
                pos_div = pos_div + tl.where(gt, zero + w, zero)
                neg_div = neg_div + tl.where(lt, zero + w, zero)
    if CONSENSUS == 0:
        delta = total
        if NORMALIZE != 0:
            delta = _div(delta, zero + lin_div, F64)
    else:
        up = vote >= 0.0
        delta = tl.where(up, pos, neg)
        if NORMALIZE != 0:
            div = tl.where(up, pos_div, neg_div)
            if NORMALIZE == 1:
                div = tl.where(div < 1.0, zero + 1.0, div)
            else:
                div = tl.where(div == 0.0, zero + 1.0, div)
            delta = _div(delta, div, F64)
    out = b + delta * lam
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def merge_task_vectors(base, inputs, weights, thresholds, keys, offsets, prune, p, rescale, consensus,
                       sign_weighted, normalize, lam, subtract_base):
    """The launcher (same arguments as the reference)."""
    from forgetkern.reference.lora_linear import keep_scale, keep_threshold

    n = len(weights)
    outs = []
    wsum = sum(weights)
    lin_div = float(max(n, 1)) if normalize == 1 else (wsum if abs(wsum) >= 1e-8 else 1.0)
    scale = keep_scale(p) if rescale else 1.0
    for t, b in enumerate(base):
        out = torch.empty_like(b, memory_format=torch.contiguous_format)
        outs.append(out)
        if b.numel() == 0:
            continue
        xs = inputs[t * n:(t + 1) * n]
        f64 = b.dtype == torch.float64 or xs[0].dtype == torch.float64
        c = torch.float64 if f64 else torch.float32
        fparams = torch.tensor(list(weights) + [scale, lin_div, lam], dtype=c).to(b.device)
        addrs = torch.tensor([x.data_ptr() for x in xs], dtype=torch.int64).to(b.device)
        thr = thresholds[t * n:(t + 1) * n].to(c) if prune == 1 else fparams
        kt = torch.tensor(keys[t * n:(t + 1) * n], dtype=torch.int64)
        kt = (kt - ((kt >> 31) << 32)).to(torch.int32).to(b.device) if prune == 2 else addrs
        grid = (triton.cdiv(b.numel(), BLOCK),)
        merge_kernel[grid](b, out, addrs, xs[0], fparams, thr, kt, b.numel(), n, int(offsets[t]),
                           keep_threshold(p), PRUNE=int(prune), CONSENSUS=int(consensus), NORMALIZE=int(normalize),
                           SUB=bool(subtract_base), SIGN_W=bool(sign_weighted), F64=f64, BLOCK=BLOCK,
                           num_warps=NUM_WARPS, enable_fp_fusion=False)
    return outs


# ---- ahead-of-time compile specs ------------------------------------------------------------------------------
def _aot_specs() -> list:
    names = ("base_ptr", "out_ptr", "in_addrs", "X_TY", "fparams", "thr_ptr", "key_ptr", "numel", "n_tasks",
             "offset", "drop_thr", "PRUNE", "CONSENSUS", "NORMALIZE", "SUB", "SIGN_W", "F64", "BLOCK")
    # (base dtype, input dtype, prune, consensus, normalize, subtract_base): the common merges
    variants = [("bf16", "bf16", 0, 0, 0, True, "task arithmetic"), ("bf16", "bf16", 1, 1, 1, True, "ties"),
                ("bf16", "bf16", 2, 0, 0, True, "dare_linear"), ("bf16", "bf16", 2, 1, 1, True, "dare_ties"),
                ("fp32", "fp32", 1, 2, 2, False, "ties frequency/weight"), ("fp16", "fp32", 2, 1, 1, False,
                                                                            "dare_ties fp32 deltas")]
    specs = []
    for bt, xt, pr, co, no, sub, what in variants:
        types = ("*" + bt, "*" + bt, "*i64", "*" + xt, "*fp32", "*fp32", "*i32", "i64", "i32", "i64", "i32") + \
            ("constexpr",) * 7
        const = {"PRUNE": pr, "CONSENSUS": co, "NORMALIZE": no, "SUB": sub, "SIGN_W": False, "F64": False,
                 "BLOCK": BLOCK}
        specs.append(AotSpec(merge_kernel, dict(zip(names, types)), const, f"{what} base={bt} inputs={xt}",
                             {"num_warps": NUM_WARPS, "enable_fp_fusion": False}))
    return specs


AOT_SPECS = _aot_specs()
