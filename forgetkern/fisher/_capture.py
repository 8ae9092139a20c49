"""Which parameters take the fused per-sample path, and the hooks that feed it.

A parameter is *fused* when it is the weight (or bias) of a ``torch.nn.Linear`` (LoRA ``lora_A`` / ``lora_B``
included) or of a Hugging Face ``Conv1D``, is used by that module only (no weight tying) and the module runs
once per forward. The forward hook keeps the module's input ``x``; a hook on the output tensor receives
``g = dL/dy`` during the backward and calls :func:`forgetkern.ops.linear_persample_sq_grad.linear_persample_sq_grad_`
right away, so no per-sample gradient and no ``g`` outlives the layer's backward.

A LoRA layer patched by :func:`forgetkern.patch` runs the fused op, not its ``lora_A`` / ``lora_B`` modules:
its adapters' factors are served by a :class:`forgetkern.LoraFisher` sink handed to the op's backward
(:class:`LoraTap`), which reuses the forward's rank-r product ``x A^T``. Hooking the inner modules instead
would send every call back to PEFT's forward.

A layer counts its gradients per backward, not its forward calls: with gradient checkpointing a layer runs
twice (the first forward without a graph, or with one that the backward never reaches) and receives one
gradient, which is fine; a layer that truly contributes twice to one loss (weight sharing) is refused at
``granularity="sample"``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch

from forgetkern.ops.linear_persample_sq_grad import bias_persample_sq_grad_, linear_persample_sq_grad_

_STATE_ATTR = "_forgetkern_state"  # forgetkern.patching.lora.STATE_ATTR: marks a patched PEFT lora.Linear


@dataclasses.dataclass
class FusedLayer:
    name: str
    module: torch.nn.Module
    transposed: bool              # Conv1D: weight is [in, out], y = x W + b
    weight: Optional[str]         # parameter names handled here (None: not requested)
    bias: Optional[str]
    grads: int = 0                # output gradients received in the current backward


@dataclasses.dataclass
class LoraTap:
    """One adapter of a patched LoRA layer: its factors' Fisher comes from the fused op's backward."""
    name: str
    module: torch.nn.Module       # the patched PEFT lora.Linear
    adapter: str
    lora_a: Optional[str]         # parameter names (None: not requested)
    lora_b: Optional[str]
    lora_bias: Optional[str]
    sink: object = None           # forgetkern.LoraFisher while attached


def _kind(module: torch.nn.Module) -> Optional[bool]:
    """False for Linear, True for HF Conv1D, None otherwise."""
    if isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward:
        return False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return True
    return None


def plan(model: torch.nn.Module, chosen: Dict[str, torch.nn.Parameter]) -> Tuple[List[FusedLayer], List[str]]:
    """``(fused layers, names of the chosen parameters without a fused path)``."""
    uses: Counter = Counter()
    for _, mod in model.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False):
            uses[id(p)] += 1
    name_of = {id(p): n for n, p in chosen.items()}
    layers, covered, tapped = [], set(), set()

    def own(p) -> Optional[str]:
        ok = isinstance(p, torch.Tensor) and id(p) in name_of and uses[id(p)] == 1
        return name_of[id(p)] if ok else None

    for mname, mod in model.named_modules():
        if _STATE_ATTR not in mod.__dict__:
            continue
        base = mod.base_layer
        if own(getattr(base, "weight", None)) or own(getattr(base, "bias", None)):
            continue  # the fused op never computes the base weight's gradient: hooks below, PEFT's path
        for ad in sorted(set(mod.lora_A.keys()) & set(mod.lora_B.keys())):
            a, b = mod.lora_A[ad], mod.lora_B[ad]
            names = (own(a.weight), own(b.weight), own(b.bias))
            if any(names):
                layers.append(LoraTap(f"{mname}[{ad}]", mod, ad, *names))
                covered.update(n for n in names if n)
                tapped.update((id(a), id(b)))
    for mname, mod in model.named_modules():
        if id(mod) in tapped:
            continue
        kind = _kind(mod)
        if kind is None:
            continue
        names = [own(getattr(mod, "weight", None)), own(getattr(mod, "bias", None))]
        if names[0] or names[1]:
            layers.append(FusedLayer(mname, mod, kind, names[0], names[1]))
            covered.update(n for n in names if n)
    return layers, [n for n in chosen if n not in covered]


class Capture:
    """Forward/tensor hooks computing the per-sample (or per-token) Fisher of the fused layers."""

    def __init__(self, model: torch.nn.Module, layers: List[FusedLayer], sums: Dict[str, torch.Tensor],
                 flags: Dict[str, torch.Tensor], token_level: bool):
        self.model, self.layers, self.sums, self.flags = model, layers, sums, flags
        self.token_level = token_level
        self._active = False
        self.n = 0
        self.mask: Optional[torch.Tensor] = None
        self.outputs: List[torch.Tensor] = []
        self.sink: Optional[torch.Tensor] = None
        self._handles: list = []

    # ---- lifetime ------------------------------------------------------------------------------------------
    def attach(self) -> None:
        from forgetkern.ops.lora_linear import LoraFisher

        for layer in self.layers:
            if isinstance(layer, LoraTap):
                names = (layer.lora_a, layer.lora_b, layer.lora_bias)
                a, b, bias = (None if n is None else self.sums[n] for n in names)
                layer.sink = LoraFisher(a, b, bias, granularity="token" if self.token_level else "sample")
                layer.sink.active = False
                layer.module.__dict__[_STATE_ATTR].fisher[layer.adapter] = layer.sink
                self._handles.append(layer.module.register_forward_hook(self._output_hook))
                continue
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
        emb = None
        if hasattr(self.model, "get_input_embeddings"):
            try:
                emb = self.model.get_input_embeddings()
            except (NotImplementedError, AttributeError):
                emb = None
        if isinstance(emb, torch.nn.Module):
            self._handles.append(emb.register_forward_hook(self._sink_hook))
        self.has_sink = isinstance(emb, torch.nn.Module)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for layer in self.layers:
            if isinstance(layer, LoraTap) and layer.sink is not None:
                state = layer.module.__dict__.get(_STATE_ATTR)
                if state is not None and state.fisher.get(layer.adapter) is layer.sink:
                    del state.fisher[layer.adapter]
                layer.sink = None
        self.outputs.clear()
        self.sink = None

    def new_batch(self, n: int, mask: Optional[torch.Tensor]) -> None:
        self.n, self.mask = n, None if mask is None else mask.to(torch.bool)
        self.outputs.clear()
        self.sink = None

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, on: bool) -> None:
        """On: a backward of the summed per-sample losses starts (count gradients afresh, hand the sinks this
        batch's sample count and mask). Off: it ended (collect the sinks' non-finite flags)."""
        self._active = bool(on)
        for layer in self.layers:
            if isinstance(layer, LoraTap):
                sink = layer.sink
                sink.active, sink.grads = self._active, 0
                sink.samples, sink.mask = self.n, self.mask
                if not on and sink.found is not None:
                    for n in (layer.lora_a, layer.lora_b, layer.lora_bias):
                        if n:
                            self._flag(n, sink.found)
                    sink.found = None
            else:
                layer.grads = 0

    def grad_targets(self) -> List[torch.Tensor]:
        """Tensors to differentiate the loss against so that every fused output receives its gradient but no
        weight gradient is computed: a zero scalar added to the input embeddings (cheap), else the outputs."""
        if self.sink is not None:
            return [self.sink]
        if not self.outputs:
            raise RuntimeError("FisherEstimator: no fused layer output requires grad and the model has no input "
                               "embedding to attach to; no gradient reaches the chosen parameters")
        return list(self.outputs)

    # ---- hooks -------------------------------------------------------------------------------------------------
    def _sink_hook(self, module, args, out):
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        self.sink = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
        return out + self.sink

    def _output_hook(self, module, args, out):
        if self.sink is None and isinstance(out, torch.Tensor) and out.requires_grad:
            self.outputs.append(out)
        return None

    def _forward_hook(self, layer: FusedLayer):
        def hook(module, args, out):
            if not (isinstance(out, torch.Tensor) and out.requires_grad) or not args:
                return None
            x = args[0].detach()
            if self.sink is None:
                self.outputs.append(out)
            out.register_hook(lambda g: self._on_grad(layer, x, g))
            return None

        return hook

    def _on_grad(self, layer: FusedLayer, x: torch.Tensor, g: torch.Tensor) -> None:
        if not self.active:
            return
        layer.grads += 1
        if layer.grads > 1 and not self.token_level:
            raise RuntimeError(f"FisherEstimator: module {layer.name!r} received {layer.grads} output gradients "
                               f"in one backward (it ran several times, e.g. weight sharing); its per-sample "
                               f"gradient is a sum over the calls, which the fused path does not combine: use "
                               f"granularity='token' or exclude it")
        x3, g3, mask = self._shape(layer, x, g)
        if x3.dtype != g3.dtype:
            x3, g3 = x3.float(), g3.float()
        gran = "token" if self.token_level else "sample"
        if layer.weight is not None:
            a, b = (g3, x3) if layer.transposed else (x3, g3)
            found = linear_persample_sq_grad_(self.sums[layer.weight], a, b, mask=mask, granularity=gran)
            self._flag(layer.weight, found)
        if layer.bias is not None:
            found = bias_persample_sq_grad_(self.sums[layer.bias], g3, mask=mask, granularity=gran)
            self._flag(layer.bias, found)

    def _shape(self, layer: FusedLayer, x: torch.Tensor, g: torch.Tensor):
        n = self.n
        if x.dim() >= 2 and x.shape[0] == n and g.shape[0] == n:
            x3, g3 = x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])
        elif self.token_level:  # tokens were flattened (or regrouped): each row counts on its own
            return x.reshape(-1, 1, x.shape[-1]), g.reshape(-1, 1, g.shape[-1]), None
        else:
            raise RuntimeError(f"FisherEstimator: module {layer.name!r} got an input of shape {tuple(x.shape)} "
                               f"whose first dimension is not the batch size {n}; per-sample attribution is "
                               f"impossible (use granularity='token')")
        mask = self.mask if self.mask is not None and tuple(self.mask.shape) == tuple(x3.shape[:2]) else None
        return x3, g3, mask

    def _flag(self, name: str, found: torch.Tensor) -> None:
        prev = self.flags.get(name)
        self.flags[name] = found if prev is None else torch.maximum(prev, found)
