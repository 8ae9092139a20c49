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


def _accepts(model, name: str) -> bool:
    import inspect

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return False


def _score_shared_context(model, ctxs: List[List[int]], choices: List[List[List[int]]], pad: int) -> List[torch.Tensor]:
    """``log p(choice | context)`` of every choice of a batch of items, the context run ONCE per item: the
    contexts go through the model left-padded (explicit position ids, so every token sits where it would
    unpadded) with a KV cache, the cache is repeated per choice and the choices (right-padded) continue from it.
    Returns one float64 tensor of choice scores per item."""
    dev = _device(model)
    n = len(ctxs)
    width = max(len(c) for c in ctxs)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, c in enumerate(ctxs):
        ids[i, width - len(c):] = torch.tensor(c)
        mask[i, width - len(c):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    kw = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True, **kw)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)  # next-token log-probs after each context
    cache = out.past_key_values
    owner = [i for i, chs in enumerate(choices) for _ in chs]
    flat = [ch for chs in choices for ch in chs]
    m, lc = len(flat), max(len(ch) for ch in flat)
    own = torch.tensor(owner)
    cache.reorder_cache(own.to(dev))  # one cache row per choice
    cids = torch.full((m, lc), pad, dtype=torch.long)
    cmask = torch.zeros((m, lc), dtype=torch.long)
    for r, ch in enumerate(flat):
        cids[r, :len(ch)] = torch.tensor(ch)
        cmask[r, :len(ch)] = 1
    lens = torch.tensor([len(c) for c in ctxs])[own]
    cpos = lens[:, None] + torch.arange(lc)[None]
    logits = model(input_ids=cids.to(dev), attention_mask=torch.cat([mask[own], cmask], 1).to(dev),
                   position_ids=cpos.to(dev), past_key_values=cache, use_cache=False).logits
    logp = torch.log_softmax(logits.float(), -1)
    scores = torch.empty(m, dtype=torch.float64)
    for r, ch in enumerate(flat):
        tgt = cids[r, :len(ch)].to(dev)
        s = first[owner[r], tgt[0]].double()
        if len(ch) > 1:
            s = s + logp[r, :len(ch) - 1].gather(-1, tgt[1:, None]).sum().double()
        scores[r] = s.cpu()
    out_scores, pos_ = [], 0
    for chs in choices:
        out_scores.append(scores[pos_:pos_ + len(chs)])
        pos_ += len(chs)
    return out_scores


def mc_accuracy(model: torch.nn.Module, tokenizer, items: Sequence[Mapping], *, batch_size: int = 16
                ) -> Dict[str, float]:
    """``{"acc", "acc_norm", "n"}`` of log-likelihood multiple choice over ``items`` (dicts with ``context``,
    ``choices`` (strings, each starting with its separating space) and ``answer`` (index)).

    The context and each choice are tokenised separately and concatenated (lm-eval's convention), so the choice's
    tokens are exactly those scored. ``batch_size`` items are scored together, each context run once and its
    KV cache shared by the item's choices (the same numbers as scoring every ``context + choice`` sequence on
    its own, in a fraction of the compute: the contexts are most of the tokens)."""
    if not items:
        raise ValueError("mc_accuracy: items is empty")
    bos = getattr(tokenizer, "bos_token_id", None)
    ctxs: List[List[int]] = []
    chs: List[List[List[int]]] = []
    for k, it in enumerate(items):
        try:
            ctx, choices, answer = it["context"], it["choices"], int(it["answer"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"mc_accuracy: items[{k}] must have 'context', 'choices' and an int 'answer'") from None
        if not 0 <= answer < len(choices):
            raise ValueError(f"mc_accuracy: items[{k}]['answer']={answer} is not an index of its {len(choices)} choices")
        c_ids = ([bos] if bos is not None else []) + tokenizer(ctx, add_special_tokens=False)["input_ids"]
        if not c_ids:
            raise ValueError(f"mc_accuracy: items[{k}] has an empty context and the tokenizer adds no BOS")
        a_ids = [tokenizer(ch, add_special_tokens=False)["input_ids"] for ch in choices]
        if not all(a_ids):
            raise ValueError(f"mc_accuracy: items[{k}] has an empty choice")
        ctxs.append(c_ids)
        chs.append(a_ids)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    order = sorted(range(len(items)), key=lambda i: -len(ctxs[i]))  # similar lengths share a batch
    scores: List[Optional[torch.Tensor]] = [None] * len(items)
    with _evaluating(model):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            for i, sc in zip(idx, _score_shared_context(model, [ctxs[i] for i in idx], [chs[i] for i in idx], pad)):
                scores[i] = sc
    acc = acc_norm = 0
    for it, sc in zip(items, scores):
        lens = torch.tensor([max(len(c.encode("utf-8")), 1) for c in it["choices"]], dtype=torch.float64)
        acc += int(int(sc.argmax()) == int(it["answer"]))
        acc_norm += int(int((sc / lens).argmax()) == int(it["answer"]))
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
