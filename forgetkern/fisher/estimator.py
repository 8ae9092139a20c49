"""``FisherEstimator``: diagonal Fisher of chosen parameters, per sample, per token or per batch."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Dict, Iterable, Optional, Union

import torch

from forgetkern.fisher import _data
from forgetkern.fisher._capture import Capture, plan
from forgetkern.ops.fisher_accumulate import fisher_accumulate_

LABELS = ("empirical", "sampled")
NORMALIZE = ("token", "sample")
GRANULARITIES = ("batch", "sample", "token")
_BATCHED_FALLBACK_BYTES = 256 << 20

ParamSpec = Union[None, str, Callable[[str, torch.nn.Parameter], bool], Iterable]


def select_params(model: torch.nn.Module, params: ParamSpec) -> Dict[str, torch.nn.Parameter]:
    """``{name: parameter}`` from ``params``: None (every parameter that requires grad), ``"lora"`` (names
    containing ``lora_``), ``"lora_base"`` (the frozen base weights of the LoRA-adapted layers, what
    ``forgetkern.EWC(target="delta_w")`` consumes), a predicate ``f(name, param) -> bool``, or an iterable of
    names / parameters."""
    named = dict(model.named_parameters())
    if params is None:
        out = {n: p for n, p in named.items() if p.requires_grad}
    elif isinstance(params, str):
        if params == "lora":
            out = {n: p for n, p in named.items() if "lora_" in n}
        elif params == "lora_base":
            out = {}
            for mname, mod in model.named_modules():
                base = getattr(mod, "base_layer", None)
                if hasattr(mod, "lora_A") and isinstance(getattr(base, "weight", None), torch.Tensor):
                    name = f"{mname}.base_layer.weight" if mname else "base_layer.weight"
                    if name in named:
                        out[name] = named[name]
        else:
            raise ValueError(f"FisherEstimator: params={params!r}; use None, 'lora', 'lora_base', a predicate or "
                             f"a list")
    elif callable(params):
        out = {n: p for n, p in named.items() if params(n, p)}
    else:
        by_id = {id(p): n for n, p in named.items()}
        out = {}
        for item in params:
            if isinstance(item, str):
                if item not in named:
                    raise KeyError(f"FisherEstimator: no parameter named {item!r} in the model")
                out[item] = named[item]
            elif isinstance(item, torch.Tensor) and id(item) in by_id:
                out[by_id[id(item)]] = item
            else:
                raise ValueError("FisherEstimator: params items must be parameter names or the model's parameters")
    if not out:
        raise ValueError("FisherEstimator: no parameter selected (params matched nothing)")
    return out


class Fisher(dict):
    """``{name: F}`` (float32 tensors) plus how it was estimated, so that its consumers know its scale.

    Attributes: ``normalize`` ("token" or "sample"), ``granularity``, ``labels``, ``num_samples``,
    ``num_tokens`` (labelled positions seen), ``num_batches``. A plain ``dict`` everywhere else."""

    def __init__(self, tensors=(), *, normalize: str = "sample", granularity: str = "sample",
                 labels: str = "empirical", num_samples: int = 0, num_tokens: int = 0, num_batches: int = 0):
        super().__init__(tensors)
        self.normalize, self.granularity, self.labels = normalize, granularity, labels
        self.num_samples, self.num_tokens, self.num_batches = num_samples, num_tokens, num_batches

    def meta(self) -> Dict[str, object]:
        return {"normalize": self.normalize, "granularity": self.granularity, "labels": self.labels,
                "num_samples": self.num_samples, "num_tokens": self.num_tokens, "num_batches": self.num_batches}


class FisherEstimator:
    """Diagonal Fisher information of (some of) a model's parameters, for EWC and friends.

    Conventions. The per-sample loss is the negative log-likelihood of the sample's labelled tokens,
    ``l_n = -sum_t log p(y_nt | ...)`` (a SUM over tokens: the sequence is the sample), with ``y`` the data's
    labels (``labels="empirical"``) or, for the true Fisher, drawn from the model's own softmax at every
    labelled position (``labels="sampled"``, ``label_samples`` = k draws, seeded). Over ``N`` samples in
    ``B`` batches:

    * ``granularity="sample"``: ``F = 1/(N k) sum_n sum_j (d l_n^(j) / d theta)^2``: the per-sample Fisher.
      Linear / Conv1D weights and biases (LoRA factors included) take the fused kernels: no per-sample
      gradient is ever materialised. Other parameters (norms, embeddings, tied weights) get per-sample
      gradients from autograd (batched over samples, or one backward per sample for large ones).
    * ``granularity="token"``: ``F = 1/(N k) sum_n sum_j sum_t (g_nt x_nt^T)^2`` for a Linear weight (each
      position's contribution to the gradient taken as an independent sample; equal to "sample" when each
      sample has one token; the cross-position terms are ignored). Fused layers only.
    * ``granularity="batch"``: ``F = 1/(B k) sum_b sum_j (d L_b^(j) / d theta)^2`` with ``L_b`` the MEAN of
      ``l_n`` over the batch: the square of the mini-batch mean gradient (what most EWC code computes, e.g.
      Avalanche's). Equal to "sample" for batches of one; smaller by about the batch size otherwise.

    Normalisation (``normalize``). The sums above are divided by the number of samples (``"sample"``: the
    per-sample Fisher of the SUMMED sequence loss, which grows with sequence length) or, the default, by the
    number of labelled tokens (``"token"``: ``F = sum_n (d l_n / d theta)^2 / sum_n T_n`` for sample/token
    granularity, and ``1/B sum_b T_b (d L_b / d theta)^2`` with ``L_b`` the per-token MEAN loss of batch ``b`` for
    batch granularity). The token normalisation is the empirical-Fisher approximation of the Hessian of the
    per-token mean loss - the loss Hugging Face models return - so ``lam/2 sum F d^2`` with ``lam = 1``
    estimates how much the old data's mean token loss rises, whatever the sequence length or granularity: a
    ``lam`` that keeps its meaning. :meth:`estimate` returns a :class:`Fisher` that records which one it is.

    Non-finite values are never folded in: per-sample contributions (sample/token) or gradient elements
    (batch, EMA) that are inf/nan are dropped; the names of the affected parameters end up in
    :attr:`nonfinite` (and a warning is emitted by :meth:`estimate`).

    ``batch_fn(model, batch) -> (logits [N, T, V], labels [N, T] (-100 = ignored)[, mask [N, T]])`` adapts other
    data/models; the default handles Hugging Face causal LMs (dicts with ``input_ids``, ``attention_mask``,
    ``labels``; labels shifted by one; padding ignored). Labels decide which positions count, in every
    granularity, as in the model's loss; the optional ``mask`` (over the layers' input positions) may only
    exclude positions whose gradient is zero anyway, e.g. to skip work (the default returns none). The model runs in eval mode (no dropout) during
    :meth:`estimate`. The Fisher state is float32, on each parameter's device.
    """

    def __init__(self, model: torch.nn.Module, *, labels: str = "empirical", granularity: str = "sample",
                 params: ParamSpec = None, label_samples: int = 1, seed: int = 0,
                 batch_fn: Optional[Callable] = None, normalize: str = "token"):
        if labels not in LABELS:
            raise ValueError(f"FisherEstimator: labels must be one of {LABELS}, got {labels!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"FisherEstimator: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if normalize not in NORMALIZE:
            raise ValueError(f"FisherEstimator: normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.normalize = normalize
        if not isinstance(label_samples, int) or label_samples < 1:
            raise ValueError(f"FisherEstimator: label_samples must be an int >= 1, got {label_samples!r}")
        if labels == "empirical" and label_samples != 1:
            raise ValueError("FisherEstimator: label_samples > 1 needs labels='sampled'")
        self.model, self.labels, self.granularity = model, labels, granularity
        self.label_samples, self.seed = label_samples, seed
        self.batch_fn = batch_fn or _data.causal_lm_batch_fn
        self.params = select_params(model, params)
        self.layers, self.fallback = plan(model, self.params)
        if granularity == "token" and self.fallback:
            raise ValueError(f"FisherEstimator: granularity='token' needs Linear/Conv1D parameters; no fused path "
                             f"for {self.fallback[:5]}{' ...' if len(self.fallback) > 5 else ''}")
        self.fisher: Dict[str, torch.Tensor] = {}
        self.nonfinite: list = []
        self.num_samples = 0
        self.num_tokens = 0
        self._ema_flag: Optional[torch.Tensor] = None

    # ---- full estimate -------------------------------------------------------------------------------------
    def estimate(self, dataloader: Iterable, *, max_batches: Optional[int] = None,
                 progress: bool = True, process_group=None, distributed: bool = True) -> Dict[str, torch.Tensor]:
        """Estimate the diagonal Fisher over ``dataloader`` (old-task or general data); returns ``{name: F}``.

        The result also replaces :attr:`fisher`. ``max_batches`` stops early; ``progress`` shows a tqdm bar.

        Under ``torch.distributed`` (a default process group is initialised, or ``process_group`` is given) each
        rank estimates over its own part of the data (e.g. a ``DistributedSampler``), then the unnormalised sums,
        the non-finite flags and the sample / token / batch counts are all-reduced ONCE at the end (one float32
        all-reduce of the Fisher's size plus one of 4 int64s), so every rank returns the Fisher one process would
        compute over the union of the ranks' data. ``distributed=False`` keeps each rank's own estimate.
        """
        from tqdm.auto import tqdm

        sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()}
        flags: Dict[str, torch.Tensor] = {}
        total = max_batches
        if total is None and hasattr(dataloader, "__len__"):
            total = len(dataloader)
        elif total is not None and hasattr(dataloader, "__len__"):
            total = min(total, len(dataloader))
        device = next(iter(self.params.values())).device
        gen = _data.make_generator(device, self.seed) if self.labels == "sampled" else None
        count = samples = tokens = batches_seen = 0
        capture = None
        if self.granularity != "batch":
            capture = Capture(self.model, self.layers, sums, flags, self.granularity == "token")
        with self._estimation_mode(capture):
            bar = tqdm(total=total, disable=not progress, desc=f"Fisher ({self.granularity})", unit="batch")
            try:
                for i, batch in enumerate(dataloader):
                    if max_batches is not None and i >= max_batches:
                        break
                    c, n_s, n_t = self._step(_data.to_device(batch, device), sums, flags, capture, gen)
                    count, samples, tokens, batches_seen = count + c, samples + n_s, tokens + n_t, batches_seen + 1
                    bar.update(1)
            finally:
                bar.close()
        group = _process_group(process_group, distributed)
        if group is not None:
            count, samples, tokens, batches_seen = _all_reduce_sums(sums, flags, group,
                                                                   [count, samples, tokens, batches_seen])
        if count == 0:
            raise ValueError("FisherEstimator.estimate: the dataloader gave no batch"
                             + (" on any rank" if group is not None else ""))
        if self.normalize == "token" and self.granularity != "batch":
            count = tokens
            if tokens == 0:
                raise ValueError("FisherEstimator.estimate: no labelled token in the data (every label is -100)")
        for s in sums.values():
            s.div_(count * self.label_samples)
        self.fisher = sums
        self.num_samples, self.num_tokens = samples, tokens
        self.nonfinite = [n for n, f in flags.items() if bool(f.item())]
        if self.nonfinite:
            warnings.warn(f"FisherEstimator: non-finite gradients were dropped for {len(self.nonfinite)} "
                          f"parameter(s): {self.nonfinite[:8]}", RuntimeWarning, stacklevel=2)
        return Fisher(sums, normalize=self.normalize, granularity=self.granularity, labels=self.labels,
                      num_samples=samples, num_tokens=tokens, num_batches=batches_seen)

    @contextlib.contextmanager
    def _estimation_mode(self, capture: Optional[Capture]):
        was_training = self.model.training
        need_grad = self.fallback if self.granularity != "batch" else list(self.params)
        saved = {n: self.params[n].requires_grad for n in need_grad}
        self.model.eval()
        for n in need_grad:
            self.params[n].requires_grad_(True)
        if capture is not None:
            capture.attach()
        try:
            yield
        finally:
            if capture is not None:
                capture.detach()
            for n, flag in saved.items():
                self.params[n].requires_grad_(flag)
            self.model.train(was_training)

    def _step(self, batch, sums, flags, capture: Optional[Capture], gen) -> tuple:
        """One batch; returns (the count to normalise by under "sample": samples, or 1 for batch granularity;
        the number of samples; the number of labelled tokens)."""
        if capture is not None:
            capture.new_batch(_batch_size(batch), None)
        with torch.enable_grad():
            logits, labels, mask = _data.normalize_batch_output(self.batch_fn(self.model, batch))
        n = logits.shape[0]
        if capture is not None:
            capture.n = n
            if mask is not None:
                capture.mask = mask.to(torch.bool)
        n_tokens = int((labels != -100).sum())
        draws = [labels] if self.labels == "empirical" else _data.sample_labels(logits, labels,
                                                                               self.label_samples, gen)
        for j, y in enumerate(draws):
            losses = _data.per_sample_nll(logits, y)
            last = j == len(draws) - 1
            if self.granularity == "batch":
                names = list(self.params)
                # "sample": the square of the gradient of the mean over samples of the summed sequence loss;
                # "token": T_b times the square of the gradient of the per-token mean loss (see the docstring)
                per_token = self.normalize == "token"
                mean_loss = losses.sum() / max(n_tokens, 1) if per_token else losses.mean()
                grads = torch.autograd.grad(mean_loss, [self.params[k] for k in names],
                                            retain_graph=not last, allow_unused=True)
                pairs = [(sums[k], g) for k, g in zip(names, grads) if g is not None]
                sc = float(max(n_tokens, 1)) if per_token else 1.0
                if pairs and bool(fisher_accumulate_([a for a, _ in pairs], [g.contiguous() for _, g in pairs],
                                                     scale=sc)):
                    for k, g in zip(names, grads):  # rare: find which parameters saw inf/nan
                        if g is not None and not bool(torch.isfinite(g).all()):
                            flags[k] = torch.ones((), dtype=torch.float32)
                continue
            if self.fallback:
                self._fallback_per_sample(losses, sums, flags, retain=True)
            if capture.layers:
                capture.active = True
                try:
                    torch.autograd.grad(losses.sum(), capture.grad_targets(), retain_graph=not last,
                                        allow_unused=True)
                finally:
                    capture.active = False
        return (1 if self.granularity == "batch" else n), n, n_tokens

    def _fallback_per_sample(self, losses: torch.Tensor, sums, flags, retain: bool) -> None:
        """Per-sample autograd for parameters without a fused path: one batched backward over the samples
        when the per-sample gradients fit, else one backward per sample."""
        names = self.fallback
        ps = [self.params[k] for k in names]
        n = losses.shape[0]
        per_sample_bytes = n * sum(p.numel() for p in ps) * 4
        if per_sample_bytes <= _BATCHED_FALLBACK_BYTES:
            try:
                eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
                grads = torch.autograd.grad(losses, ps, grad_outputs=eye, is_grads_batched=True,
                                            retain_graph=True, allow_unused=True)
                for k, g in zip(names, grads):
                    if g is not None:
                        self._add_sq(sums, flags, k, g.float())
                return
            except RuntimeError:
                pass  # an op without a batching rule: one backward per sample below
        for i in range(n):
            grads = torch.autograd.grad(losses[i], ps, retain_graph=True, allow_unused=True)
            for k, g in zip(names, grads):
                if g is not None:
                    self._add_sq(sums, flags, k, g.float().unsqueeze(0))

    @staticmethod
    def _add_sq(sums, flags, name: str, g: torch.Tensor) -> None:
        sq = g * g
        ok = torch.isfinite(sq)
        found = (~ok).any().to(torch.float32)
        sums[name].add_(torch.where(ok, sq, 0.0).sum(0))
        flags[name] = torch.maximum(flags.get(name, found), found)

    # ---- EMA from training gradients -----------------------------------------------------------------------
    def update_from_grads(self, model: Optional[torch.nn.Module] = None, *, decay: float = 0.9,
                          scale: Optional[float] = None) -> torch.Tensor:
        """EWC++ / RWalk EMA from the gradients the training step already computed (``p.grad``), no extra
        forward or backward: ``F <- decay * F + scale * grad^2`` (``scale`` defaults to ``1 - decay``), one
        multi-tensor :func:`forgetkern.fisher_accumulate_` launch.

        ``grad`` is whatever the step's loss produced (typically the mini-batch MEAN gradient, i.e. the
        "batch" granularity above, under the training loss's normalisation). Under DistributedDataParallel the
        ``.grad`` after ``backward()`` is already averaged over the ranks, so this estimates the square of the
        GLOBAL-batch mean gradient, ``(1/R sum_r g_r)^2``, not the mean of the ranks' squares
        ``1/R sum_r g_r^2`` (which is about R times larger for uncorrelated noise): every rank computes the same
        EMA with no extra communication, and it equals what one process computes on the global batch. Parameters without a gradient
        are skipped. Non-finite gradient elements are skipped (the state keeps its old value); returns the
        0-dim float32 found-non-finite flag (no host sync); :attr:`ema_nonfinite` tells if any update saw one.
        """
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"FisherEstimator.update_from_grads: decay must be a float in [0, 1], got {decay!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale < 0):
            raise ValueError(f"FisherEstimator.update_from_grads: scale must be a finite float >= 0 (default "
                             f"1 - decay), got {scale!r}")
        named = dict((model or self.model).named_parameters())
        fishers, grads, names = [], [], []
        for k in self.params:
            p = named.get(k, self.params[k])
            if p.grad is None:
                continue
            f = self.fisher.get(k)
            if f is None:
                f = self.fisher[k] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            fishers.append(f)
            grads.append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
            names.append(k)
        if not fishers:
            return torch.zeros((), dtype=torch.float32)
        found = fisher_accumulate_(fishers, grads, decay=float(decay),
                                   scale=float(1.0 - decay if scale is None else scale))
        self._ema_flag = found if self._ema_flag is None else torch.maximum(self._ema_flag, found)
        return found

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        """The running state (the Fisher / EMA, counts, non-finite flags) and the settings it depends on, for
        :func:`forgetkern.save_state` (or ``torch.save``)."""
        return {"version": 1, "labels": self.labels, "granularity": self.granularity, "normalize": self.normalize,
                "names": list(self.params), "fisher": dict(self.fisher), "num_samples": self.num_samples,
                "num_tokens": self.num_tokens, "nonfinite": list(self.nonfinite), "ema_flag": self._ema_flag}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore :meth:`state_dict` into an estimator built with the same settings on the same model."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("FisherEstimator.load_state_dict: not a FisherEstimator state_dict (version 1)")
        for key in ("labels", "granularity", "normalize"):
            if state[key] != getattr(self, key):
                raise ValueError(f"FisherEstimator.load_state_dict: the state was taken with {key}="
                                 f"{state[key]!r}, this estimator has {getattr(self, key)!r}")
        if list(state["names"]) != list(self.params):
            raise ValueError(f"FisherEstimator.load_state_dict: the state covers {len(state['names'])} parameters, "
                             f"this estimator {len(self.params)}: build it with the same model and params=")
        fisher = {}
        for n, f in state["fisher"].items():
            p = self.params.get(n)
            if p is None or tuple(f.shape) != tuple(p.shape):
                raise ValueError(f"FisherEstimator.load_state_dict: Fisher {n!r} of shape {tuple(f.shape)} does "
                                 f"not match the model's parameter")
            fisher[n] = f.to(device=p.device, dtype=torch.float32)
        self.fisher = fisher
        self.num_samples, self.num_tokens = int(state["num_samples"]), int(state["num_tokens"])
        self.nonfinite = list(state["nonfinite"])
        self._ema_flag = state["ema_flag"]

    @property
    def ema_nonfinite(self) -> bool:
        """True if an EMA update (:meth:`update_from_grads`) skipped a non-finite gradient (syncs the device)."""
        return self._ema_flag is not None and bool(self._ema_flag.item())


def _process_group(process_group, distributed: bool):
    """The group to all-reduce over, or None (one process, or ``distributed=False``)."""
    if not distributed:
        return None
    dist = torch.distributed
    if process_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("FisherEstimator.estimate: process_group was given but torch.distributed is not "
                               "initialised (call torch.distributed.init_process_group first)")
        return process_group if dist.get_world_size(process_group) > 1 else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _all_reduce_sums(sums: Dict[str, torch.Tensor], flags: Dict[str, torch.Tensor], group, counts) -> list:
    """Sum ``sums`` (in place), the non-finite ``flags`` and the integer ``counts`` over ``group``: one float32
    all-reduce over the flattened sums and flags, one int64 all-reduce of the counts."""
    dist = torch.distributed
    names = list(sums)
    device = sums[names[0]].device
    if any(sums[n].device != device for n in names):
        raise ValueError("FisherEstimator.estimate: a distributed estimate needs every selected parameter on one "
                         "device")
    flag_vec = torch.stack([flags[n].to(device=device, dtype=torch.float32).reshape(())
                            if n in flags else torch.zeros((), dtype=torch.float32, device=device) for n in names])
    flat = torch.cat([sums[n].reshape(-1) for n in names] + [flag_vec])
    dist.all_reduce(flat, group=group)
    off = 0
    for n in names:
        k = sums[n].numel()
        sums[n].copy_(flat[off:off + k].view_as(sums[n]))
        off += k
    for i, n in enumerate(names):
        if float(flat[off + i]) > 0 or n in flags:
            flags[n] = (flat[off + i] > 0).to(torch.float32)
    c = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(c, group=group)
    return [int(v) for v in c.tolist()]


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].shape[0]
    return 0
