"""Model evaluation for forgetting: perplexity and lm-eval-style multiple choice, and continual-learning metrics.

* :func:`perplexity` - ``exp`` of the mean next-token NLL over every labelled token of a set of windows.
* :func:`mc_accuracy` - log-likelihood multiple choice as lm-eval-harness scores it: for each item the model
  scores ``log p(choice | context)`` of every choice; ``acc`` takes the argmax of the summed log-likelihood,
  ``acc_norm`` of the log-likelihood per byte of the choice's text.
* :func:`relative_drop`, :func:`average_accuracy`, :func:`bwt`, :func:`forgetting` - the metrics of continual
  learning (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018) over an accuracy matrix ``R[i][j]`` = accuracy on task
  ``j`` after training on task ``i``.

Everything runs under ``torch.inference_mode`` in eval mode (restoring the model's mode afterwards), batched.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def perplexity(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 8) -> float:
    """Perplexity of ``model`` on ``windows`` ([N, T] token ids, ``-1`` = padding as :func:`forgetkern.data.text_windows`
    makes): ``exp(sum NLL / number of predicted tokens)``, each window's first token not predicted."""
    from forgetkern.data import batches

    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError("perplexity: windows must be an int64 tensor [N, T] of token ids")
    if windows.shape[0] == 0:
        raise ValueError("perplexity: windows is empty")
    nll, count = 0.0, 0
    dev = _device(model)
    with _evaluating(model):
        for b in batches(windows, batch_size):
            logits = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev)).logits
            labels = b["labels"][:, 1:].to(dev)
            lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                                   ignore_index=-100, reduction="sum")
            nll += float(lp)
            count += int((labels != -100).sum())
    return math.exp(nll / max(count, 1))


def mc_accuracy(model: torch.nn.Module, tokenizer, items: Sequence[Mapping], *, batch_size: int = 16
                ) -> Dict[str, float]:
    """``{"acc", "acc_norm", "n"}`` of log-likelihood multiple choice over ``items`` (dicts with ``context``,
    ``choices`` (strings, each starting with its separating space) and ``answer`` (index)).

    The context and each choice are tokenised separately and concatenated (lm-eval's convention), so the choice's
    tokens are exactly those scored."""
    if not items:
        raise ValueError("mc_accuracy: items is empty")
    seqs: List[List[int]] = []
    spans: List[tuple] = []
    owners: List[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    for k, it in enumerate(items):
        try:
            ctx, choices, answer = it["context"], it["choices"], int(it["answer"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"mc_accuracy: items[{k}] must have 'context', 'choices' and an int 'answer'") from None
        if not 0 <= answer < len(choices):
            raise ValueError(f"mc_accuracy: items[{k}]['answer']={answer} is not an index of its {len(choices)} choices")
        c_ids = ([bos] if bos is not None else []) + tokenizer(ctx, add_special_tokens=False)["input_ids"]
        for ch in choices:
            a_ids = tokenizer(ch, add_special_tokens=False)["input_ids"]
            if not a_ids:
                raise ValueError(f"mc_accuracy: items[{k}] has an empty choice")
            seqs.append(c_ids + a_ids)
            spans.append((len(c_ids), len(c_ids) + len(a_ids)))
            owners.append(k)
    scores = torch.empty(len(seqs), dtype=torch.float64)
    dev = _device(model)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
    with _evaluating(model):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # right padding: positions of the real tokens are unchanged
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, :len(seqs[i])] = 1
            logp = torch.log_softmax(model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float(), -1)
            for r, i in enumerate(idx):
                a, b = spans[i]
                tgt = ids[r, a:b].to(dev)
                scores[i] = logp[r, a - 1:b - 1].gather(-1, tgt[:, None]).sum().double().cpu()
    acc = acc_norm = 0
    pos = 0
    for k, it in enumerate(items):
        n = len(it["choices"])
        sc = scores[pos:pos + n]
        lens = torch.tensor([max(len(c.encode("utf-8")), 1) for c in it["choices"]], dtype=torch.float64)
        acc += int(int(sc.argmax()) == int(it["answer"]))
        acc_norm += int(int((sc / lens).argmax()) == int(it["answer"]))
        pos += n
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def relative_drop(before: float, after: float, *, higher_is_better: bool = False) -> float:
    """The relative loss of a general metric: ``(after - before) / before`` for a lower-is-better metric such as
    perplexity, ``(before - after) / before`` for accuracy. Positive = forgot."""
    if before == 0:
        raise ValueError("relative_drop: before is 0; the relative change is undefined")
    d = (before - after) if higher_is_better else (after - before)
    return d / abs(before)


def _check_matrix(R: Sequence[Sequence[float]], fn: str) -> List[List[float]]:
    R = [list(map(float, row)) for row in R]
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"{fn}: R must be a square T x T matrix (R[i][j] = accuracy on task j after training "
                         f"task i), got rows of lengths {[len(r) for r in R]}")
    return R


def average_accuracy(R: Sequence[Sequence[float]]) -> float:
    """``ACC = 1/T sum_j R[T-1][j]``: mean accuracy on all tasks after the last."""
    R = _check_matrix(R, "average_accuracy")
    return sum(R[-1]) / len(R)


def bwt(R: Sequence[Sequence[float]]) -> float:
    """Backward transfer ``1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])``; negative = forgetting."""
    R = _check_matrix(R, "bwt")
    T = len(R)
    if T < 2:
        raise ValueError("bwt: needs at least two tasks")
    return sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forgetting(R: Sequence[Sequence[float]]) -> float:
    """Chaudhry et al.'s average forgetting ``1/(T-1) sum_{j<T-1} max_{l<T-1} (R[l][j] - R[T-1][j])``."""
    R = _check_matrix(R, "forgetting")
    T = len(R)
    if T < 2:
        raise ValueError("forgetting: needs at least two tasks")
    return sum(max(R[l][j] for l in range(j, T - 1)) - R[-1][j] for j in range(T - 1)) / (T - 1)
