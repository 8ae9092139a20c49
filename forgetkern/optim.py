"""``forgetkern.optim.AdamW``: ``torch.optim.AdamW`` with the EWC penalty's gradient fused into its step.

    ewc = forgetkern.EWC(model, fisher, lam=1.0)                       # target="params"
    opt = forgetkern.optim.AdamW(model.parameters(), lr=1e-4, ewc=ewc)
    loss = task_loss(model(x)); loss.backward()                        # no ewc.penalty() / ewc.apply_()
    opt.step(); opt.zero_grad()
    log(loss + opt.last_ewc_penalty)                                   # the penalty of that step (0-dim)

One multi-tensor pass per step (:func:`forgetkern.ops.adamw_ewc.adamw_ewc_`) reads ``p, g, m, v, p*, F`` once and
writes ``p, m, v`` once, with ``g + lam F (p - p*)`` as the gradient; the unfused equivalent is
``ewc.apply_()`` followed by ``torch.optim.AdamW.step()``.

Compatibility with ``torch.optim.AdamW``:

* Same hyperparameters, defaults, param-group keys and state (``state[p]['step']`` a float32 CPU 0-dim tensor,
  ``'exp_avg'``, ``'exp_avg_sq'``, ``'max_exp_avg_sq'`` with ``amsgrad``): a state_dict of either loads into the
  other and training continues. ``lr`` may be a float or a 1-element tensor. ``zero_grad``, hooks,
  ``add_param_group`` are ``torch.optim.Optimizer``'s.
* Numbers: every output is rounded once to its dtype from float32 math (float64 for float64 parameters), with
  torch's scalar coefficients and operation order; ``torch.optim.AdamW``'s CPU path instead uses fused
  multiply-adds in ``lerp``/``addcmul`` and a vector ``sqrt`` that is not always correctly rounded, and for
  bfloat16 parameters rounds every intermediate to bfloat16. The differences are a few units in the last
  place per step: tests/test_adamw_ewc.py checks, after 40 steps against a float64 AdamW on the same
  gradients, that this optimizer's error is at most twice torch's own (plus one ulp); for bfloat16 it is
  typically half of torch's, and within two bfloat16 ulps of ``torch.optim.AdamW(fused=True)``.
* ``foreach``, ``fused``, ``capturable`` and ``differentiable`` are not arguments (the step is always the fused
  kernel, not differentiable); the keys are kept in the param groups (None / False) so that a state_dict
  loads into ``torch.optim.AdamW``. A loaded group with ``capturable`` or ``differentiable`` True is refused.

EWC (``ewc``, a :class:`forgetkern.EWC` over parameters of this optimizer):

* ``target="params"``: fused. In separate mode with several consolidated tasks the first task's (anchor,
  Fisher) pair is fused and the others' gradients are added by :func:`forgetkern.ewc_penalty_and_grad_` first.
* ``target="delta_w"``: the penalty acts on ``s B A`` (a product of two parameters), which is not elementwise;
  ``step()`` then calls ``ewc.apply_()`` before the (plain fused AdamW) step.
* Parameters whose ``.grad`` is None are skipped by the update, as torch does (no state, no step count): the
  EWC gradient is not applied to them (``ewc.apply_()`` would have created a ``.grad``; this optimizer does not).
  Their penalty still counts in ``last_ewc_penalty``, which equals ``ewc.penalty()`` at the parameters before
  the step (the function's value does not depend on which gradients exist).
* ``maximize=True`` negates the task gradient only; the EWC term stays a penalty (pulls towards the anchor).
* ``ewc.lam`` is read at every step (it may be changed during training).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch.optim.optimizer import Optimizer, _get_scalar_dtype

from forgetkern.ops.adamw_ewc import _run_unchecked, check_hyper
from forgetkern.ops.ewc_penalty import ewc_penalty, ewc_penalty_and_grad_

__all__ = ["AdamW"]


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class AdamW(Optimizer):
    """AdamW (decoupled weight decay; Loshchilov & Hutter) with an optional fused EWC penalty.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        ewc: a :class:`forgetkern.EWC` whose parameters are in this optimizer's param groups, or None
            (then the step is exactly AdamW). See the module docstring.

    After each :meth:`step`, :attr:`last_ewc_penalty` holds the step's EWC penalty (0-dim device tensor, no
    host sync; None without ``ewc``).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, maximize: bool = False, *, ewc=None):
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"forgetkern.optim.AdamW: a Tensor lr must have 1 element, got shape "
                                 f"{tuple(lr.shape)}")
            lr_value = float(lr.item())
        else:
            lr_value = lr
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"forgetkern.optim.AdamW: betas must be a pair (beta1, beta2), got {betas!r}")
        check_hyper("optim.AdamW", lr=lr_value, beta1=_scalar(betas[0]), beta2=_scalar(betas[1]), eps=eps,
                    weight_decay=weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad),
                        maximize=bool(maximize), foreach=None, capturable=False, differentiable=False,
                        fused=None, decoupled_weight_decay=True)
        super().__init__(params, defaults)
        self.ewc = ewc
        self.last_ewc_penalty: Optional[torch.Tensor] = None
        if ewc is not None:
            self._check_ewc(ewc)

    # ---- EWC ---------------------------------------------------------------------------------------------
    def _check_ewc(self, ewc) -> None:
        from forgetkern.ewc import EWC

        if not isinstance(ewc, EWC):
            raise TypeError(f"forgetkern.optim.AdamW: ewc must be a forgetkern.EWC or None, got "
                            f"{type(ewc).__name__}")
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        outside = [i for i, p in enumerate(ewc.params()) if id(p) not in mine]
        if outside:
            names = ewc.names if ewc.target == "params" else [f"{n} (lora_A/B)" for n in ewc.names] * 2
            shown = [names[i] for i in outside[:3]]
            raise ValueError(f"forgetkern.optim.AdamW: ewc holds {len(outside)} tensors that are not parameters "
                             f"of this optimizer (e.g. {shown}); was the EWC built on another model, or are "
                             f"those parameters missing from the param groups?")

    def _ewc_pairs(self) -> Dict[int, tuple]:
        """id(param) -> (anchor, fisher) of the fused (first) task."""
        ewc = self.ewc
        task = ewc.tasks[0]
        return {id(p): (a, f) for p, a, f in zip(ewc.params(), task["anchors"], task["fishers"])}

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group["decoupled_weight_decay"] = True
        self.__dict__.setdefault("ewc", None)
        self.__dict__.setdefault("last_ewc_penalty", None)

    # ---- the step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step (with the EWC gradient fused in); returns ``closure()``'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ewc = self.ewc
        fused_ewc = ewc is not None and ewc.target == "params"
        penalty = None
        pairs: Dict[int, tuple] = {}
        if ewc is not None and not fused_ewc:
            penalty = ewc.apply_()  # delta_w: not elementwise in the parameters, see the module docstring
        elif fused_ewc:
            penalty = self._ewc_outside_fused(ewc)
            pairs = self._ewc_pairs()
        lam = float(ewc.lam) if fused_ewc else 0.0
        for group in self.param_groups:
            if group.get("capturable") or group.get("differentiable"):
                raise ValueError("forgetkern.optim.AdamW: param groups with capturable=True or "
                                 "differentiable=True are not supported (loaded from a torch.optim.AdamW "
                                 "state_dict?); set them to False")
            penalty = self._step_group(group, pairs, lam, penalty)
        self.last_ewc_penalty = penalty if ewc is not None else None
        return loss

    def _ewc_outside_fused(self, ewc) -> Optional[torch.Tensor]:
        """Penalty (and, for parameters with a gradient, the gradient) of what the fused pass does not see:
        the tasks after the first (separate mode), and the first task's penalty on parameters without .grad."""
        params = ewc.params()
        total = None
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        without = [i for i, p in enumerate(params) if p.grad is None]
        for task in ewc.tasks[1:]:
            if with_grad:
                v = ewc_penalty_and_grad_([params[i] for i in with_grad], [task["anchors"][i] for i in with_grad],
                                          [task["fishers"][i] for i in with_grad], lam=ewc.lam,
                                          grads=[params[i].grad for i in with_grad])
                total = v if total is None else total + v
        if without:
            for task in ewc.tasks:
                v = ewc_penalty([params[i].detach() for i in without], [task["anchors"][i] for i in without],
                                [task["fishers"][i] for i in without], ewc.lam)
                total = v if total is None else total + v
        return total

    def _step_group(self, group, pairs, lam: float, penalty):
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        lr = _scalar(group["lr"])
        amsgrad = group["amsgrad"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return penalty
        states = []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("forgetkern.optim.AdamW does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif amsgrad and "max_exp_avg_sq" not in state:
                raise KeyError("forgetkern.optim.AdamW: amsgrad=True but the state of a parameter has no "
                               "'max_exp_avg_sq' (loaded from an amsgrad=False optimizer?)")
            states.append(state)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        try:  # one host read for all step counts (they are CPU tensors unless loaded from a fused/capturable run)
            values = torch.stack(steps).tolist()
        except RuntimeError:
            values = [_scalar(s) for s in steps]
        # (step value, EWC or not) -> lists; the tensors of a group usually share one step count
        buckets: Dict[tuple, List[int]] = {}
        for i, (p, v) in enumerate(zip(params, values)):
            buckets.setdefault((v, id(p) in pairs), []).append(i)
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                     amsgrad=bool(amsgrad), maximize=bool(group["maximize"]))
        for (step, has_ewc), idx in buckets.items():
            ps = [params[i] for i in idx]
            st = [states[i] for i in idx]
            anchors = [pairs[id(p)][0] for p in ps] if has_ewc else []
            fishers = [pairs[id(p)][1] for p in ps] if has_ewc else []
            v = _fused_step(ps, [p.grad for p in ps], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                            [s["max_exp_avg_sq"] for s in st] if amsgrad else [], anchors, fishers, step=step,
                            lam=lam if has_ewc else 0.0, **hyper)
            if has_ewc:
                penalty = v if penalty is None else penalty + v
        return penalty


def _fused_step(ps, gs, ms, vs, xs, anchors, fishers, **kw) -> torch.Tensor:
    """The op on the optimizer's own lists: checked cheaply here (the op's full checks, overlap included, cost
    more than the kernel on hundreds of small tensors); non-contiguous tensors go through contiguous copies."""
    device, n = ps[0].device, len(ps)
    ok = True
    for i in range(n):
        p, g = ps[i], gs[i]
        if g.dtype != p.dtype or g.shape != p.shape or p.device != device or g.device != device:
            raise ValueError(f"forgetkern.optim.AdamW: a gradient of dtype {g.dtype}, shape {tuple(g.shape)} on "
                             f"{g.device} for a parameter of dtype {p.dtype}, shape {tuple(p.shape)} on {p.device}; "
                             f"all parameters of a step must be on one device, each gradient like its parameter")
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"forgetkern.optim.AdamW: parameters must be float32/bfloat16/float16/float64, got "
                            f"{p.dtype} (complex parameters are not supported)")
        ok = ok and p.is_contiguous() and g.is_contiguous() and ms[i].is_contiguous() and vs[i].is_contiguous() \
            and (not xs or xs[i].is_contiguous()) and (not anchors or (anchors[i].is_contiguous()
                                                                       and fishers[i].is_contiguous()))
    if ok:
        return _run_unchecked(ps, gs, ms, vs, xs, anchors, fishers, **kw)
    # a strided parameter (e.g. a transposed view registered as a Parameter): step contiguous copies
    cps, cms, cvs = [p.contiguous() for p in ps], [m.contiguous() for m in ms], [v.contiguous() for v in vs]
    cxs = [x.contiguous() for x in xs]
    out = _run_unchecked(cps, [g.contiguous() for g in gs], cms, cvs, cxs, [a.contiguous() for a in anchors],
                         [f.contiguous() for f in fishers], **kw)
    for dst, src in zip(ps + ms + vs + xs, cps + cms + cvs + cxs):
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src)
    return out
