"""Memory-aware adaptive replay (after Lu, He, Chen, Zha 2026, arXiv 2603.09892, "MSSR"): each replay sample has a
memory strength, replay goes to the samples whose memory is weakest, and the interval between two
rehearsals of a sample expands as its memory stabilises.

The model, per memory sample ``i`` (one general / old-task sample), at training step ``t``::

    retention   R_i(t) = exp(-(t - t_i) / S_i)       Ebbinghaus forgetting curve; t_i = last rehearsal
                                                     (R_i = 0 for a sample never rehearsed)
    due         a sample is due for replay when R_i < due_retention (never-rehearsed samples are due)
    selection   each batch's replay budget (round(replay_ratio * batch_size) slots) goes to the due samples
                with the lowest R_i (weakest first; ties broken by a seeded random order); slots no sample
                is due for go back to domain data (or, with fill="weakest", to the weakest samples anyway)
    update      after sample i is rehearsed with per-sample loss l_i:
                q_i = exp(-l_i / lbar)                   lbar: EMA of the rehearsal losses (scale-free)
                S_i <- S_i * (1 + growth * q_i)          if q_i >= fail_quality
                S_i <- max(min_strength, S_i * shrink)   otherwise (the sample was forgotten)

Why this rule: a rehearsal the model passes easily (loss below the running mean of rehearsal losses, q > 1/e)
is the spaced-repetition "good recall" case and multiplies the strength by up to ``1 + growth``, so the time
until R falls to a given level (``S * ln(1/R)``) grows geometrically, the expanding intervals of spaced
repetition; a hard rehearsal (high loss) grows it little, and a failed one (q below ``fail_quality``,
i.e. loss above ``lbar * ln(1/fail_quality)``) shrinks it so the sample comes back soon. Normalising by the EMA
makes the rule independent of the loss's scale (nats per token differ across corpora and models).

Losses come from the training step itself (no extra forward): :func:`per_sample_loss` reduces the
token losses to one per sample with ``labels == -100`` masked.
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator, List, Optional

import torch

__all__ = ["MSSR", "MSSRBatchSampler", "MSSRDataset", "per_sample_loss"]


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True,
                    ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy per sample, float32 [batch], with ``labels == ignore_index`` masked (HF's
    causal-LM convention: ``shift=True`` predicts ``labels[:, 1:]`` from ``logits[:, :-1]``). A sample without
    any labelled token gets NaN (MSSR.update skips it). Detached: it only feeds the scheduler."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"per_sample_loss: logits must be [batch, seq, vocab] and labels [batch, seq], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    logits, labels = logits.detach(), labels.detach()
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=ignore_index,
                                            reduction="none")
    mask = labels != ignore_index
    n = mask.sum(1)
    out = (tok * mask).sum(1) / n.clamp(min=1)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def _pos_float(name: str, v, *, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
            v == 0 and not allow_zero):
        raise ValueError(f"MSSR: {name} must be a finite float {'>=' if allow_zero else '>'} 0, got {v!r}")
    return float(v)


class MSSR:
    """Memory strengths of ``n_memory`` replay samples and the weakest-first schedule (module docstring).

    Args:
        n_memory: number of replay (general / old-task) samples.
        replay_ratio: share of each batch given to replay, in [0, 1).
        init_strength: ``S`` of a sample after its first rehearsal, in steps (before the growth).
        growth: strength multiplier gain of a perfect rehearsal (``S *= 1 + growth * q``).
        shrink, fail_quality, min_strength: the forgotten case (``q < fail_quality``: ``S *= shrink``).
        loss_ema: momentum of the running mean of rehearsal losses ``lbar``.
        due_retention: retention under which a sample is due for replay (its interval is ``S ln(1/due)``).
        fill: ``"domain"`` (unused replay slots go to domain data: intervals expand as strengths grow) or
            ``"weakest"`` (every slot is replay: a fixed share, the weakest samples whether due or not).
        seed: seeds the tie-break order (samples never rehearsed are drawn in a random order).
    """

    def __init__(self, n_memory: int, *, replay_ratio: float = 0.2, init_strength: float = 4.0,
                 growth: float = 1.0, shrink: float = 0.5, fail_quality: float = 0.05,
                 min_strength: float = 1.0, loss_ema: float = 0.9, due_retention: float = 0.5,
                 fill: str = "domain", seed: int = 0):
        if isinstance(n_memory, bool) or not isinstance(n_memory, int) or n_memory < 1:
            raise ValueError(f"MSSR: n_memory must be a positive int (the number of replay samples), got "
                             f"{n_memory!r}")
        if isinstance(replay_ratio, bool) or not isinstance(replay_ratio, (int, float)) or not (
                0.0 <= replay_ratio < 1.0):
            raise ValueError(f"MSSR: replay_ratio must be a float in [0, 1) (the replay share of each batch), got "
                             f"{replay_ratio!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"MSSR: seed must be an int, got {type(seed).__name__}")
        self.n_memory = n_memory
        self.replay_ratio = float(replay_ratio)
        self.init_strength = _pos_float("init_strength", init_strength)
        self.growth = _pos_float("growth", growth, allow_zero=True)
        self.shrink = _pos_float("shrink", shrink)
        if self.shrink > 1:
            raise ValueError(f"MSSR: shrink must be in (0, 1], got {shrink!r}")
        self.fail_quality = _pos_float("fail_quality", fail_quality, allow_zero=True)
        self.min_strength = _pos_float("min_strength", min_strength)
        self.loss_ema = _pos_float("loss_ema", loss_ema, allow_zero=True)
        if self.loss_ema >= 1:
            raise ValueError(f"MSSR: loss_ema must be in [0, 1), got {loss_ema!r}")
        if isinstance(due_retention, bool) or not isinstance(due_retention, (int, float)) or not (
                0.0 < due_retention <= 1.0):
            raise ValueError(f"MSSR: due_retention must be a float in (0, 1], got {due_retention!r}")
        if fill not in ("domain", "weakest"):
            raise ValueError(f"MSSR: fill must be 'domain' or 'weakest', got {fill!r}")
        self.due_retention, self.fill = float(due_retention), fill
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        self._tiebreak = torch.randperm(n_memory, generator=g).to(torch.float64)
        self.strength = torch.full((n_memory,), self.init_strength, dtype=torch.float64)
        self.last = torch.full((n_memory,), -1, dtype=torch.int64)      # -1: never rehearsed
        self.count = torch.zeros(n_memory, dtype=torch.int64)
        self.step = 0
        self.loss_mean: Optional[float] = None

    # ---- schedule -------------------------------------------------------------------------------------------
    def slots(self, batch_size: int) -> int:
        """Replay slots of a batch of ``batch_size``: ``round(replay_ratio * batch_size)``."""
        return int(round(self.replay_ratio * batch_size))

    def retention(self, step: Optional[int] = None) -> torch.Tensor:
        """``R_i`` at ``step`` (default: the current step), float64 [n_memory]; 0 for never-rehearsed samples."""
        t = self.step if step is None else int(step)
        age = (t - self.last).to(torch.float64)
        r = torch.exp(-age / self.strength)
        return torch.where(self.last < 0, torch.zeros_like(r), r)

    def intervals(self) -> torch.Tensor:
        """Steps after its last rehearsal until each sample is due again: ``S ln(1 / due_retention)``."""
        return self.strength * math.log(1.0 / self.due_retention)

    def select(self, k: int) -> torch.Tensor:
        """Up to ``k`` samples, weakest (lowest retention) first, int64: the due ones (``fill="domain"``; fewer
        than ``k`` when fewer are due) or the ``k`` weakest (``fill="weakest"``). They count as rehearsed at the
        current step: :meth:`update` them with their losses, and :meth:`tick` once per training step."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"MSSR.select: k must be an int >= 0, got {k!r}")
        k = min(k, self.n_memory)
        if k == 0:
            return torch.zeros(0, dtype=torch.int64)
        r = self.retention()
        # R first, then the seeded order: sort by the tie-break rank, then stable sort by R
        order = torch.argsort(self._tiebreak)
        order = order[torch.argsort(r[order], stable=True)]
        if self.fill == "domain":
            k = min(k, int((r < self.due_retention).sum()))
        idx = order[:k].clone()
        self.last[idx] = self.step
        self.count[idx] += 1
        return idx

    def tick(self, n: int = 1) -> None:
        """Advance the clock by ``n`` training steps."""
        self.step += int(n)

    def update(self, indices, losses) -> None:
        """Update the strengths of the rehearsed ``indices`` from their per-sample ``losses`` (NaN skipped)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
        loss = torch.as_tensor(losses).detach().reshape(-1).to(torch.float64).cpu()
        if idx.numel() != loss.numel():
            raise ValueError(f"MSSR.update: {idx.numel()} indices but {loss.numel()} losses; pass one loss per "
                             f"rehearsed sample")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_memory):
            raise IndexError(f"MSSR.update: indices must be in [0, {self.n_memory}), got {idx.tolist()[:8]}")
        ok = torch.isfinite(loss)
        idx, loss = idx[ok], loss[ok]
        if (loss < 0).any():
            raise ValueError("MSSR.update: losses must be >= 0 (per-sample cross-entropies)")
        if not idx.numel():
            return
        batch_mean = float(loss.mean())
        self.loss_mean = batch_mean if self.loss_mean is None else (
            self.loss_ema * self.loss_mean + (1 - self.loss_ema) * batch_mean)
        q = torch.exp(-loss / max(self.loss_mean, 1e-12))
        s = self.strength[idx]
        grown = s * (1 + self.growth * q)
        failed = torch.clamp(s * self.shrink, min=self.min_strength)
        self.strength[idx] = torch.where(q >= self.fail_quality, grown, failed)

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"n_memory": self.n_memory, "seed": self.seed, "step": self.step, "loss_mean": self.loss_mean,
                "strength": self.strength.clone(), "last": self.last.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_memory") != self.n_memory or state.get("seed") != self.seed:
            raise ValueError(f"MSSR.load_state_dict: the state is for n_memory={state.get('n_memory')}, "
                             f"seed={state.get('seed')}; this scheduler has n_memory={self.n_memory}, "
                             f"seed={self.seed}")
        self.step, self.loss_mean = int(state["step"]), state["loss_mean"]
        self.strength = state["strength"].clone().to(torch.float64)
        self.last = state["last"].clone().to(torch.int64)
        self.count = state["count"].clone().to(torch.int64)


class MSSRDataset(torch.utils.data.Dataset):
    """``domain`` then ``memory`` as one dataset (index ``j >= len(domain)`` is memory sample ``j -
    len(domain)``). Each item says which memory sample it is: a dict item gets ``"replay_index"`` (-1 for
    domain samples); any other item becomes ``(item, replay_index)``."""

    def __init__(self, domain: Any, memory: Any):
        self.domain, self.memory = domain, memory
        self.n_domain = len(domain)

    def __len__(self) -> int:
        return self.n_domain + len(self.memory)

    def __getitem__(self, i: int):
        if i < self.n_domain:
            item, r = self.domain[i], -1
        else:
            item, r = self.memory[i - self.n_domain], i - self.n_domain
        if isinstance(item, dict):
            return {**item, "replay_index": r}
        return item, r


class MSSRBatchSampler(torch.utils.data.Sampler):
    """Batches of :class:`MSSRDataset` indices: the memory samples :meth:`MSSR.select` gives for the batch's
    replay budget (``mssr.slots(batch_size)``), the rest domain samples (a seeded shuffle per epoch, without
    replacement; an epoch ends when the domain data is used up, the last batch may be short). The sampler
    ticks the scheduler's clock once per batch. ``len()`` is the number of batches when every replay slot is
    used (an upper bound: with ``fill="domain"``, batches with fewer due samples take more domain data).
    Resumable: ``state_dict`` holds the epoch, the position in it and the scheduler's state.

    >>> mssr = MSSR(len(general), replay_ratio=0.25)
    >>> ds = MSSRDataset(domain, general)
    >>> loader = DataLoader(ds, batch_sampler=MSSRBatchSampler(len(domain), mssr, batch_size=8))
    >>> for batch in loader:
    ...     out = model(**inputs); loss = out.loss
    ...     r = batch["replay_index"]; m = r >= 0
    ...     mssr.update(r[m], per_sample_loss(out.logits, batch["labels"])[m])
    """

    def __init__(self, n_domain: int, mssr: MSSR, batch_size: int, *, seed: int = 0, drop_last: bool = False):
        if isinstance(n_domain, bool) or not isinstance(n_domain, int) or n_domain < 1:
            raise ValueError(f"MSSRBatchSampler: n_domain must be a positive int, got {n_domain!r}")
        if not isinstance(mssr, MSSR):
            raise TypeError(f"MSSRBatchSampler: mssr must be an MSSR, got {type(mssr).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"MSSRBatchSampler: batch_size must be a positive int, got {batch_size!r}")
        if mssr.slots(batch_size) >= batch_size:
            raise ValueError(f"MSSRBatchSampler: batch_size={batch_size} leaves no domain slot with replay_ratio="
                             f"{mssr.replay_ratio}")
        self.n_domain, self.mssr, self.batch_size = n_domain, mssr, batch_size
        self.seed, self.drop_last = seed, drop_last
        self.epoch, self.pos = 0, 0  # pos: domain samples of the epoch already used

    def _per_batch(self) -> int:
        return self.batch_size - self.mssr.slots(self.batch_size)

    def __len__(self) -> int:
        d = self._per_batch()
        return self.n_domain // d if self.drop_last else -(-self.n_domain // d)

    def __iter__(self) -> Iterator[List[int]]:
        order = list(range(self.n_domain))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        while self.pos < self.n_domain:
            if self.drop_last and self.n_domain - self.pos < self._per_batch():
                break
            rep = self.mssr.select(min(self.mssr.slots(self.batch_size), self.batch_size - 1))
            take = self.batch_size - int(rep.numel())
            dom = order[self.pos:self.pos + take]
            self.pos += len(dom)
            self.mssr.tick()
            yield dom + [self.n_domain + int(j) for j in rep]
        self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "mssr": self.mssr.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.seed = int(state["epoch"]), int(state["pos"]), int(state["seed"])
        self.mssr.load_state_dict(state["mssr"])
