"""``forgetkern.EWC``: elastic weight consolidation on a (PEFT) model in three lines.

    fisher = forgetkern.FisherEstimator(model, params=...).estimate(old_data)
    ewc = forgetkern.EWC(model, fisher, lam=1.0, target="params" | "delta_w")
    loss = task_loss + ewc.penalty()            # or: task_loss.backward(); ewc.apply_()

Targets:

* ``"params"`` - the classic penalty ``lam/2 sum F (theta - theta*)^2`` over the parameters the Fisher names
  (anchors ``theta*`` copied at construction), through :func:`forgetkern.ewc_penalty` /
  :func:`forgetkern.ewc_penalty_and_grad_`. Right for a TRAINED adapter (or full fine-tuning) before the next
  task: Fisher of the adapter's own parameters on the old task's data.
* ``"delta_w"`` - the base weights' Fisher applied to the adapters' effective update:
  ``lam/2 sum F_W (s B A - D0)^2`` with ``D0`` the update at construction (0 for a fresh adapter), through the
  fused :func:`forgetkern.ewc_delta_w` (never materialising ``B A``). Right for a FRESH adapter: take the Fisher
  of the frozen base weights (``FisherEstimator(model, params="lora_base")``) on general data before training.
  ``target="params"`` cannot protect a fresh adapter: ``B = 0`` makes the Fisher of every ``lora_A`` exactly 0.
  A non-zero anchor update enters the same op by stacking along the rank:
  ``s (B A - B0 A0) = s [B, -B0] [A; A0]``.

Modes: ``"separate"`` keeps one (anchor, Fisher) pair per consolidated task; ``"online"`` (Schwarz et al. 2018)
keeps one running Fisher ``F <- gamma F + F_new`` and the latest anchor. With the Fisher's default per-token
normalisation (see :class:`forgetkern.FisherEstimator`) the penalty is in the units of the mean token loss:
``lam = 1`` is the quadratic model's estimate of how much the old data's loss rises; :meth:`scale_report`
gives the ``lam`` at which the penalty's gradient would match the task's.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch

from forgetkern import _sharded
from forgetkern.ops.ewc_delta_w import ewc_delta_w, ewc_delta_w_and_grad_
from forgetkern.ops.ewc_penalty import ewc_penalty, ewc_penalty_and_grad_

TARGETS = ("params", "delta_w")
MODES = ("separate", "online")
_BASE_SUFFIX = ".base_layer.weight"


class _LoraSite:
    """One LoRA-adapted layer for ``target="delta_w"``: its active adapter's factors and scaling."""

    def __init__(self, name: str, module: torch.nn.Module):
        active = list(getattr(module, "active_adapters", None) or [getattr(module, "active_adapter", None)])
        active = [a for a in active if a in module.lora_A]
        if len(active) != 1:
            raise ValueError(f"EWC(target='delta_w'): layer {name!r} has {len(active)} active LoRA adapters "
                             f"({active}); exactly one is supported")
        self.name, self.module, self.adapter = name, module, active[0]
        self.fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))

    @property
    def a(self) -> torch.Tensor:
        return self.module.lora_A[self.adapter].weight

    @property
    def b(self) -> torch.Tensor:
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])


def _check_fisher_tensor(name: str, f, shape) -> None:
    if not isinstance(f, torch.Tensor) or not f.is_floating_point():
        raise TypeError(f"EWC: fisher[{name!r}] must be a floating-point tensor, got {type(f).__name__}")
    if tuple(f.shape) != tuple(shape):
        raise ValueError(f"EWC: fisher[{name!r}] has shape {tuple(f.shape)}, the model's tensor has {tuple(shape)}; "
                         f"was the Fisher estimated on another model?")
    loc = f.to_local() if hasattr(f, "to_local") else f  # a DTensor: each rank checks its shard
    if not bool(torch.isfinite(loc).all()) or bool((loc < 0).any()):
        raise ValueError(f"EWC: fisher[{name!r}] has negative or non-finite entries; a diagonal Fisher is finite "
                         f"and >= 0")


class EWC:
    """Elastic weight consolidation over the parameters (or LoRA updates) a Fisher names.

    Args:
        model: the model being fine-tuned (a PEFT model for ``target="delta_w"``).
        fisher: ``{name: F}`` as :meth:`forgetkern.FisherEstimator.estimate` returns it: parameter names of
            ``model`` (``target="params"``) or base-weight names ``<layer>.base_layer.weight`` of LoRA layers
            (``target="delta_w"``, from ``params="lora_base"``).
        lam: the EWC strength (>= 0), Kirkpatrick's ``lam/2`` convention.
        target, mode, gamma: see the module docstring (``gamma`` in [0, 1], online mode's decay).
        state_dtype: dtype of the stored anchors and Fishers (float32, or bfloat16 to halve their memory).
    """

    def __init__(self, model: torch.nn.Module, fisher: Mapping[str, torch.Tensor], *, lam: float,
                 target: str = "params", mode: str = "separate", gamma: float = 1.0,
                 state_dtype: torch.dtype = torch.float32):
        if target not in TARGETS:
            raise ValueError(f"EWC: target must be one of {TARGETS}, got {target!r}")
        if mode not in MODES:
            raise ValueError(f"EWC: mode must be one of {MODES}, got {mode!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (lam >= 0) or lam == float("inf"):
            raise ValueError(f"EWC: lam must be a finite float >= 0, got {lam!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"EWC: gamma must be a float in [0, 1], got {gamma!r}")
        if state_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"EWC: state_dtype must be a float dtype, got {state_dtype!r}")
        self.model, self.lam, self.target, self.mode, self.gamma = model, float(lam), target, mode, float(gamma)
        self.state_dtype = state_dtype
        self.fisher_meta = fisher.meta() if hasattr(fisher, "meta") else {}
        self.names = self._names(fisher)
        self.tasks: List[Dict[str, List[torch.Tensor]]] = [self._task(fisher)]

    # ---- construction --------------------------------------------------------------------------------------
    def _names(self, fisher) -> List[str]:
        if not isinstance(fisher, Mapping) or not fisher:
            raise ValueError("EWC: fisher must be a non-empty {name: tensor} mapping (FisherEstimator.estimate's "
                             "output)")
        if self.target == "params":
            named = dict(self.model.named_parameters())
            unknown = [n for n in fisher if n not in named]
            if unknown:
                raise KeyError(f"EWC: fisher names {unknown[:5]} are not parameters of the model"
                               + ("; for base weights of LoRA layers use target='delta_w'"
                                  if any(n.endswith(_BASE_SUFFIX) for n in unknown) else ""))
            self._params = {n: named[n] for n in fisher}
            return list(fisher)
        modules = dict(self.model.named_modules())
        sites = {}
        for n in fisher:
            mname = n[:-len(_BASE_SUFFIX)] if n.endswith(_BASE_SUFFIX) else None
            mod = modules.get(mname) if mname is not None else None
            if mod is None or not hasattr(mod, "lora_A"):
                raise KeyError(f"EWC(target='delta_w'): fisher name {n!r} is not the base weight of a LoRA layer "
                               f"('<layer>.base_layer.weight'); estimate it with FisherEstimator(model, "
                               f"params='lora_base')")
            sites[n] = _LoraSite(mname, mod)
        self._sites = sites
        return list(fisher)

    def _fisher_list(self, fisher) -> List[torch.Tensor]:
        missing = [n for n in self.names if n not in fisher]
        extra = [n for n in fisher if n not in self.names]
        if missing or extra:
            raise KeyError(f"EWC: the Fisher's names differ from this EWC's: missing {missing[:5]}, extra {extra[:5]}")
        out = []
        for n in self.names:
            f = fisher[n]
            if self.target == "params":
                shape = self._params[n].shape
            else:
                site = self._sites[n]
                shape = site.module.base_layer.weight.shape
            _check_fisher_tensor(n, f, shape)
            f = f.detach()
            if self.target == "delta_w" and self._sites[n].fan_in_fan_out:
                f = f.T  # Conv1D stores W as [in, out]; the update s B A is [out, in]
            if self.target == "params":
                f = _sharded.shard_like(f, self._params[n])  # FSDP2: keep this rank's slice only
            out.append(f.to(self.state_dtype).contiguous().clone())
        return out

    def _task(self, fisher) -> Dict[str, List[torch.Tensor]]:
        fishers = self._fisher_list(fisher)
        if self.target == "params":
            anchors = [self._params[n].detach().to(self.state_dtype).clone() for n in self.names]
            return {"fishers": fishers, "anchors": anchors}
        a0 = [self._sites[n].a.detach().clone() for n in self.names]
        b0 = [self._sites[n].b.detach().clone() for n in self.names]
        return {"fishers": fishers, "anchor_a": a0, "anchor_b": b0,
                "fresh": [bool((b == 0).all()) or bool((a == 0).all()) for a, b in zip(a0, b0)]}

    # ---- the penalty ---------------------------------------------------------------------------------------
    def _stacked(self, task, i: int, a: torch.Tensor, b: torch.Tensor):
        if task["fresh"][i]:
            return a, b
        return torch.cat([a, task["anchor_a"][i].to(a.dtype)], 0), torch.cat([b, -task["anchor_b"][i].to(b.dtype)], 1)

    def params(self) -> List[torch.Tensor]:
        """The tensors the penalty differentiates: the parameters, or the LoRA factors (A's, then B's)."""
        if self.target == "params":
            return [self._params[n] for n in self.names]
        return [self._sites[n].a for n in self.names] + [self._sites[n].b for n in self.names]

    def penalty(self) -> torch.Tensor:
        """The differentiable penalty (0-dim, float32): add it to the task loss."""
        total = None
        for task in self.tasks:
            if self.target == "params":
                p = ewc_penalty([self._params[n] for n in self.names], task["anchors"], task["fishers"], self.lam)
            else:
                sites = [self._sites[n] for n in self.names]
                pairs = [self._stacked(task, i, s.a, s.b) for i, s in enumerate(sites)]
                p = ewc_delta_w([x for x, _ in pairs], [y for _, y in pairs], task["fishers"],
                                scaling=[s.scaling for s in sites], lam=self.lam)
            total = p if total is None else total + p
        return total

    @torch.no_grad()
    def apply_(self) -> torch.Tensor:
        """After ``loss.backward()``: add the penalty's gradient into every ``.grad`` in place (allocating the
        ``.grad`` of parameters that got none) and return the penalty (0-dim device tensor, no host sync)."""
        total = None
        for task in self.tasks:
            if self.target == "params":
                ps = [self._params[n] for n in self.names]
                grads = [_grad_of(p) for p in ps]
                v = ewc_penalty_and_grad_(ps, task["anchors"], task["fishers"], lam=self.lam, grads=grads)
            else:
                v = self._apply_delta_w(task)
            total = v if total is None else total + v
        return total

    def _apply_delta_w(self, task) -> torch.Tensor:
        sites = [self._sites[n] for n in self.names]
        fresh = [i for i in range(len(sites)) if task["fresh"][i]]
        anchored = [i for i in range(len(sites)) if not task["fresh"][i]]
        total = torch.zeros((), dtype=torch.float32, device=sites[0].a.device)
        if fresh:
            total = total + ewc_delta_w_and_grad_(
                [sites[i].a.detach() for i in fresh], [sites[i].b.detach() for i in fresh],
                [task["fishers"][i] for i in fresh], scaling=[sites[i].scaling for i in fresh], lam=self.lam,
                grads_a=[_grad_of(sites[i].a) for i in fresh], grads_b=[_grad_of(sites[i].b) for i in fresh])
        if anchored:
            pairs = [self._stacked(task, i, sites[i].a.detach(), sites[i].b.detach()) for i in anchored]
            ga = [torch.zeros_like(x) for x, _ in pairs]
            gb = [torch.zeros_like(y) for _, y in pairs]
            total = total + ewc_delta_w_and_grad_(
                [x for x, _ in pairs], [y for _, y in pairs], [task["fishers"][i] for i in anchored],
                scaling=[sites[i].scaling for i in anchored], lam=self.lam, grads_a=ga, grads_b=gb)
            for k, i in enumerate(anchored):
                r = sites[i].a.shape[0]
                _grad_of(sites[i].a).add_(ga[k][:r])
                _grad_of(sites[i].b).add_(gb[k][:, :r])
        return total

    # ---- tasks ---------------------------------------------------------------------------------------------
    def consolidate(self, fisher: Mapping[str, torch.Tensor]) -> None:
        """A task ended: ``fisher`` is its Fisher (same names). Separate mode adds an (anchor, Fisher) pair taken
        now; online mode folds it into the running Fisher (``F <- gamma F + F_new``) and re-anchors here."""
        new = self._task(fisher)
        if self.mode == "separate":
            self.tasks.append(new)
            return
        old = self.tasks[0]["fishers"]
        for f_old, f_new in zip(old, new["fishers"]):
            f_new.add_(f_old.to(f_new.dtype), alpha=self.gamma) if self.gamma else None
        self.tasks = [new]

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        """Everything a resumed run needs (tensors on their devices; ``torch.save`` it with the checkpoint)."""
        return {"version": 1, "lam": self.lam, "target": self.target, "mode": self.mode, "gamma": self.gamma,
                "state_dtype": str(self.state_dtype).replace("torch.", ""), "names": list(self.names),
                "fisher_meta": dict(self.fisher_meta),
                "tasks": [{k: list(v) for k, v in t.items()} for t in self.tasks]}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict`'s output into an EWC built on the same model (names and shapes checked)."""
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise ValueError("EWC.load_state_dict: not an EWC state_dict (version 1)")
        if state["target"] != self.target or list(state["names"]) != self.names:
            raise ValueError(f"EWC.load_state_dict: the state is for target={state['target']!r} over "
                             f"{len(state['names'])} tensors; this EWC is target={self.target!r} over "
                             f"{len(self.names)}: build it with the same model, Fisher names and target")
        tasks = []
        for t in state["tasks"]:
            for f, want in zip(t["fishers"], self.tasks[0]["fishers"]):
                if tuple(f.shape) != tuple(want.shape):
                    raise ValueError(f"EWC.load_state_dict: a Fisher of shape {tuple(f.shape)} where the model "
                                     f"needs {tuple(want.shape)}")
            tasks.append({k: list(v) for k, v in t.items()})
        self.lam, self.mode, self.gamma = float(state["lam"]), state["mode"], float(state["gamma"])
        self.fisher_meta = dict(state.get("fisher_meta", {}))
        self.tasks = tasks

    # ---- scale ---------------------------------------------------------------------------------------------
    def scale_report(self) -> Dict[str, object]:
        """How strong the penalty is against the task, at the current point; call it after ``loss.backward()``
        of a task batch and BEFORE :meth:`apply_` (the ``.grad`` s must hold the task gradient alone), a few steps
        into training (at the anchor the penalty and its gradient are 0).

        Returns ``penalty``, ``penalty_grad_norm`` (at this ``lam``), ``task_grad_norm``, their ``ratio``,
        ``lam_for_ratio_1`` (the ``lam`` at which the two gradients would have equal norms), and the Fisher's
        metadata (its normalisation)."""
        ps = self.params()
        task_sq = sum(float(p.grad.double().pow(2).sum()) for p in ps if p.grad is not None)
        with torch.enable_grad():
            pen = self.penalty()
            gs = torch.autograd.grad(pen, ps, allow_unused=True)
        pen_sq = sum(float(g.double().pow(2).sum()) for g in gs if g is not None)
        pg, tg = pen_sq ** 0.5, task_sq ** 0.5
        return {"lam": self.lam, "penalty": float(pen.detach()), "penalty_grad_norm": pg, "task_grad_norm": tg,
                "ratio": (pg / tg) if tg > 0 else float("nan"),
                "lam_for_ratio_1": (self.lam * tg / pg) if pg > 0 else float("inf"),
                "fisher": dict(self.fisher_meta)}


def _grad_of(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad
