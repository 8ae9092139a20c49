"""Merging of PEFT LoRA adapters in weight space, tile by tile (see :func:`merge_lora`)."""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from forgetkern.merge.core import merge_kwargs, tensor_id
from forgetkern.ops.merge_task_vectors import merge_task_vectors, resolve_method
from forgetkern.reference import merge_task_vectors as ref

_DIGIT = 16


def kth_largest_abs(tiles: Callable[[], Iterator[torch.Tensor]], k: int, dtype: torch.dtype) -> torch.Tensor:
    """The exact ``k``-th largest ``|v|`` (1 <= k <= numel) over the values that ``tiles()`` yields (in
    ``dtype``, float32 or float64), without holding them all: a radix selection on the bits of ``|v|``
    (non-negative IEEE floats order like their bit patterns as integers), 16 bits per pass, so ``tiles()``
    is called 2 (float32) or 4 (float64) times. Equal to ``torch.kthvalue(|v|, numel - k + 1)``."""
    itype, bits = (torch.int32, 32) if dtype == torch.float32 else (torch.int64, 64)
    prefix, remaining = 0, int(k)
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        hist = None
        top = shift + _DIGIT
        for tile in tiles():
            a = tile.to(dtype).abs().view(itype).reshape(-1)
            if top < bits:
                a = a[(a >> top) == (prefix >> top)]
            d = ((a >> shift) & 0xFFFF).to(torch.int64)
            h = torch.bincount(d, minlength=1 << _DIGIT)
            hist = h if hist is None else hist + h
        cum = hist.flip(0).cumsum(0)
        idx = int(torch.searchsorted(cum, torch.tensor([remaining], dtype=cum.dtype, device=cum.device)))
        bucket = (1 << _DIGIT) - 1 - idx
        remaining -= int(cum[idx]) - int(hist[bucket])
        prefix |= bucket << shift
    return torch.tensor([prefix], dtype=itype).view(dtype)[0]


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [(name, m) for name, m in base.named_modules() if isinstance(m, LoraLayer)]


class _Delta:
    """Row tiles of ``dW = s B A`` of one adapter in the layout of the base weight (``(B A)^T`` for
    ``fan_in_fan_out``), in compute type ``c``."""

    def __init__(self, layer, adapter: str, c: torch.dtype):
        self.a = layer.lora_A[adapter].weight.detach().to(c)
        self.b = layer.lora_B[adapter].weight.detach().to(c)
        self.s = float(layer.scaling[adapter])
        self.t = bool(getattr(layer, "fan_in_fan_out", False))

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        if self.t:
            return (self.a[:, r0:r1].t() @ self.b.t()) * self.s
        return (self.b[r0:r1] @ self.a) * self.s


def merge_lora(peft_model, adapters: Sequence[str], *, method: str = "task_arithmetic",
               weights: Optional[Sequence[float]] = None, density: Optional[float] = None,
               p: Optional[float] = None, lam: float = 1.0, seed: int = 0, sign: str = "total",
               sign_weighted: bool = False, normalize: Optional[str] = "default", rescale: bool = True,
               output: str = "delta", tile_rows: Optional[int] = None,
               apply_to_base: bool = False) -> Dict[str, torch.Tensor]:
    """Merge LoRA adapters of a PEFT model in weight space: per adapted layer, the task vectors are the
    adapters' updates ``dW_k = s_k B_k A_k`` (``(B A)^T`` for GPT-2's ``fan_in_fan_out``), combined by
    ``method`` exactly as :func:`forgetkern.merge_models` combines ``ft_k - base``.

    ``dW_k`` is formed in row tiles of ``tile_rows`` rows (default: about 2^20 elements per tile) and never
    whole: TIES / magnitude-prune thresholds (the exact top-``density`` magnitude per layer and adapter) come
    from a radix selection over the tiles (:func:`kth_largest_abs`), then each tile of the N updates is merged
    by the fused op into the one output tensor of the layer. The DARE mask is keyed by the layer's weight name
    (``<module>.weight`` in the base model) and the element's flat index, so the result equals
    ``merge_models`` on the dense updates with the same seed.

    ``output``: ``"delta"`` (the merged update, float32; ``lam`` included) or ``"weight"`` (base weight plus the
    merged update, in the weight's dtype). ``apply_to_base=True`` (with ``output="weight"``) also writes the
    merged weights into the base layers; then remove the adapters (``peft_model.unload()``) to use the merged
    model. Adapters absent from a layer are skipped there (as PEFT's ``add_weighted_adapter`` does). Returns
    ``{"<module>.weight": tensor}`` for every layer that holds at least one of the adapters.
    """
    where = "merge_lora"
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise TypeError(f"forgetkern.{where}: adapters must be a non-empty list of adapter names, got {adapters!r}")
    if output not in ("delta", "weight"):
        raise ValueError(f"forgetkern.{where}: output must be 'delta' or 'weight', got {output!r}")
    if apply_to_base and output != "weight":
        raise ValueError(f"forgetkern.{where}: apply_to_base=True needs output='weight'")
    if tile_rows is not None and (not isinstance(tile_rows, int) or isinstance(tile_rows, bool) or tile_rows < 1):
        raise ValueError(f"forgetkern.{where}: tile_rows must be a positive int, got {tile_rows!r}")
    kw = merge_kwargs(where, method, len(adapters), weights, density, p, lam, seed, sign, sign_weighted, normalize,
                      rescale)
    prune, _, dens = resolve_method(method, density=density, p=p, where=where)
    w_all = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    layers = _lora_layers(peft_model)
    known = set()
    for _, m in layers:
        known.update(m.lora_A.keys())
    for a in adapters:
        if a not in known:
            raise ValueError(f"forgetkern.{where}: adapter {a!r} is not in the model (adapters: {sorted(known)})")
    out: Dict[str, torch.Tensor] = {}
    for name, layer in layers:
        present = [k for k, a in enumerate(adapters) if a in layer.lora_A]
        if not present:
            continue
        if any(a in getattr(layer, "lora_embedding_A", {}) for a in adapters):
            raise NotImplementedError(f"forgetkern.{where}: layer {name!r} is a LoRA embedding; only linear LoRA "
                                      f"layers are merged")
        weight = layer.get_base_layer().weight
        c = torch.float64 if any(layer.lora_A[adapters[k]].weight.dtype == torch.float64 for k in present) \
            else torch.float32
        deltas = [_Delta(layer, adapters[k], c) for k in present]
        rows, cols = weight.shape
        step = tile_rows or max(1, (1 << 20) // max(cols, 1))
        key = f"{name}.weight"
        tid = tensor_id(key)
        thresholds = None
        if prune == ref.PRUNE_MAGNITUDE:
            numel = rows * cols
            kk = numel if dens >= 1 else int(dens * numel)
            thr = []
            for d in deltas:
                if kk >= numel:
                    thr.append(torch.zeros((), dtype=c))
                elif kk == 0:
                    thr.append(torch.full((), float("inf"), dtype=c))
                else:
                    thr.append(kth_largest_abs(lambda d=d: (d.rows(r, min(r + step, rows))
                                                            for r in range(0, rows, step)), kk, c))
            thresholds = torch.stack(thr).to(weight.device)
        lkw = dict(kw, weights=[w_all[k] for k in present])
        dst = torch.empty((rows, cols), dtype=c if output == "delta" else weight.dtype, device=weight.device)
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            tiles = [[d.rows(r0, r1)] for d in deltas]
            base = torch.zeros((r1 - r0, cols), dtype=c, device=weight.device) if output == "delta" \
                else weight.detach()[r0:r1]
            (merged,) = merge_task_vectors([base], tiles, thresholds=thresholds, tensor_ids=[tid],
                                           offsets=[r0 * cols], **lkw)
            dst[r0:r1] = merged
            del tiles, merged
        if apply_to_base:
            with torch.no_grad():
                weight.copy_(dst)
        out[key] = dst
    return out
