"""Data helpers for forgetting-safe fine-tuning: windowing text, mixing replay data, freezing bottom layers.

* :func:`text_windows` - tokenise texts and cut them into fixed-length windows (the unit the demo trains and
  evaluates on); returns ``{"input_ids", "attention_mask", "labels"}`` batches for Hugging Face causal LMs.
* :func:`mix_replay` - mix a fraction of general ("replay") data into the domain data, seeded.
* :func:`freeze_layers` - freeze the bottom fraction of a model's decoder layers (``requires_grad=False``).
"""

from __future__ import annotations

import math
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch


def text_windows(tokenizer, texts: Sequence[str], *, length: int, stride: Optional[int] = None,
                 max_windows: Optional[int] = None, add_bos: bool = True) -> torch.Tensor:
    """Token windows ``[N, length]`` (int64) cut from ``texts``.

    Each text is tokenised on its own (no special tokens; ``add_bos`` puts the tokenizer's BOS token, when it has
    one, in front of every window), and cut into windows of ``length`` tokens every ``stride`` tokens. A text shorter than a window gives one window padded on the right with ``-1``
    (:func:`batch_from_windows` turns it into attention mask and labels). ``stride`` counts text tokens (default:
    a window's text tokens, so windows tile the text with no gap or overlap). ``max_windows`` keeps the first ones.
    """
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"text_windows: length must be an int >= 2, got {length!r}")
    if isinstance(texts, str):
        raise TypeError("text_windows: texts must be a sequence of strings, got one str; wrap it in a list")
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    body = length - (bos is not None)
    stride = body if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"text_windows: stride must be an int >= 1, got {stride!r}")
    pad = _pad_id(tokenizer)
    rows: List[List[int]] = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        starts = range(0, max(1, len(ids) - body + 1), stride) if len(ids) > body else [0]
        for s in starts:
            chunk = ids[s:s + body]
            row = ([bos] if bos is not None else []) + chunk
            rows.append(row + [-1] * (length - len(row)))  # -1 marks padding until batches() sees it
            if max_windows is not None and len(rows) >= max_windows:
                break
        if max_windows is not None and len(rows) >= max_windows:
            break
    if not rows:
        raise ValueError("text_windows: the texts produced no tokens")
    out = torch.tensor(rows, dtype=torch.long)
    out.pad_token_id = pad  # type: ignore[attr-defined]
    return out


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def batch_from_windows(windows: torch.Tensor, pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """A Hugging Face causal-LM batch from windows whose padding is ``-1`` (as :func:`text_windows` makes):
    padded positions get ``attention_mask = 0`` and ``labels = -100``."""
    valid = windows >= 0
    ids = torch.where(valid, windows, torch.full_like(windows, pad_token_id))
    return {"input_ids": ids, "attention_mask": valid.long(), "labels": torch.where(valid, ids, -100)}


def batches(windows: torch.Tensor, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            pad_token_id: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """Iterate over ``windows`` in batches (seeded shuffle), as causal-LM batches (see :func:`batch_from_windows`)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batches: batch_size must be an int >= 1, got {batch_size!r}")
    pad = getattr(windows, "pad_token_id", 0) if pad_token_id is None else pad_token_id
    order = list(range(windows.shape[0]))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield batch_from_windows(windows[order[i:i + batch_size]], pad)


class _Mixed(torch.utils.data.Dataset):
    def __init__(self, domain, general, index):
        self.domain, self.general, self.index = domain, general, index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        src, j = self.index[i]
        return self.domain[j] if src == 0 else self.general[j]


def mix_replay(domain: Any, general: Any, *, ratio: float = 0.2, seed: int = 0, shuffle: bool = True):
    """Mix general data into domain data so that ``ratio`` of the result is general ("replay").

    ``ratio`` is the fraction of the MIXED set drawn from ``general`` (0.2: one general sample for every four
    domain ones, the seeds' 10-30% recipe); general samples are drawn without replacement while they last, then
    with replacement (seeded). Works with lists / tuples, tensors (rows), torch ``Dataset`` s and Hugging Face
    ``datasets.Dataset`` s; returns the same kind where it can (list for lists, a tensor for two tensors, a
    ``datasets.Dataset`` for two of them, else a torch ``Dataset``). ``shuffle`` interleaves the two sources.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= ratio < 1.0):
        raise ValueError(f"mix_replay: ratio must be a float in [0, 1) (the general fraction of the mix), got {ratio!r}")
    n_dom, n_gen = _length(domain, "domain"), _length(general, "general")
    if n_dom == 0:
        raise ValueError("mix_replay: domain is empty")
    n_rep = int(round(n_dom * ratio / (1.0 - ratio)))
    if n_rep and n_gen == 0:
        raise ValueError(f"mix_replay: ratio={ratio} needs general samples, but general is empty")
    rng = random.Random(seed)
    pool = list(range(n_gen))
    rng.shuffle(pool)
    picks = [pool[i] if i < n_gen else rng.randrange(n_gen) for i in range(n_rep)]
    index = [(0, j) for j in range(n_dom)] + [(1, j) for j in picks]
    if shuffle:
        rng.shuffle(index)
    if isinstance(domain, list) and isinstance(general, (list, tuple)):
        return [domain[j] if s == 0 else general[j] for s, j in index]
    if isinstance(domain, torch.Tensor) and isinstance(general, torch.Tensor):
        if domain.shape[1:] != general.shape[1:]:
            raise ValueError(f"mix_replay: domain rows {tuple(domain.shape[1:])} and general rows "
                             f"{tuple(general.shape[1:])} differ in shape")
        rows = [domain[j] if s == 0 else general[j] for s, j in index]
        return torch.stack(rows)
    if _is_hf_dataset(domain) and _is_hf_dataset(general):
        import datasets

        dom_idx = [j for s, j in index if s == 0]
        gen_idx = [j for s, j in index if s == 1]
        mixed = datasets.concatenate_datasets([domain.select(dom_idx), general.select(gen_idx)])
        return mixed.shuffle(seed=seed) if shuffle else mixed
    return _Mixed(domain, general, index)


def _is_hf_dataset(x) -> bool:
    return type(x).__module__.startswith("datasets") and hasattr(x, "select")


def _length(x, name: str) -> int:
    try:
        return len(x)
    except TypeError:
        raise TypeError(f"mix_replay: {name} must have a length (list, tensor, torch or HF Dataset), "
                        f"got {type(x).__name__}") from None


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a (PEFT-wrapped) HF causal LM (Llama ``model.layers``, GPT-2 ``h``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "layers", "h"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"decoder_layers: cannot find the transformer blocks of {type(base).__name__} "
                     f"(looked for model.layers, transformer.h, ...)")


def freeze_layers(model: torch.nn.Module, fraction: float = 0.5) -> List[str]:
    """Freeze the bottom ``fraction`` of the decoder layers (all their parameters, LoRA factors included) and the
    input embeddings when any layer is frozen; returns the names of the parameters frozen (so they can be
    unfrozen). ``fraction=0.5`` of a 30-layer model freezes layers 0-14."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (0.0 <= fraction <= 1.0):
        raise ValueError(f"freeze_layers: fraction must be a float in [0, 1], got {fraction!r}")
    layers = decoder_layers(model)
    k = int(math.floor(fraction * len(layers) + 1e-9))
    frozen_ids = set()
    for layer in list(layers)[:k]:
        frozen_ids.update(id(p) for p in layer.parameters())
    if k:
        emb = model.get_input_embeddings()
        frozen_ids.update(id(p) for p in emb.parameters())
    names = []
    for n, p in model.named_parameters():
        if id(p) in frozen_ids and p.requires_grad:
            p.requires_grad_(False)
            names.append(n)
    return names
