"""EWC penalty and its gradient, fused over a whole list of parameters in one pass over memory.

Math, with ``d = theta - theta_star`` computed in float32 (float64 for float64 parameters)::

    penalty = lam / 2 * sum_i F_i * d_i^2        (one 0-dim tensor for all tensors of the lists)
    grad_i += lam * F_i * d_i                    (= d penalty / d theta_i)

One kernel reads ``theta``, ``theta*``, ``F`` and ``grad`` once and writes ``grad`` once; the penalty is
reduced in a fixed order (deterministic, no float atomics) and stays on the device (no host sync).

The 1/2 convention: this is the penalty of Kirkpatrick et al. (2017), ``lam/2 * sum F (theta - theta*)^2``,
whose gradient is ``lam * F * d``. Avalanche's ``EWCPlugin`` adds ``ewc_lambda * sum F (theta - theta*)^2``
(no 1/2); to reproduce it pass ``lam = 2 * ewc_lambda``.

Anchors ``theta*`` and the Fisher ``F`` may be stored in float32 or bfloat16 (half the memory; any float dtype
is read), parameters in float32/float16/bfloat16/float64; math is always float32 or wider.

Online EWC (Schwarz et al., 2018) keeps ONE running Fisher ``F <- gamma * F + F_new`` (see
:func:`forgetkern.fisher_accumulate_` with ``decay=gamma``) and one anchor; separate EWC keeps one
(anchor, Fisher) pair per old task: call the op once per task, or concatenate the lists.

Sharded parameters (DTensors from FSDP2's ``fully_shard``): both functions run the kernel on every rank's local
shards and all-reduce the 0-dim penalty once (4 bytes); anchors, Fishers and grads must be DTensors laid out like
the parameters (``forgetkern/_sharded.py``).
"""

from __future__ import annotations

from typing import List

import torch

from forgetkern import _backend, _ext, _sharded, _validate
from forgetkern.reference import ewc_penalty as reference

OP = _backend.register_op("ewc_fused", "ewc_penalty_and_grad_", "ewc_penalty")


def _triton():
    from forgetkern.triton import ewc_penalty

    return ewc_penalty


# One kernel for both ops: penalty, and optionally its gradient written or added into grads.
KERNELS = _backend.Kernels(
    OP,
    torch=lambda: reference.ewc_fused,
    cpp=lambda: _ext.cpu_ops().ewc_fused,
    cuda=lambda: _ext.cuda_ops().ewc_fused,
    triton=lambda: _triton().ewc_fused,
)


@torch.library.custom_op("forgetkern::ewc_fused", mutates_args=("grads",))
def _ewc_fused_op(params: List[torch.Tensor], anchors: List[torch.Tensor], fishers: List[torch.Tensor],
                  grads: List[torch.Tensor], lam: float, write_grad: bool, accumulate: bool) -> torch.Tensor:
    return KERNELS(params[0].device)(params, anchors, fishers, grads, lam, write_grad, accumulate)


@_ewc_fused_op.register_fake
def _(params, anchors, fishers, grads, lam, write_grad, accumulate):
    return params[0].new_empty((), dtype=_result_dtype(params))


@torch.library.custom_op("forgetkern::ewc_penalty", mutates_args=())
def _ewc_penalty_op(params: List[torch.Tensor], anchors: List[torch.Tensor], fishers: List[torch.Tensor],
                    lam: float) -> torch.Tensor:
    return KERNELS(params[0].device)(params, anchors, fishers, [], lam, False, False)


@_ewc_penalty_op.register_fake
def _(params, anchors, fishers, lam):
    return params[0].new_empty((), dtype=_result_dtype(params))


def _setup_context(ctx, inputs, output):
    params, anchors, fishers, lam = inputs
    ctx.save_for_backward(*params, *anchors, *fishers)
    ctx.n, ctx.lam = len(params), lam


def _backward(ctx, grad_out):
    saved, n = ctx.saved_tensors, ctx.n
    params, anchors, fishers = saved[:n], saved[n:2 * n], saved[2 * n:]
    if torch.is_grad_enabled():
        # create_graph=True (double backward, e.g. a gradient penalty or Hessian-vector products): the same
        # lam*F*d in differentiable torch ops, math in float32 (float64 for float64 params) like the kernel.
        grads = []
        for p, a, f in zip(params, anchors, fishers):
            acc = torch.float64 if p.dtype == torch.float64 else torch.float32
            grads.append((ctx.lam * f.to(acc) * (p.to(acc) - a.to(acc)) * grad_out).to(p.dtype))
        return grads, [None] * n, [None] * n, None
    grads = [torch.empty_like(p) for p in params]
    # The kernel writes lam*F*d (a write, not an accumulate: no zero-fill pass), then the incoming gradient,
    # which stays on the device (no host sync, traceable by torch.compile), scales it.
    _ewc_fused_op(list(params), list(anchors), list(fishers), grads, ctx.lam, True, False)
    torch._foreach_mul_(grads, grad_out)
    return grads, [None] * n, [None] * n, None


_ewc_penalty_op.register_autograd(_backward, setup_context=_setup_context)


def _result_dtype(params) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _check(op: str, params, anchors, fishers, lam, grads=None):
    params = _validate.tensor_list(op, "params", params)
    anchors = _validate.tensor_list(op, "anchors", anchors)
    fishers = _validate.tensor_list(op, "fishers", fishers)
    lists = [("params", params, _validate.FLOAT_DTYPES), ("anchors", anchors, _validate.FLOAT_DTYPES),
             ("fishers", fishers, _validate.FLOAT_DTYPES)]
    if grads is not None:
        grads = _validate.tensor_list(op, "grads", grads)
        lists.append(("grads", grads, _validate.FLOAT_DTYPES))
    lam = _validate.check_float(op, "lam", lam)
    if lam < 0:
        raise ValueError(f"forgetkern.{op}: lam must be >= 0 (the EWC strength), got {lam}")
    device = _validate.check_tensor_lists(op, lists, same_dtype_as={"grads": "params"} if grads is not None else None)
    for name, xs in (("anchors", anchors), ("fishers", fishers)):
        for i, x in enumerate(xs):
            if x.requires_grad:
                raise ValueError(f"forgetkern.{op}: {name}[{i}] requires grad; the EWC penalty is "
                                 f"differentiable in params only: pass {name}[{i}].detach()")
    if grads is not None:
        _validate.no_overlap(op, [("grads", grads)], [("params", params), ("anchors", anchors),
                                                      ("fishers", fishers)])
    return params, anchors, fishers, lam, grads, device


def ewc_penalty_and_grad_(params, anchors, fishers, *, lam: float, grads) -> torch.Tensor:
    """Return the EWC penalty and add its gradient into ``grads`` in place, in one pass, no autograd graph.

    Args:
        params: current parameters ``theta`` (float32/float16/bfloat16/float64).
        anchors: ``theta*``, the parameters after the old task (any float dtype, e.g. bfloat16 to halve memory).
        fishers: diagonal Fisher ``F`` (any float dtype).
        lam: EWC strength (>= 0), with the 1/2 convention of the module docstring.
        grads: gradient buffers, same dtype as ``params`` (typically ``[p.grad for p in params]``), updated
            in place: ``grads[i] += lam * F_i * (theta_i - theta*_i)``.

    Returns:
        0-dim tensor on the device: ``lam/2 * sum F (theta - theta*)^2`` (float32; float64 for float64 params).
        Add it to your logged loss; its gradient is already in ``grads``.
    """
    op = "ewc_penalty_and_grad_"
    if _sharded.any_dtensor(params, anchors, fishers, grads):  # FSDP2: local shards, one scalar all-reduce
        mesh, loc = _sharded.local_lists(op, list(params), {"params": params, "anchors": anchors,
                                                            "fishers": fishers, "grads": grads})
        local = ewc_penalty_and_grad_(loc["params"], loc["anchors"], loc["fishers"], lam=lam, grads=loc["grads"])
        return _sharded.all_reduce_sum(local, mesh)
    params, anchors, fishers, lam, grads, device = _check(op, params, anchors, fishers, lam, grads)
    if not params:
        return torch.zeros((), dtype=torch.float32, device=device)
    return _ewc_fused_op([p.detach() for p in params], anchors, fishers, grads, lam, True, True)


def ewc_penalty(params, anchors, fishers, lam: float) -> torch.Tensor:
    """Differentiable EWC penalty ``lam/2 * sum F (theta - theta*)^2`` (see the module docstring).

    The forward is one fused reduction over the lists; the backward is the same fused kernel writing
    ``lam * F * (theta - theta*)`` (scaled by the incoming gradient) into fresh gradient tensors. Use it as
    ``loss = task_loss + forgetkern.ewc_penalty(params, anchors, fishers, lam)``. Double backward
    (``create_graph=True``) is supported: the gradient is then computed with differentiable torch ops (its own
    derivative is ``lam * F``). When you do not need autograd, :func:`ewc_penalty_and_grad_` saves the gradient allocation and the graph.
    """
    if _sharded.any_dtensor(params, anchors, fishers):  # FSDP2: local shards, one scalar all-reduce
        mesh, loc = _sharded.local_lists("ewc_penalty", list(params), {"params": params, "anchors": anchors,
                                                                       "fishers": fishers})
        return _sharded.all_reduce_sum(ewc_penalty(loc["params"], loc["anchors"], loc["fishers"], lam), mesh)
    params, anchors, fishers, lam, _, device = _check("ewc_penalty", params, anchors, fishers, lam)
    if not params:
        return torch.zeros((), dtype=torch.float32, device=device)
    return _ewc_penalty_op(params, anchors, fishers, lam)
