"""EWC penalty of LoRA adapters' effective updates, fused over all adapted layers, never materialising ``B A``.

Math, per adapted layer ``i`` with ``A_i`` (r_i x in_i), ``B_i`` (out_i x r_i), the diagonal Fisher ``F_i``
(out_i x in_i) of the frozen base weight and the LoRA scaling ``s_i`` (the update is ``dW_i = s_i B_i A_i``)::

    penalty = lam / 2 * sum_i sum_{o,j} F_i[o,j] * (s_i * (B_i A_i)[o,j])^2
    dP/dA_i = s_i^2 * lam * B_i^T (F_i * B_i A_i)          (r_i x in_i)
    dP/dB_i = s_i^2 * lam * (F_i * B_i A_i) A_i^T          (out_i x r_i)

This is EWC on the base weight ``W = W0 + dW`` with the anchor ``W0`` (``theta - theta* = dW``): the penalty
of :func:`forgetkern.ewc_penalty` on merged weights, computed from the factors. The kernels read ``F`` once,
tile by tile, recompute ``B A`` per tile from the factors (rank-r products) and never allocate ``out x in``;
the penalty and the gradients are reduced in a fixed order (deterministic, no float atomics) and stay on the
device (no host sync).

Backends: ``torch`` (the reference: materialises ``B A``), ``cpp`` (OpenMP), ``triton``
(``forgetkern/triton/ewc_delta_w.py``: float32/bfloat16/float16 factors, ranks <= 64) and ``cuda``
(``csrc/cuda/ewc_delta_w.cu``: every dtype, ranks <= 64); inputs a backend does not cover run on ``auto``'s next
choice, and asking for that backend explicitly raises :class:`forgetkern.BackendError`.

Dtypes: factors float32/bfloat16/float16/float64 (``A_i`` and ``B_i`` alike); the Fisher any float dtype
(typically float32 or bfloat16); math in float32 (float64 for float64 factors); the penalty is float32
(float64 if any factor is float64); gradients are stored in the factors' dtype, rounded once.
Non-contiguous factors or Fishers are read through a contiguous copy (a Fisher copy costs out x in: pass
contiguous Fishers); ``grads_a`` / ``grads_b`` are written in place and must be contiguous.
"""

from __future__ import annotations

from typing import List

import torch

from forgetkern import _backend, _ext, _validate
from forgetkern.reference import ewc_delta_w as reference
from forgetkern.reference.ewc_delta_w import ewc_delta_w_grads, result_dtype

OP = _backend.register_op("ewc_delta_w", "ewc_delta_w_and_grad_")


KERNELS = _backend.Kernels(
    OP,
    torch=lambda: reference.ewc_delta_w,
    cpp=lambda: _ext.cpu_ops().ewc_delta_w,
    cuda=lambda: _ext.cuda_ops().ewc_delta_w,
    triton=lambda: _triton().ewc_delta_w,
)


def _triton():
    from forgetkern.triton import ewc_delta_w as tri

    return tri


def _kernel(lora_a):
    # the Triton kernel computes in float32 with ranks <= 64 (float64 factors, e.g. gradcheck, and larger ranks
    # run on the other backends); the CUDA kernel handles every dtype with ranks <= 64
    excluded = set()
    if any(a.dtype == torch.float64 for a in lora_a):
        excluded.add("triton")
    if any(a.shape[0] > 64 for a in lora_a):
        excluded.update(("triton", "cuda"))
    if excluded:
        return KERNELS(lora_a[0].device, supported=tuple(b for b in KERNELS.backends if b not in excluded))
    return KERNELS(lora_a[0].device)


@torch.library.custom_op("forgetkern::ewc_delta_w_fused", mutates_args=("grads_a", "grads_b"))
def _ewc_delta_w_fused_op(lora_a: List[torch.Tensor], lora_b: List[torch.Tensor], fishers: List[torch.Tensor],
                          scaling: List[float], lam: float, grads_a: List[torch.Tensor],
                          grads_b: List[torch.Tensor]) -> torch.Tensor:
    return _kernel(lora_a)(lora_a, lora_b, fishers, scaling, lam, grads_a, grads_b, True)


@_ewc_delta_w_fused_op.register_fake
def _(lora_a, lora_b, fishers, scaling, lam, grads_a, grads_b):
    return lora_a[0].new_empty((), dtype=result_dtype(lora_a))


@torch.library.custom_op("forgetkern::ewc_delta_w", mutates_args=())
def _ewc_delta_w_op(lora_a: List[torch.Tensor], lora_b: List[torch.Tensor], fishers: List[torch.Tensor],
                    scaling: List[float], lam: float) -> torch.Tensor:
    return _kernel(lora_a)(lora_a, lora_b, fishers, scaling, lam, [], [], False)


@_ewc_delta_w_op.register_fake
def _(lora_a, lora_b, fishers, scaling, lam):
    return lora_a[0].new_empty((), dtype=result_dtype(lora_a))


def _setup_context(ctx, inputs, output):
    lora_a, lora_b, fishers, scaling, lam = inputs
    ctx.save_for_backward(*lora_a, *lora_b, *fishers)
    ctx.n, ctx.scaling, ctx.lam = len(lora_a), list(scaling), lam


def _backward(ctx, grad_out):
    saved, n = ctx.saved_tensors, ctx.n
    lora_a, lora_b, fishers = list(saved[:n]), list(saved[n:2 * n]), list(saved[2 * n:])
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the gradients as differentiable torch expressions. These
        # materialise B A (out x in) per layer, like the reference.
        ga, gb = ewc_delta_w_grads(lora_a, lora_b, fishers, ctx.scaling, ctx.lam)
        ga = [g * grad_out.to(g.dtype) for g in ga]
        gb = [g * grad_out.to(g.dtype) for g in gb]
        return ga, gb, [None] * n, None, None
    # factor-sized zero fill, then the fused kernel adds the gradients; the incoming gradient (on the device:
    # no host sync) scales them.
    ga = [torch.zeros_like(a) for a in lora_a]
    gb = [torch.zeros_like(b) for b in lora_b]
    _ewc_delta_w_fused_op(lora_a, lora_b, fishers, ctx.scaling, ctx.lam, ga, gb)
    torch._foreach_mul_(ga, grad_out)
    torch._foreach_mul_(gb, grad_out)
    return ga, gb, [None] * n, None, None


_ewc_delta_w_op.register_autograd(_backward, setup_context=_setup_context)


def _scaling_list(op: str, scaling, n: int) -> list:
    if isinstance(scaling, (list, tuple)):
        if len(scaling) != n:
            raise ValueError(f"forgetkern.{op}: scaling has {len(scaling)} values but lora_a has {n} tensors; "
                             f"pass one float per layer, or a single float for all")
        return [_validate.check_float(op, f"scaling[{i}]", s) for i, s in enumerate(scaling)]
    return [_validate.check_float(op, "scaling", scaling)] * n


def _check(op: str, lora_a, lora_b, fishers, scaling, lam, grads_a=None, grads_b=None):
    lora_a = _validate.tensor_list(op, "lora_a", lora_a)
    lora_b = _validate.tensor_list(op, "lora_b", lora_b)
    fishers = _validate.tensor_list(op, "fishers", fishers)
    named = [("lora_a", lora_a), ("lora_b", lora_b), ("fishers", fishers)]
    if grads_a is not None:
        named += [("grads_a", _validate.tensor_list(op, "grads_a", grads_a)),
                  ("grads_b", _validate.tensor_list(op, "grads_b", grads_b))]
    n = len(lora_a)
    for name, xs in named[1:]:
        if len(xs) != n:
            raise ValueError(f"forgetkern.{op}: {name} has {len(xs)} tensors but lora_a has {n}; the lists are "
                             f"parallel (one entry per adapted layer) and must have the same length")
    scaling = _scaling_list(op, scaling, n)
    lam = _validate.check_float(op, "lam", lam)
    if lam < 0:
        raise ValueError(f"forgetkern.{op}: lam must be >= 0 (the EWC strength), got {lam}")
    device = lora_a[0].device if n else torch.device("cpu")
    for name, xs in named:
        for i, x in enumerate(xs):
            where = f"forgetkern.{op}: {name}[{i}]"
            if x.layout != torch.strided:
                raise TypeError(f"{where} must be a dense (strided) tensor, got layout {x.layout}")
            if x.dtype not in _validate.FLOAT_DTYPES:
                raise TypeError(f"{where} has dtype {x.dtype}; expected one of float32, float16, bfloat16, "
                                f"float64")
            if x.device != device:
                raise ValueError(f"{where} is on {x.device} but lora_a[0] is on {device}; all tensors must be "
                                 f"on one device")
            if x.dim() != 2:
                raise ValueError(f"{where} must be 2-D, got shape {tuple(x.shape)}")
    for i, (a, b, f) in enumerate(zip(lora_a, lora_b, fishers)):
        where = f"forgetkern.{op}:"
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"{where} lora_b[{i}] has shape {tuple(b.shape)} (out, r) but lora_a[{i}] has shape "
                             f"{tuple(a.shape)} (r, in): the ranks differ ({b.shape[1]} vs {a.shape[0]}), "
                             f"B @ A does not chain")
        if f.shape != (b.shape[0], a.shape[1]):
            raise ValueError(f"{where} fishers[{i}] has shape {tuple(f.shape)} but lora_b[{i}] @ lora_a[{i}] is "
                             f"{(b.shape[0], a.shape[1])} (out, in): the Fisher is that of the base weight")
        if b.dtype != a.dtype:
            raise TypeError(f"{where} lora_b[{i}] has dtype {b.dtype} but lora_a[{i}] has {a.dtype}; they must "
                            f"match")
        if f.requires_grad:
            raise ValueError(f"{where} fishers[{i}] requires grad; the penalty is differentiable in the LoRA "
                             f"factors only: pass fishers[{i}].detach()")
    if grads_a is not None:
        for (gname, gs), (pname, ps) in ((named[3], named[0]), (named[4], named[1])):
            for i, (g, p) in enumerate(zip(gs, ps)):
                where = f"forgetkern.{op}: {gname}[{i}]"
                if g.shape != p.shape:
                    raise ValueError(f"{where} has shape {tuple(g.shape)} but {pname}[{i}] has shape "
                                     f"{tuple(p.shape)}")
                if g.dtype != p.dtype:
                    raise TypeError(f"{where} has dtype {g.dtype} but {pname}[{i}] has {p.dtype}; they must match")
                if not g.is_contiguous():
                    raise ValueError(f"{where} is not contiguous; the op adds into it in place (an update of a "
                                     f"copy would be lost): pass a contiguous buffer")
        _validate.no_overlap(op, named[3:], named[:3])
    # read-only inputs: a contiguous view (a no-op when they already are)
    lora_a = [a.contiguous() for a in lora_a]
    lora_b = [b.contiguous() for b in lora_b]
    fishers = [f.contiguous() for f in fishers]
    grads = (named[3][1], named[4][1]) if grads_a is not None else (None, None)
    return lora_a, lora_b, fishers, scaling, lam, grads, device


def ewc_delta_w_and_grad_(lora_a, lora_b, fishers, *, scaling, lam: float, grads_a, grads_b) -> torch.Tensor:
    """Return the EWC penalty of the LoRA updates and add its gradients into ``grads_a`` / ``grads_b`` in place,
    in one fused pass, no autograd graph (math in the module docstring).

    Args:
        lora_a: ``A_i`` (r_i x in_i), one per adapted layer (float32/bfloat16/float16/float64).
        lora_b: ``B_i`` (out_i x r_i), same dtype as ``lora_a[i]``.
        fishers: diagonal Fisher of the base weight, (out_i x in_i), any float dtype (float32 or bfloat16
            typically); must not require grad.
        scaling: the LoRA scaling ``s_i`` (``alpha / r``): one float for all layers or one per layer.
        lam: EWC strength (>= 0), with the 1/2 convention of :func:`forgetkern.ewc_penalty`.
        grads_a, grads_b: gradient buffers shaped and typed like ``lora_a`` / ``lora_b`` (typically
            ``[a.grad for a in lora_a]``), contiguous, updated in place with ``dP/dA_i`` and ``dP/dB_i``.

    Returns:
        0-dim tensor on the device (float32; float64 for float64 factors): the penalty.
    """
    op = "ewc_delta_w_and_grad_"
    if grads_a is None or grads_b is None:
        raise TypeError(f"forgetkern.{op}: grads_a and grads_b are required (lists of gradient buffers); for a "
                        f"differentiable penalty use forgetkern.ewc_delta_w")
    lora_a, lora_b, fishers, scaling, lam, (ga, gb), device = _check(op, lora_a, lora_b, fishers, scaling, lam,
                                                                     grads_a, grads_b)
    if not lora_a:
        return torch.zeros((), dtype=torch.float32, device=device)
    return _ewc_delta_w_fused_op([a.detach() for a in lora_a], [b.detach() for b in lora_b], fishers, scaling,
                                 lam, ga, gb)


def ewc_delta_w(lora_a, lora_b, fishers, *, scaling, lam: float) -> torch.Tensor:
    """Differentiable EWC penalty of the LoRA updates ``s_i B_i A_i`` (see the module docstring).

    The forward is one fused reduction; the backward is the fused kernel writing ``dP/dA_i`` and ``dP/dB_i``
    (scaled by the incoming gradient). Use it as ``loss = task_loss + forgetkern.ewc_delta_w(As, Bs, Fs,
    scaling=s, lam=lam)``. Double backward (``create_graph=True``) is computed with differentiable torch ops
    that materialise ``B_i A_i``. Without autograd, :func:`ewc_delta_w_and_grad_` saves the gradient
    allocations and the graph.
    """
    lora_a, lora_b, fishers, scaling, lam, _, device = _check("ewc_delta_w", lora_a, lora_b, fishers, scaling,
                                                              lam)
    if not lora_a:
        return torch.zeros((), dtype=torch.float32, device=device)
    return _ewc_delta_w_op(lora_a, lora_b, fishers, scaling, lam)
