"""One AdamW step over whole tensor lists with the EWC penalty's gradient fused in: one pass over memory.

Math (per element, in float32; float64 for float64 parameters), with the step's scalars computed in double as
``torch.optim.AdamW`` computes them (``bc1 = 1 - beta1^step``, ``bc2 = 1 - beta2^step``)::

    g    = -grad if maximize else grad
    d    = p - p*;   g = g + lam * F * d                     (EWC; always a penalty, also under maximize)
    p    = p * (1 - lr * weight_decay)                       (decoupled weight decay)
    m    = lerp(m, g, 1 - beta1)
    v    = beta2 * v + (1 - beta2) * g^2
    vmax = max(vmax, v);  vhat = vmax if amsgrad else v
    p    = p - lr / bc1 * m / (sqrt(vhat) / sqrt(bc2) + eps)
    penalty = lam / 2 * sum F d^2                           (0-dim, from the same d; 0 without EWC)

Each element reads ``p, g, m, v`` (``vmax``, ``p*``, ``F``) once and writes ``p, m, v`` (``vmax``) once; the
unfused equivalent (``forgetkern.ewc_penalty_and_grad_`` then ``torch.optim.AdamW``) reads and writes the
gradient once more and reads the parameters twice. The exact operation order and rounding are in
``csrc/include/forgetkern/adamw_ewc.h`` (shared with the reference, ``forgetkern/reference/adamw_ewc.py``):
every output is rounded once to its dtype, like ``torch.optim.AdamW(fused=True)``; the penalty is summed in
the fixed order of :func:`forgetkern.ewc_penalty` (deterministic, no host sync).

maximize flips the task gradient only: the EWC term keeps pulling towards the anchor, so the step ascends the
task objective minus the penalty. (Negating ``.grad`` after ``EWC.apply_`` would instead push away from it.)
"""

from __future__ import annotations

from typing import List, Optional

import torch

from forgetkern import _backend, _ext, _validate
from forgetkern.reference import adamw_ewc as reference

OP = _backend.register_op("adamw_ewc", "adamw_ewc_")


def _triton():
    from forgetkern.triton import adamw_ewc

    return adamw_ewc


KERNELS = _backend.Kernels(
    OP,
    torch=lambda: reference.adamw_ewc_,
    cpp=lambda: _ext.cpu_ops().adamw_ewc_,
    cuda=lambda: _ext.cuda_ops().adamw_ewc_,
    triton=lambda: _triton().adamw_ewc_,
)


@torch.library.custom_op("forgetkern::adamw_ewc_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
def _adamw_ewc_op(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                  exp_avg_sqs: List[torch.Tensor], max_exp_avg_sqs: List[torch.Tensor],
                  anchors: List[torch.Tensor], fishers: List[torch.Tensor], lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, step: float, lam: float, amsgrad: bool,
                  maximize: bool) -> torch.Tensor:
    fn = KERNELS(params[0].device, supported=_supported(params[0].device))
    return fn(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, fishers, lr, beta1, beta2, eps,
              weight_decay, step, lam, amsgrad, maximize)


@_adamw_ewc_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, fishers, lr, beta1, beta2, eps,
      weight_decay, step, lam, amsgrad, maximize):
    return params[0].new_empty((), dtype=_result_dtype(params))


def _supported(device: torch.device) -> Optional[tuple]:
    """None: every backend of the op (an extension built from older sources lacks the kernel: see
    ``_backend.CPP_KERNELS`` / ``CUDA_KERNELS``, which make that backend unavailable with the reason)."""
    return None


def _result_dtype(params) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def check_hyper(op: str, *, lr, beta1, beta2, eps, weight_decay, lam=0.0, step=None) -> dict:
    """Range checks of the hyperparameters, with torch.optim.AdamW's bounds (errors name the argument)."""
    lr = _validate.check_float(op, "lr", lr)
    if lr < 0:
        raise ValueError(f"forgetkern.{op}: lr must be >= 0 (the learning rate), got {lr}")
    for name, b in (("betas[0]", beta1), ("betas[1]", beta2)):
        b = _validate.check_float(op, name, b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"forgetkern.{op}: {name} must be in [0, 1), got {b}")
    eps = _validate.check_float(op, "eps", eps)
    if eps < 0:
        raise ValueError(f"forgetkern.{op}: eps must be >= 0, got {eps}")
    wd = _validate.check_float(op, "weight_decay", weight_decay)
    if wd < 0:
        raise ValueError(f"forgetkern.{op}: weight_decay must be >= 0, got {wd}")
    lam = _validate.check_float(op, "lam", lam)
    if lam < 0:
        raise ValueError(f"forgetkern.{op}: lam must be >= 0 (the EWC strength), got {lam}")
    out = {"lr": lr, "beta1": float(beta1), "beta2": float(beta2), "eps": eps, "weight_decay": wd, "lam": lam}
    if step is not None:
        step = _validate.check_float(op, "step", step)
        if step < 1:
            raise ValueError(f"forgetkern.{op}: step must be >= 1 (the step count after this step), got {step}")
        out["step"] = step
    return out


def _run_unchecked(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, fishers, *, lr, beta1, beta2,
                   eps, weight_decay, step, lam, amsgrad, maximize) -> torch.Tensor:
    """The op on lists the caller guarantees valid (``forgetkern.optim.AdamW``: its own state, contiguous, one
    device, matching dtypes and shapes, nothing aliased). Eager mode calls the backend's kernel directly and
    bumps the version counters of what it wrote (the custom op's wrapper costs ~7 us per tensor, a third of
    the step on a 420-tensor LoRA list); under ``torch.compile`` it goes through the custom op."""
    if torch.compiler.is_compiling():
        return _adamw_ewc_op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, fishers, lr, beta1,
                             beta2, eps, weight_decay, step, lam, amsgrad, maximize)
    fn = KERNELS(params[0].device, supported=_supported(params[0].device))
    out = fn(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, fishers, lr, beta1, beta2, eps,
             weight_decay, step, lam, amsgrad, maximize)
    torch.autograd.graph.increment_version(params + exp_avgs + exp_avg_sqs + max_exp_avg_sqs)
    return out


def adamw_ewc_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, anchors=None, fishers=None,
               lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
               step: float, lam: float = 0.0, amsgrad: bool = False, maximize: bool = False) -> torch.Tensor:
    """One fused AdamW (+ EWC) step in place over the lists (module docstring); returns the EWC penalty.

    Args:
        params: parameters (float32/bfloat16/float16/float64), updated in place.
        grads: their gradients (same dtypes), read only (the EWC term is added on the fly, not into them).
        exp_avgs, exp_avg_sqs: AdamW's moments (same dtypes as ``params``), updated in place.
        max_exp_avg_sqs: with ``amsgrad=True``, the running maxima (updated in place); else None or [].
        anchors, fishers: EWC's ``theta*`` and diagonal Fisher (one dtype per pair), or both None.
        lr, beta1, beta2, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.AdamW``.
        step: the step count AFTER this step (torch's ``state['step']`` once incremented), >= 1.
        lam: EWC strength (>= 0), Kirkpatrick's ``lam/2`` convention (as :func:`forgetkern.ewc_penalty`).

    Returns:
        0-dim tensor on the device: ``lam/2 * sum F (p - p*)^2`` at the parameters before the step (float32;
        float64 if any parameter is float64); 0 without EWC.

    :class:`forgetkern.optim.AdamW` is the optimizer built on this op.
    """
    op = "adamw_ewc_"
    h = check_hyper(op, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, lam=lam, step=step)
    params = _validate.tensor_list(op, "params", params)
    grads = _validate.tensor_list(op, "grads", grads)
    exp_avgs = _validate.tensor_list(op, "exp_avgs", exp_avgs)
    exp_avg_sqs = _validate.tensor_list(op, "exp_avg_sqs", exp_avg_sqs)
    amsgrad, maximize = bool(amsgrad), bool(maximize)
    if amsgrad:
        if max_exp_avg_sqs is None:
            raise ValueError(f"forgetkern.{op}: amsgrad=True needs max_exp_avg_sqs (one tensor per parameter)")
        max_exp_avg_sqs = _validate.tensor_list(op, "max_exp_avg_sqs", max_exp_avg_sqs)
    else:
        max_exp_avg_sqs = []
    if (anchors is None) != (fishers is None):
        raise ValueError(f"forgetkern.{op}: pass both anchors and fishers (EWC) or neither")
    anchors = [] if anchors is None else _validate.tensor_list(op, "anchors", anchors)
    fishers = [] if fishers is None else _validate.tensor_list(op, "fishers", fishers)
    lists = [("params", params, _validate.FLOAT_DTYPES), ("grads", grads, _validate.FLOAT_DTYPES),
             ("exp_avgs", exp_avgs, _validate.FLOAT_DTYPES), ("exp_avg_sqs", exp_avg_sqs, _validate.FLOAT_DTYPES)]
    same = {"grads": "params", "exp_avgs": "params", "exp_avg_sqs": "params"}
    if amsgrad:
        lists.append(("max_exp_avg_sqs", max_exp_avg_sqs, _validate.FLOAT_DTYPES))
        same["max_exp_avg_sqs"] = "params"
    if anchors:
        lists += [("anchors", anchors, _validate.FLOAT_DTYPES), ("fishers", fishers, _validate.FLOAT_DTYPES)]
        same["fishers"] = "anchors"
    if len(anchors) != len(fishers):
        raise ValueError(f"forgetkern.{op}: anchors has {len(anchors)} tensors but fishers has {len(fishers)}")
    device = _validate.check_tensor_lists(op, lists, same_dtype_as=same)
    for name, xs in (("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                     ("max_exp_avg_sqs", max_exp_avg_sqs)):
        for i, x in enumerate(xs):
            if x.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"forgetkern.{op}: {name}[{i}] requires grad and grad mode is on; the step "
                                 f"updates it in place: call it under torch.no_grad() (as optimizers do)")
    _validate.no_overlap(op, [("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                              ("max_exp_avg_sqs", max_exp_avg_sqs)],
                         [("grads", grads), ("anchors", anchors), ("fishers", fishers)])
    if not params or all(p.numel() == 0 for p in params):
        return torch.zeros((), dtype=_result_dtype(params), device=device)
    return _adamw_ewc_op([p.detach() for p in params], [g.detach() for g in grads], exp_avgs, exp_avg_sqs,
                         max_exp_avg_sqs, [a.detach() for a in anchors], [f.detach() for f in fishers], h["lr"],
                         h["beta1"], h["beta2"], h["eps"], h["weight_decay"], h["step"], h["lam"], amsgrad,
                         maximize)
