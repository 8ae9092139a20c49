"""The eager autograd path of :func:`forgetkern.lora_linear` on the torch and cpp backends.

``torch.library`` autograd flattens every list argument on each call (~0.2 ms forward + 0.2 ms backward, as
much as a small layer's whole LoRA branch); eager calls take a plain ``autograd.Function`` instead
(:class:`EagerFn`), which calls the same backend functions and saves the same tensors as the custom ops of
``forgetkern/ops/lora_linear.py`` (those remain the path for ``torch.compile``, tracing and dispatch modes and
for the GPU backends). :class:`MixedFn` serves float32 adapters on a 16-bit layer. Both assemble their
gradients with :func:`lora_grads`, as the custom op's backward does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forgetkern import _backend


def lora_grads(bwd, grads, x, xa, weights, lora_a, lora_b, layer, scaling, dropout_p, keys, bias_layer,
               need_dx: bool, need_a, need_b, need_bias):
    """``(dx, d_a, d_b, d_bias)`` of one LoRA call from its output gradients ``grads`` (None: zero), with the
    backend's ``bwd``; None where a gradient is not needed. ``d_bias[i]`` is the gradient of the combined bias
    of layer ``bias_layer[i]`` (the sum of dy over rows, accumulated in float32 / float64)."""
    need_da, need_db = any(need_a), any(need_b)
    dys = [torch.zeros((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device) if d is None else d.contiguous()
           for d, w in zip(grads, weights)]
    dx, d_a, d_b = None, [None] * len(lora_a), [None] * len(lora_a)
    if need_dx or need_da or need_db:
        dx, d_a, d_b = bwd(dys, x, weights, lora_a, lora_b, xa, layer, scaling, dropout_p, keys, need_dx, need_da,
                           need_db)
        dx = dx if need_dx else None
        d_a = [t if n else None for t, n in zip(d_a, need_a)]
        d_b = [t if n else None for t, n in zip(d_b, need_b)]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    d_bias = [dys[li].sum(0, dtype=acc).to(x.dtype) if n else None for li, n in zip(bias_layer, need_bias)]
    return dx, d_a, d_b, d_bias


class EagerFn(torch.autograd.Function):
    """The forward / backward of the custom ops for eager calls: saves ``x``, ``xa`` and the weights (which the
    module holds anyway); returns the layers' outputs and ``xa`` (non-differentiable)."""

    @staticmethod
    def forward(ctx, kernels, meta, x, *tensors):
        n_l, n_b, n_ad, bias_layer, layer, scaling, dropout_p, keys = meta
        weights, biases = list(tensors[:n_l]), list(tensors[n_l:n_l + n_b])
        lora_a, lora_b = list(tensors[n_l + n_b:n_l + n_b + n_ad]), list(tensors[n_l + n_b + n_ad:])
        ys, xa = kernels[0](x, weights, biases, bias_layer, lora_a, lora_b, layer, scaling, dropout_p, keys)
        ctx.save_for_backward(x, xa, *weights, *lora_a, *lora_b)  # as the custom op: in-place edits are caught
        ctx.meta, ctx.bwd = meta, kernels[1]
        ctx.mark_non_differentiable(xa)
        ctx.set_materialize_grads(False)
        return (*ys, xa)

    @staticmethod
    def backward(ctx, *grads):
        n_l, n_b, n_ad, bias_layer, layer, scaling, dropout_p, keys = ctx.meta
        need = ctx.needs_input_grad[1:]  # past ``kernels``
        saved = ctx.saved_tensors
        x, xa, weights = saved[0], saved[1], list(saved[2:2 + n_l])
        lora_a, lora_b = list(saved[2 + n_l:2 + n_l + n_ad]), list(saved[2 + n_l + n_ad:])
        dx, d_a, d_b, d_bias = lora_grads(ctx.bwd, grads[:-1], x, xa, weights, lora_a, lora_b, layer, scaling,
                                          dropout_p, keys, bias_layer, need[1],
                                          need[2 + n_l + n_b:2 + n_l + n_b + n_ad], need[2 + n_l + n_b + n_ad:],
                                          need[2 + n_l:2 + n_l + n_b])
        return (None, None, dx, *([None] * n_l), *d_bias, *d_a, *d_b)


class MixedFn(torch.autograd.Function):
    """One layer with a 16-bit ``x`` / base and float32 adapters (PEFT's default for half models, its
    ``autocast_adapter_dtype``), with PEFT's numerics: the base output in the input's dtype, the LoRA branch
    in float32 on the upcast input, their sum rounded once to the input's dtype::

        y = S_x( S_x(x W^T + b) + sum_k s_k drop_k(x32) A_k^T B_k^T + lbias )     lbias = sum_k s_k lora_bias_k

    Saved for backward: ``x`` (16-bit) and ``xa`` [M, sum r] float32; the float32 copy of ``x`` (which PEFT
    keeps for ``lora_A``'s backward) is recomputed. ``dx = dy W + S_x(sum_k drop_k^T(g_k A_k))``.
    """

    @staticmethod
    def forward(ctx, kernels, meta, x, weight, bias, lbias, *tensors):
        layer, scaling, dropout_p, keys = meta
        n_ad = len(layer)
        lora_a, lora_b = list(tensors[:n_ad]), list(tensors[n_ad:])
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        _, xa = kernels[0](x.float(), [], [], [], lora_a, lora_b, layer, scaling, dropout_p, keys)
        y32 = y.float()
        if lbias is not None:
            y32.add_(lbias)
        off = 0
        for a, b, s in zip(lora_a, lora_b, scaling):
            r = a.shape[0]
            y32.addmm_(xa[:, off:off + r], b.t(), alpha=s)
            off += r
        y.copy_(y32)
        ctx.save_for_backward(x, xa, weight, *lora_a, *lora_b)
        ctx.meta, ctx.bwd = meta, kernels[1]
        ctx.mark_non_differentiable(xa)
        ctx.set_materialize_grads(False)
        return y, xa

    @staticmethod
    def backward(ctx, dy, _dxa):
        layer, scaling, dropout_p, keys = ctx.meta
        need = ctx.needs_input_grad
        n_ad = len(layer)
        need_dx, need_bias, need_lbias = need[2], need[4], need[5]
        need_a, need_b = need[6:6 + n_ad], need[6 + n_ad:]
        x, xa, weight = ctx.saved_tensors[:3]
        lora_a, lora_b = list(ctx.saved_tensors[3:3 + n_ad]), list(ctx.saved_tensors[3 + n_ad:])
        if dy is None:
            dy = torch.zeros((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
        dy = dy.contiguous()
        dy32 = dy.float()
        dx, d_a, d_b = None, [None] * n_ad, [None] * n_ad
        if need_dx or any(need_a) or any(need_b):
            dx_l, d_a, d_b = ctx.bwd([dy32], x.float(), [], lora_a, lora_b, xa, layer, scaling, dropout_p, keys,
                                     need_dx, any(need_a), any(need_b))
            if need_dx:
                dx = torch.mm(dy, weight)
                dx.add_(dx_l)
            d_a = [t if n else None for t, n in zip(d_a, need_a)]
            d_b = [t if n else None for t, n in zip(d_b, need_b)]
        d_bias = dy32.sum(0).to(x.dtype) if need_bias else None
        d_lbias = dy32.sum(0) if need_lbias else None
        return (None, None, dx, None, d_bias, d_lbias, *d_a, *d_b)


def eager(tensors) -> bool:
    """True when a call can take :class:`EagerFn`: plain tensors, no compile / tracing / dispatch mode."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    for t in tensors:
        if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
            return False
    return True
