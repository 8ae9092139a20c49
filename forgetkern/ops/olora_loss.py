"""O-LoRA orthogonality loss (Wang et al. 2023), fused over all adapted layers.

Math, per adapted layer ``i`` with the frozen past factors ``A_past_i`` (p_i x in_i: the LoRA A rows of the
earlier tasks, stacked along the rank as the O-LoRA code does) and the current adapter's ``A_i`` (r_i x in_i)::

    P_i  = A_past_i @ A_i^T                                 (p_i x r_i)
    loss = sum_i sum_{a,b} |P_i[a,b]|                       norm="l1"   (the official code, the default)
    loss = sum_i ||P_i||_F^2                                norm="fro2" (the paper)
    dL/dA_i = sign(P_i)^T A_past_i   |   2 P_i^T A_past_i   (r_i x in_i; the past is frozen: no gradient)

The loss is a 0-dim tensor on the device (no host sync), float32 (float64 if any factor is float64); the
math runs in float32 (float64) whatever the factors' dtype, gradients are rounded once to ``A_i``'s dtype.
The backward is one fused call too (it recomputes the small ``P_i`` rather than saving it). Backends:
``torch`` (one ``mm`` per layer, fixed-order sum: the CPU path), ``triton`` (one launch per dtype
over a (layer, tile) grid, fixed-order reduction: deterministic) and ``cuda`` (csrc/cuda/olora_loss.cu: one
launch per dtype pair over a (layer, 32 x 32 tile of P) grid, the layer table in the kernel arguments, the
factors' slabs staged in shared memory, one double partial per block summed in a fixed order; the backward is
a seed kernel (S into a small float32 scratch) and a (layer, dA tile) kernel). float64 runs on ``torch``.
"""

from __future__ import annotations

from typing import List

import torch

from forgetkern import _backend, _ext, _validate
from forgetkern.reference import olora_loss as reference
from forgetkern.reference.olora_loss import NORMS, acc_dtype

OP = _backend.register_op("olora_loss")


def _triton():
    from forgetkern.triton import olora_loss

    return olora_loss


FWD_KERNELS = _backend.Kernels(OP, torch=lambda: reference.olora_loss, triton=lambda: _triton().olora_loss,
                               cuda=lambda: _ext.cuda_ops().olora_loss)
BWD_KERNELS = _backend.Kernels(OP, torch=lambda: reference.olora_loss_backward,
                               triton=lambda: _triton().olora_loss_backward,
                               cuda=lambda: _ext.cuda_ops().olora_loss_backward)


def _kernel(past, cur, kernels):
    # the Triton and CUDA kernels compute in float32: float64 inputs (gradcheck) run on the torch backend
    f64 = any(t.dtype == torch.float64 for t in list(past) + list(cur))
    return kernels(cur[0].device, supported=("torch",) if f64 else None)


@torch.library.custom_op("forgetkern::olora_loss", mutates_args=())
def _olora_loss_op(past: List[torch.Tensor], cur: List[torch.Tensor], norm: str) -> torch.Tensor:
    return _kernel(past, cur, FWD_KERNELS)(past, cur, norm)


@_olora_loss_op.register_fake
def _(past, cur, norm):
    return cur[0].new_empty((), dtype=acc_dtype(list(past) + list(cur)))


@torch.library.custom_op("forgetkern::olora_loss_backward", mutates_args=())
def _olora_loss_backward_op(past: List[torch.Tensor], cur: List[torch.Tensor], norm: str,
                            grad_out: torch.Tensor) -> List[torch.Tensor]:
    return _kernel(past, cur, BWD_KERNELS)(past, cur, norm, grad_out)


@_olora_loss_backward_op.register_fake
def _(past, cur, norm, grad_out):
    return [torch.empty_like(c) for c in cur]


def _setup_context(ctx, inputs, output):
    past, cur, norm = inputs
    ctx.save_for_backward(*past, *cur)
    ctx.n, ctx.norm = len(cur), norm


def _differentiable_grads(past, cur, norm, grad_out):
    """The gradient as torch expressions (double backward: d/dA of the L1 gradient is 0, of fro2 is 2 A_p^T A_p)."""
    out = []
    for p, c in zip(past, cur):
        acc = acc_dtype([p, c])
        prod = p.to(acc) @ c.to(acc).t()
        s = prod.sign() if norm == "l1" else prod * 2
        out.append(((s.t() @ p.to(acc)) * grad_out.to(acc)).to(c.dtype))
    return out


def _backward(ctx, grad_out):
    saved, n = ctx.saved_tensors, ctx.n
    past, cur = list(saved[:n]), list(saved[n:])
    if torch.is_grad_enabled():
        grads = _differentiable_grads(past, cur, ctx.norm, grad_out)
    else:
        grads = _olora_loss_backward_op(past, cur, ctx.norm, grad_out)
    return [None] * n, list(grads), None


_olora_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check(op: str, past, cur, norm: str):
    past = _validate.tensor_list(op, "past_A", past)
    cur = _validate.tensor_list(op, "cur_A", cur)
    if norm not in NORMS:
        raise ValueError(f"forgetkern.{op}: norm must be one of {NORMS} ('l1': sum |A_past A^T| as the O-LoRA "
                         f"code; 'fro2': ||A_past A^T||_F^2 as the paper), got {norm!r}")
    if len(past) != len(cur):
        raise ValueError(f"forgetkern.{op}: past_A has {len(past)} tensors but cur_A has {len(cur)}; the lists are "
                         f"parallel (one entry per adapted layer) and must have the same length")
    device = cur[0].device if cur else torch.device("cpu")
    _validate.matrix_lists(op, (("past_A", past), ("cur_A", cur)), device, "cur_A[0]", " (rank x in_features)")
    for i, (p, c) in enumerate(zip(past, cur)):
        if p.shape[1] != c.shape[1]:
            raise ValueError(f"forgetkern.{op}: past_A[{i}] has shape {tuple(p.shape)} but cur_A[{i}] has shape "
                             f"{tuple(c.shape)}: the in_features differ ({p.shape[1]} vs {c.shape[1]}); both are "
                             f"LoRA A factors (rank x in_features) of the same layer")
        if p.requires_grad:
            raise ValueError(f"forgetkern.{op}: past_A[{i}] requires grad; the past tasks' factors are frozen: "
                             f"pass past_A[{i}].detach()")
    return [p.contiguous() for p in past], [c.contiguous() for c in cur], device


def olora_loss(past_A, cur_A, *, norm: str = "l1") -> torch.Tensor:
    """O-LoRA's orthogonality loss between the past tasks' LoRA A factors and the current ones (module docstring).

    Args:
        past_A: ``A_past_i`` (p_i x in_i) per adapted layer, frozen (p_i = 0 is allowed: no past yet).
        cur_A: the current adapter's ``A_i`` (r_i x in_i), float32/bfloat16/float16/float64.
        norm: ``"l1"`` (sum of absolute values, the official code; default) or ``"fro2"`` (squared Frobenius
            norm, the paper).

    Returns:
        0-dim tensor on the device, differentiable in ``cur_A`` (fused backward); multiply by ``lam`` and add to
        the task loss.
    """
    past, cur, device = _check("olora_loss", past_A, cur_A, norm)
    if not cur:
        return torch.zeros((), dtype=torch.float32, device=device)
    return _olora_loss_op([p.detach() for p in past], cur, norm)
