"""Batches, per-sample losses and label sampling for :class:`forgetkern.FisherEstimator`."""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

IGNORE = -100


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def causal_lm_batch_fn(model: torch.nn.Module, batch) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Default ``batch_fn`` for Hugging Face causal LMs.

    ``batch``: a dict with ``input_ids`` [N, T] and optionally ``attention_mask`` and ``labels`` (``-100`` =
    ignored; default: ``input_ids`` with padding ignored), or a bare ``input_ids`` tensor. Returns
    ``(logits [N, T-1, V], labels [N, T-1], None)``: the usual causal shift, token ``t`` predicting token
    ``t + 1``. Labels alone decide which positions count, as in the model's own loss: no position mask is
    returned. (With left padding the last pad position predicts the first real token, so the loss keeps it;
    masking by ``attention_mask`` would drop it. Positions that reach no counted label have a zero gradient
    and add nothing.)
    """
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError("FisherEstimator: the default batch_fn needs a dict with 'input_ids' (and optionally "
                        "'attention_mask', 'labels') or an input_ids tensor; pass batch_fn= for other data")
    ids = batch["input_ids"]
    attn = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = ids if attn is None else ids.masked_fill(attn == 0, IGNORE)
    kwargs = {"input_ids": ids}
    if attn is not None:
        kwargs["attention_mask"] = attn
    out = model(**kwargs)
    logits = out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])
    return logits[:, :-1], labels[:, 1:], None


def normalize_batch_output(res) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    if not isinstance(res, (tuple, list)) or len(res) not in (2, 3):
        raise TypeError("FisherEstimator: batch_fn must return (logits, labels) or (logits, labels, mask)")
    logits, labels = res[0], res[1]
    mask = res[2] if len(res) == 3 else None
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"FisherEstimator: batch_fn returned logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)}; expected [N, T, V] and [N, T]")
    return logits, labels, mask


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``l_n = sum_t -log p(labels_nt)`` over the tokens whose label is not -100, in float32: shape [N]."""
    n, t, v = logits.shape
    nll = F.cross_entropy(logits.reshape(n * t, v).float(), labels.reshape(n * t), reduction="none",
                          ignore_index=IGNORE)
    return nll.view(n, t).sum(1)


def sample_labels(logits: torch.Tensor, labels: torch.Tensor, k: int, gen: torch.Generator) -> list:
    """``k`` label tensors drawn from the model's own softmax at every position whose label is not -100."""
    with torch.no_grad():
        valid = labels != IGNORE
        probs = torch.softmax(logits.detach()[valid].float(), dim=-1)
        out = []
        if probs.shape[0] == 0:
            return [labels.clone() for _ in range(k)]
        draws = torch.multinomial(probs, k, replacement=True, generator=gen)  # [M, k]
        for j in range(k):
            y = torch.full_like(labels, IGNORE)
            y[valid] = draws[:, j].to(labels.dtype)
            out.append(y)
    return out


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


BatchFn = Callable[[torch.nn.Module, object], tuple]
