"""``forgetkern.lwf_loss``: cross-entropy + distillation to a teacher, fused with the LM head, chunked.

The math is at the top of :mod:`forgetkern.reference.lwf_loss`. One op, ``forgetkern::lwf_loss``: its forward
returns the loss and the gradients (computed chunk by chunk, no full-vocabulary logits kept), its backward
scales the saved gradients by the incoming one (no second pass over the vocabulary).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from forgetkern import _backend, _validate
from forgetkern.reference import lwf_loss as reference

OP = _backend.register_op("lwf_loss")
KERNELS = _backend.Kernels(OP, torch=lambda: reference.lwf_loss)


class LwfLoss(NamedTuple):
    loss: torch.Tensor  # differentiable (wrt student hidden states, and the head when it requires grad)
    ce: torch.Tensor    # detached components, for logging
    kl: torch.Tensor


@torch.library.custom_op("forgetkern::lwf_loss", mutates_args=())
def _lwf_op(h_s: torch.Tensor, h_t: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            bias: Optional[torch.Tensor], alpha: float, temperature: float, ce_weight: float, chunk_size: int,
            need_weight_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
    return KERNELS(h_s.device)(h_s, h_t, weight, labels, bias, alpha, temperature, ce_weight, chunk_size,
                               need_weight_grad)


@_lwf_op.register_fake
def _(h_s, h_t, weight, labels, bias, alpha, temperature, ce_weight, chunk_size, need_weight_grad):
    acc = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    s = h_s.new_empty((), dtype=acc)
    gw = weight.new_empty(weight.shape) if need_weight_grad else weight.new_empty(0)
    gb = bias.new_empty(bias.shape) if (need_weight_grad and bias is not None) else h_s.new_empty(0)
    return s, s.clone(), s.clone(), h_s.new_empty(h_s.shape), gw, gb


def _setup(ctx, inputs, output):
    _, _, _, grad_h, grad_w, grad_b = output
    ctx.has_w = inputs[9]
    ctx.has_b = inputs[4] is not None
    ctx.save_for_backward(grad_h, grad_w, grad_b)


def _backward(ctx, g_loss, g_ce, g_kl, *unused):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    gh = grad_h * g_loss.to(grad_h.dtype)
    gw = grad_w * g_loss.to(grad_w.dtype) if ctx.has_w else None
    gb = grad_b * g_loss.to(grad_b.dtype) if (ctx.has_w and ctx.has_b) else None
    return gh, None, gw, None, gb, None, None, None, None, None


_lwf_op.register_autograd(_backward, setup_context=_setup)


def lwf_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
             labels: torch.Tensor, *, alpha: float = 1.0, temperature: float = 2.0, ce_weight: float = 1.0,
             bias: Optional[torch.Tensor] = None, chunk_size: int = 256) -> LwfLoss:
    """LwF loss ``ce_weight * CE(student, labels) + alpha * T^2 KL(teacher^T || student^T)`` (token means).

    Args:
        student_hidden / teacher_hidden: ``[..., H]`` final hidden states at the positions that predict
            ``labels`` (already shifted: row ``i`` predicts ``labels[i]``); the teacher's is not differentiated.
        weight: the LM head ``[V, H]`` (``bias`` ``[V]`` optional); differentiated only if it requires grad.
        labels: ``[...]`` int64 targets, ``-100`` = position not counted (neither CE nor KL).
        alpha, temperature, ce_weight: the distillation weight, its temperature ``T > 0``, the CE weight.
        chunk_size: rows of logits computed at a time (memory ``~ 2 * chunk_size * V`` floats).

    Returns:
        ``LwfLoss(loss, ce, kl)``: 0-dim tensors (float32; float64 for float64 inputs), ``loss`` differentiable.
    """
    op = "lwf_loss"
    for name, t in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"forgetkern.{op}: {name} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"forgetkern.{op}: teacher_hidden {tuple(teacher_hidden.shape)} must have the shape of "
                         f"student_hidden {tuple(student_hidden.shape)}")
    H = student_hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"forgetkern.{op}: weight must be [V, {H}] (the LM head), got {tuple(weight.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.shape != student_hidden.shape[:-1]:
        raise ValueError(f"forgetkern.{op}: labels must be an int64 tensor of shape {tuple(student_hidden.shape[:-1])}, "
                         f"got {getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if bias is not None and (bias.shape != (weight.shape[0],)):
        raise ValueError(f"forgetkern.{op}: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    alpha = _validate.check_float(op, "alpha", alpha)
    ce_weight = _validate.check_float(op, "ce_weight", ce_weight)
    temperature = _validate.check_float(op, "temperature", temperature)
    if alpha < 0 or ce_weight < 0:
        raise ValueError(f"forgetkern.{op}: alpha and ce_weight must be >= 0, got {alpha}, {ce_weight}")
    if not temperature > 0:
        raise ValueError(f"forgetkern.{op}: temperature must be > 0, got {temperature}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"forgetkern.{op}: chunk_size must be an int >= 1, got {chunk_size!r}")
    valid = labels[labels != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= weight.shape[0]):
        raise ValueError(f"forgetkern.{op}: labels must be -100 or in [0, {weight.shape[0]}), got values in "
                         f"[{int(valid.min())}, {int(valid.max())}]")
    h_s = student_hidden.reshape(-1, H)
    h_t = teacher_hidden.detach().reshape(-1, H)
    need_w = bool(weight.requires_grad or (bias is not None and bias.requires_grad)) and torch.is_grad_enabled()
    loss, ce, kl, *_ = _lwf_op(h_s, h_t, weight if need_w else weight.detach(), labels.reshape(-1),
                               None if bias is None else (bias if need_w else bias.detach()),
                               alpha, temperature, ce_weight, chunk_size, need_w)
    return LwfLoss(loss, ce.detach(), kl.detach())
