"""Orthogonal-projection continual learning for LoRA: ``OLoRA``, ``OPLoRA`` and ``GPM``, fused over all layers.

All three keep the new task's LoRA update ``dW = s B A`` away from a subspace that matters for what the model
already knows, and all three act on every adapted layer in ONE op call:

* :class:`OLoRA` (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning"): a
  soft constraint. The past tasks' LoRA A rows are kept frozen; ``loss()`` returns
  ``lam * sum_i sum |A_past_i A_i^T|`` (:func:`forgetkern.olora_loss`), added to the task loss, pushing the
  new adapter's input subspace away from the old ones. ``new_task()`` moves the current A into the memory
  (concatenated along the rank, as the O-LoRA code does), merges ``s B A`` into the base weight (the old
  adapter keeps contributing, frozen, as O-LoRA keeps the earlier LoRAs) and re-initialises the adapter like
  PEFT (A Kaiming-uniform, B zero).
* :class:`OPLoRA` (Xiong & Xie 2025): a hard constraint from the frozen weight alone. With ``U_k`` / ``V_k`` the
  top-k left / right singular vectors of each base weight ``W``, ``project_()`` sets ``B <- (I - U_k U_k^T) B``
  and ``A <- A (I - V_k V_k^T)``, so ``U_k^T dW = 0`` and ``dW V_k = 0``: ``W + dW`` keeps the top-k singular
  triples of ``W`` exactly (while ``||dW||_2 < sigma_k``; what ``W``'s top directions do is left untouched).
* :class:`GPM` (Saha et al. 2021; InfLoRA, Liang & Li 2024): a hard constraint from data. After a task,
  ``update_memory(batches)`` records every adapted layer's input activations (forward hooks, removed
  afterwards) and keeps, per layer, an orthonormal basis ``U`` (in x k) of the directions that carry a
  ``threshold`` fraction of their energy, grown incrementally (new directions are taken from the residual
  orthogonal to the old basis, as GPM does). ``project_()`` then projects the LoRA A gradients,
  ``g <- g - (g U) U^T``, before ``optimizer.step()``; ``new_task()`` merges the adapter and starts a fresh one
  whose A lies in the complement, so ``dW x = s B A x = 0`` for the protected inputs ``x`` (with plain SGD;
  Adam's per-coordinate scaling leaves the subspace slightly: use ``project_params_()`` after the step).

The per-layer products run through :func:`forgetkern.project_out_` (never a dense in x in or out x out
projector) and :func:`forgetkern.olora_loss` (a 0-dim device tensor, no host sync). Typical use::

    olora = forgetkern.OLoRA(model, lam=0.5)
    loss = task_loss + olora.loss(); loss.backward(); opt.step()
    olora.new_task()                        # between tasks (rebuild or reset the optimizer afterwards)

    oplora = forgetkern.OPLoRA(model, k=8)
    loss.backward(); oplora.project_grads_(); opt.step(); oplora.project_()

    gpm = forgetkern.GPM(model, threshold=0.97)
    ... train task 1 ...; gpm.update_memory(task1_batches); gpm.new_task()
    loss.backward(); gpm.project_(); opt.step()
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import torch

from forgetkern.ops.olora_loss import olora_loss
from forgetkern.ops.project_out import project_out_, project_out_prechecked_
from forgetkern.spectral import top_singular_triples


class _Site:
    """One LoRA-adapted linear layer (its single active adapter): factors, scaling, base weight (out x in)."""

    def __init__(self, owner: str, name: str, module: torch.nn.Module):
        active = list(getattr(module, "active_adapters", None) or [getattr(module, "active_adapter", None)])
        active = [a for a in active if a in module.lora_A]
        if len(active) != 1:
            raise ValueError(f"{owner}: layer {name!r} has {len(active)} active LoRA adapters ({active}); exactly "
                             f"one is supported")
        self.name, self.module, self.adapter = name, module, active[0]
        if getattr(module, "use_dora", {}).get(self.adapter, False):
            raise ValueError(f"{owner}: layer {name!r} uses DoRA; only plain LoRA adapters are supported")
        if getattr(module, "lora_bias", {}).get(self.adapter, False):
            raise ValueError(f"{owner}: layer {name!r} has a LoRA bias (lora_bias=True); not supported")
        self.fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
        if not hasattr(module.get_base_layer(), "weight") or self.a.dim() != 2:
            raise ValueError(f"{owner}: layer {name!r} is not a linear LoRA layer")

    @property
    def a(self) -> torch.nn.Parameter:
        return self.module.lora_A[self.adapter].weight

    @property
    def b(self) -> torch.nn.Parameter:
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def base_weight(self) -> torch.Tensor:
        return self.module.get_base_layer().weight

    def weight_out_in(self) -> torch.Tensor:
        w = self.base_weight.detach()
        return w.t() if self.fan_in_fan_out else w

    @torch.no_grad()
    def merge_and_reset(self) -> None:
        """``W += s B A`` (float32 math, rounded once), then A Kaiming-uniform (as PEFT), B zero."""
        w = self.base_weight
        delta = (self.b.float() @ self.a.float()) * self.scaling
        w.copy_((w.float() + (delta.t() if self.fan_in_fan_out else delta)).to(w.dtype))
        torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        torch.nn.init.zeros_(self.b)


def _sites(owner: str, model: torch.nn.Module) -> List[_Site]:
    out = [_Site(owner, n, m) for n, m in model.named_modules()
           if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and len(m.lora_A) > 0
           and hasattr(m, "get_base_layer")]
    if not out:
        raise ValueError(f"{owner}: the model has no LoRA-adapted layers; pass a PEFT model "
                         f"(peft.get_peft_model(model, LoraConfig(...)))")
    return out


def _check_lam(owner: str, lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (lam >= 0) or lam == float("inf"):
        raise ValueError(f"{owner}: lam must be a finite float >= 0, got {lam!r}")
    return float(lam)


def _check_state(owner: str, state, names: List[str]) -> None:
    if not isinstance(state, Mapping) or state.get("kind") != owner or state.get("version") != 1:
        raise ValueError(f"{owner}.load_state_dict: not an {owner} state_dict (version 1)")
    if list(state["names"]) != names:
        raise ValueError(f"{owner}.load_state_dict: the state covers {len(state['names'])} layers "
                         f"({list(state['names'])[:2]}...), this model has {len(names)} ({names[:2]}...): build it "
                         f"on the same PEFT model")


def _load_tensors(owner: str, what: str, tensors, sites: List[_Site], shape_of: Callable) -> List[torch.Tensor]:
    out = []
    if len(tensors) != len(sites):
        raise ValueError(f"{owner}.load_state_dict: {what} has {len(tensors)} tensors for {len(sites)} layers")
    for t, s in zip(tensors, sites):
        want = shape_of(s, t)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{owner}.load_state_dict: {what} of layer {s.name!r} has shape {got}, the layer "
                             f"needs {want}")
        out.append(t.detach().to(s.a.device).contiguous())
    return out


def _grads(owner: str, params: List[torch.Tensor]):
    return [(i, p.grad) for i, p in enumerate(params) if p.grad is not None]


# ---------------------------------------------------------------------------------------------------------------
class OLoRA:
    """O-LoRA: orthogonality of the current adapter's A rows to the past tasks' (see the module docstring).

    Args:
        model: a PEFT model with one active LoRA adapter per adapted layer.
        lam: the strength ``lambda_1`` (the O-LoRA code's default is 0.5), >= 0.
        norm: ``"l1"`` (sum |A_past A^T|, the code; default) or ``"fro2"`` (||A_past A^T||_F^2, the paper).
    """

    def __init__(self, model: torch.nn.Module, *, lam: float = 0.5, norm: str = "l1"):
        if norm not in ("l1", "fro2"):
            raise ValueError(f"OLoRA: norm must be 'l1' or 'fro2', got {norm!r}")
        self.model, self.lam, self.norm = model, _check_lam("OLoRA", lam), norm
        self.sites = _sites("OLoRA", model)
        self.names = [s.name for s in self.sites]
        self.past: List[torch.Tensor] = [s.a.new_zeros((0, s.a.shape[1])).detach() for s in self.sites]
        self.num_tasks = 0

    def loss(self) -> torch.Tensor:
        """``lam * sum_i sum |A_past_i A_i^T|`` (or the squared Frobenius form): a differentiable 0-dim tensor on
        the adapters' device; 0 before the first :meth:`new_task`."""
        return olora_loss(self.past, [s.a for s in self.sites], norm=self.norm) * self.lam

    @torch.no_grad()
    def new_task(self) -> None:
        """End the current task: append every layer's A to the frozen memory, merge ``s B A`` into the base
        weight and re-initialise the adapter (A Kaiming-uniform as PEFT, B zero). The model's function is
        unchanged; optimizer state for the adapters is stale afterwards (rebuild or reset the optimizer)."""
        for i, s in enumerate(self.sites):
            self.past[i] = torch.cat([self.past[i], s.a.detach().to(self.past[i].dtype)], 0).contiguous()
            s.merge_and_reset()
        self.num_tasks += 1

    def state_dict(self) -> Dict[str, object]:
        """The memory (the past A rows per layer) and the settings; the merged base weights are the model's."""
        return {"kind": "OLoRA", "version": 1, "lam": self.lam, "norm": self.norm, "names": list(self.names),
                "num_tasks": self.num_tasks, "past": [p.clone() for p in self.past]}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        _check_state("OLoRA", state, self.names)
        self.past = _load_tensors("OLoRA", "past", state["past"], self.sites,
                                  lambda s, t: (t.shape[0] if t.dim() == 2 else -1, s.a.shape[1]))
        self.lam, self.norm, self.num_tasks = float(state["lam"]), state["norm"], int(state["num_tasks"])


# ---------------------------------------------------------------------------------------------------------------
class OPLoRA:
    """OPLoRA: keep each LoRA update orthogonal to the top-k singular subspaces of its frozen base weight.

    Args:
        model: a PEFT model with one active LoRA adapter per adapted layer.
        k: the number of protected singular directions per layer, ``1 <= k < min(out, in)``.
        full_svd_max: layers with ``min(out, in) <= full_svd_max`` get their exact top-k triples (from the
            float64 eigendecomposition of the small Gram matrix, ``W^T W`` or ``W W^T``: ~100x faster on CPU than a
            full ``torch.linalg.svd`` of a 1536 x 576 weight, and exact to float32); larger ones
            ``torch.svd_lowrank(W, q=k + oversample, niter=niter)``.
        oversample, niter: of the randomized SVD (seeded: the bases are reproducible).

    The bases are computed once in float32 at construction and kept (``U`` out x k, ``V`` in x k per layer,
    with the singular values ``S``); :meth:`state_dict` saves them, so a resumed run protects the same subspace.
    """

    def __init__(self, model: torch.nn.Module, *, k: int, full_svd_max: int = 1024, oversample: int = 10,
                 niter: int = 4):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"OPLoRA: k must be a positive int (the protected singular directions), got {k!r}")
        self.model, self.k = model, k
        self.sites = _sites("OPLoRA", model)
        self.names = [s.name for s in self.sites]
        for s in self.sites:
            out_f, in_f = s.weight_out_in().shape
            if k >= min(out_f, in_f):
                raise ValueError(f"OPLoRA: k={k} >= min(out, in) = {min(out_f, in_f)} for layer {s.name!r} "
                                 f"({out_f} x {in_f}): projecting out every singular direction leaves the adapter "
                                 f"nothing to learn; use k < {min(out_f, in_f)}")
        self._checked: set = set()
        self.U: List[torch.Tensor] = []
        self.V: List[torch.Tensor] = []
        self.S: List[torch.Tensor] = []
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(0)  # svd_lowrank draws a random test matrix: reproducible bases
            for s in self.sites:
                w = s.weight_out_in().float()
                if min(w.shape) <= full_svd_max:
                    u, sv, v = top_singular_triples(w, k)
                else:
                    u, sv, v = torch.svd_lowrank(w, q=min(k + oversample, min(w.shape)), niter=niter)
                    u, sv, v = u[:, :k], sv[:k], v[:, :k]
                self.U.append(u.contiguous())
                self.V.append(v.contiguous())
                self.S.append(sv.contiguous())
        finally:
            torch.random.set_rng_state(gen_state)

    @torch.no_grad()
    def project_(self) -> None:
        """``B <- B - U_k (U_k^T B)`` and ``A <- A - (A V_k) V_k^T`` for every layer (two fused calls). Call it
        once before training and after every ``optimizer.step()``."""
        self._project([s.b.detach() for s in self.sites], self.U, "left")
        self._project([s.a.detach() for s in self.sites], self.V, "right")

    def _project(self, xs, bases, side) -> None:
        # the full checks once per (side, tensor set) structure, then the op without per-call checks
        key = (side, tuple((x.data_ptr(), x.shape, u.data_ptr(), u.shape) for x, u in zip(xs, bases)))
        if key in self._checked:
            project_out_prechecked_(xs, bases, side)
        else:
            project_out_(xs, bases, side=side)
            if len(self._checked) > 8:
                self._checked.clear()
            self._checked.add(key)

    @torch.no_grad()
    def project_grads_(self) -> None:
        """The same projections on ``B.grad`` / ``A.grad`` (layers without a gradient are skipped); call it
        between ``backward()`` and ``optimizer.step()``."""
        gb = _grads("OPLoRA", [s.b for s in self.sites])
        ga = _grads("OPLoRA", [s.a for s in self.sites])
        if gb:
            self._project([g for _, g in gb], [self.U[i] for i, _ in gb], "left")
        if ga:
            self._project([g for _, g in ga], [self.V[i] for i, _ in ga], "right")

    def state_dict(self) -> Dict[str, object]:
        return {"kind": "OPLoRA", "version": 1, "k": self.k, "names": list(self.names),
                "U": [u.clone() for u in self.U], "V": [v.clone() for v in self.V], "S": [x.clone() for x in self.S]}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        _check_state("OPLoRA", state, self.names)
        k = int(state["k"])
        self.U = _load_tensors("OPLoRA", "U", state["U"], self.sites, lambda s, t: (s.weight_out_in().shape[0], k))
        self.V = _load_tensors("OPLoRA", "V", state["V"], self.sites, lambda s, t: (s.weight_out_in().shape[1], k))
        self.S = _load_tensors("OPLoRA", "S", state["S"], self.sites, lambda s, t: (k,))
        self.k = k


# ---------------------------------------------------------------------------------------------------------------
def _default_forward(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])  # (inputs, targets) pairs: the inputs
    return model(batch)


class GPM:
    """Gradient projection memory over the inputs of every LoRA-adapted layer (module docstring).

    Args:
        model: a PEFT model with one active LoRA adapter per adapted layer.
        threshold: the fraction of each layer's activation energy the basis must capture, in (0, 1]
            (GPM's ``epsilon_th``; 0.97 is GPM's first-layer value).
        max_tokens: at most this many activation rows per layer enter the SVD of one :meth:`update_memory`
            (a seeded uniform subsample of the rows seen): bounds memory and time (``max_tokens x in``).
    """

    def __init__(self, model: torch.nn.Module, *, threshold: float = 0.97, max_tokens: int = 2048):
        self.threshold = self._check_threshold(threshold)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"GPM: max_tokens must be a positive int, got {max_tokens!r}")
        self.model, self.max_tokens = model, max_tokens
        self.sites = _sites("GPM", model)
        self.names = [s.name for s in self.sites]
        self.bases: List[torch.Tensor] = [torch.zeros(s.a.shape[1], 0, device=s.a.device) for s in self.sites]
        self._checked: tuple = ()

    @staticmethod
    def _check_threshold(threshold) -> float:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"GPM: threshold must be a float in (0, 1] (the fraction of activation energy "
                             f"protected), got {threshold!r}")
        return float(threshold)

    @torch.no_grad()
    def update_memory(self, batches: Iterable, *, threshold: Optional[float] = None,
                      forward: Callable = _default_forward, max_batches: Optional[int] = None) -> List[int]:
        """Run ``batches`` (a DataLoader or any iterable) through the model, collect every adapted layer's input
        activations and grow each layer's basis (returns the new basis sizes).

        ``forward(model, batch)`` runs one batch (default: ``model(**batch)`` for dicts, ``model(batch[0])`` for
        tuples / lists, else ``model(batch)``). The hooks are removed afterwards, also on error.
        """
        th = self.threshold if threshold is None else self._check_threshold(threshold)
        rows: List[List[torch.Tensor]] = [[] for _ in self.sites]
        seen = [0] * len(self.sites)
        gen = torch.Generator().manual_seed(1234 + self.bases[0].shape[1])

        def hook_for(i, in_f):
            def hook(module, args, output):
                x = args[0].detach().reshape(-1, in_f).float()
                seen[i] += x.shape[0]
                rows[i].append(x)
                total = sum(r.shape[0] for r in rows[i])
                if total > 2 * self.max_tokens:  # keep memory bounded: subsample what was collected so far
                    allr = torch.cat(rows[i])
                    keep = torch.randperm(allr.shape[0], generator=gen)[: self.max_tokens].to(allr.device)
                    rows[i] = [allr[keep]]
            return hook

        handles = [s.module.register_forward_hook(hook_for(i, s.a.shape[1])) for i, s in enumerate(self.sites)]
        try:
            for j, batch in enumerate(batches):
                if max_batches is not None and j >= max_batches:
                    break
                forward(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        if not any(seen):
            raise ValueError("GPM.update_memory: no activations were recorded (empty batches, or the forward does "
                             "not reach the adapted layers)")
        for i, s in enumerate(self.sites):
            if not rows[i]:
                continue
            r = torch.cat(rows[i])
            if r.shape[0] > self.max_tokens:
                r = r[torch.randperm(r.shape[0], generator=gen)[: self.max_tokens].to(r.device)]
            self.bases[i] = self._grow(self.bases[i].to(r.device), r.contiguous(), th).to(s.a.device)
        return [b.shape[1] for b in self.bases]

    @staticmethod
    def _grow(basis: torch.Tensor, r: torch.Tensor, th: float) -> torch.Tensor:
        """GPM's incremental step on the activations ``r`` (n x in): keep the residual directions that bring the
        captured energy to ``th``, orthogonalised against ``basis`` (in x k)."""
        total = float(r.square().sum())
        if total == 0.0:
            return basis
        if basis.shape[1]:
            resid = r.clone()
            project_out_([resid], [basis], side="right")  # r - (r U) U^T: never an in x in matrix
            captured = total - float(resid.square().sum())
        else:
            resid, captured = r, 0.0
        if captured / total >= th or basis.shape[1] >= r.shape[1]:
            return basis
        # the right singular vectors and squared singular values of resid, from the eigenpairs of its in x in
        # Gram matrix in float64 (eigh returns orthonormal vectors; a full SVD of the n x in activations is
        # ~10-100x slower on CPU)
        rd = resid.double()
        evals, evecs = torch.linalg.eigh(rd.t() @ rd)
        energy, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        acc = (captured + torch.cumsum(energy, 0)) / total
        k = int((acc < th).sum().item()) + 1
        k = min(k, r.shape[1] - basis.shape[1], min(r.shape))
        new = evecs[:, :k].to(r.dtype).contiguous()  # in x k
        if basis.shape[1]:
            # re-orthogonalise against the old basis (rounding), then orthonormalise the new block
            new = new.t().contiguous()
            project_out_([new], [basis], side="right")
            new = new.t().contiguous()
        new = torch.linalg.qr(new)[0]
        return torch.cat([basis, new], 1).contiguous()

    @torch.no_grad()
    def project_(self) -> None:
        """``A.grad <- A.grad - (A.grad U) U^T`` for every layer with a gradient and a basis (one fused call);
        call it between ``backward()`` and ``optimizer.step()``."""
        pairs = [(g, self.bases[i]) for i, g in _grads("GPM", [s.a for s in self.sites]) if self.bases[i].shape[1]]
        if pairs:
            xs, us = [g for g, _ in pairs], [u for _, u in pairs]
            key = tuple((x.data_ptr(), x.shape, u.data_ptr(), u.shape) for x, u in zip(xs, us))
            if key == self._checked:
                project_out_prechecked_(xs, us, "right")
            else:
                project_out_(xs, us, side="right")
                self._checked = key

    @torch.no_grad()
    def project_params_(self) -> None:
        """``A <- A - (A U) U^T`` for every layer (keeps A in the complement under adaptive optimizers)."""
        pairs = [(s.a, self.bases[i]) for i, s in enumerate(self.sites) if self.bases[i].shape[1]]
        if pairs:
            project_out_([a for a, _ in pairs], [u for _, u in pairs], side="right")

    @torch.no_grad()
    def new_task(self) -> None:
        """Merge ``s B A`` into the base weights and start a fresh adapter whose A (Kaiming-uniform, as PEFT)
        is projected onto the complement of the memory, B zero: the new update cannot act on protected inputs."""
        for s in self.sites:
            s.merge_and_reset()
        self.project_params_()

    def state_dict(self) -> Dict[str, object]:
        return {"kind": "GPM", "version": 1, "threshold": self.threshold, "max_tokens": self.max_tokens,
                "names": list(self.names), "bases": [b.clone() for b in self.bases]}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        _check_state("GPM", state, self.names)
        self.bases = _load_tensors("GPM", "bases", state["bases"], self.sites,
                                   lambda s, t: (s.a.shape[1], t.shape[1] if t.dim() == 2 else -1))
        self.threshold, self.max_tokens = float(state["threshold"]), int(state["max_tokens"])
