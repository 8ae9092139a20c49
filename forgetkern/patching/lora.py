"""The per-layer part of :func:`forgetkern.patch`: a replacement ``forward`` for PEFT's ``lora.Linear``.

The replacement mirrors ``peft.tuners.lora.layer.Linear.forward`` (PEFT 0.21) and reads, at every call,
everything that forward reads: the active adapters (several are summed), ``scaling[name]`` (so ``set_scale``,
``scale_layer`` and ``unscale_layer`` keep working), each adapter's dropout module (``nn.Dropout`` p and its
train/eval mode, ``nn.Identity`` = no dropout), the base bias and ``lora_bias`` (``lora_B.bias``, scaled with the
adapter like PEFT does), the base layer's weight layout (``nn.Linear`` ``[out, in]`` or GPT-2 ``Conv1D``
``[in, out]``, i.e. ``fan_in_fan_out``), PEFT's input dtype cast and autocast.

Whatever it cannot compute exactly the same way is handed to PEFT's own forward for that call (the reason is
counted in :meth:`forgetkern.PatchReport.call_stats`): disabled adapters, merged weights, ``adapter_names=``
mixed batches and any other forward argument, LoRA variants (DoRA, ...), dtype combinations the fused op does
not take, forward hooks on the inner modules, a trainable base weight.
"""

from __future__ import annotations

import collections
from typing import Optional

import torch
from torch import nn

# Instance attributes that patching sets on a lora.Linear; unpatch restores each exactly (or deletes it).
PATCHED_ATTRS = ("forward", "extra_repr")
STATE_ATTR = "_forgetkern_state"


def _ops():
    from forgetkern.ops import lora_linear as ops  # imported at call time: the op module is optional here

    return ops


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers not installed: no Conv1D layers can exist
        return None
    return Conv1D


def _peft_lora_linear():
    from peft.tuners.lora.layer import Linear

    return Linear


def _module_hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__)


def _global_hooks() -> bool:
    g = torch.nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def _adapter_names(module) -> list:
    names = set(module.lora_A.keys()) | set(module.lora_B.keys())
    return sorted(names)


# peft.tuners.lora.<name> modules whose LoRA layers wrap a quantized base (bitsandbytes 4/8-bit, GPTQ, ...)
_QUANTIZED_MODULES = {"bnb", "gptq", "awq", "aqlm", "hqq", "eetq", "torchao", "inc"}


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` (a PEFT LoRA layer) stays on PEFT's path, or ``None`` when it can be patched."""
    Linear = _peft_lora_linear()
    cls = type(module)
    if cls is not Linear:
        qual = f"{cls.__module__}.{cls.__qualname__}"
        if cls.__module__.rsplit(".", 1)[-1] in _QUANTIZED_MODULES:
            return f"quantized base layer ({qual}): not supported (the fused op needs a dense float weight)"
        if isinstance(module, Linear):
            return f"{qual} subclasses lora.Linear with its own forward; not supported"
        return f"LoRA layer type {qual} (embedding/conv/other) is not supported"
    base = module.base_layer
    Conv1D = _conv1d_type()
    if type(base) is not nn.Linear and (Conv1D is None or type(base) is not Conv1D):
        return (f"base layer type {type(base).__module__}.{type(base).__qualname__} is not nn.Linear or "
                f"Conv1D (quantized or wrapped bases are not supported)")
    if getattr(base, "weight", None) is None or base.weight.dim() != 2:
        return "base layer has no 2-D weight"
    if "forward" in module.__dict__ or hasattr(module, "_hf_hook") or _module_hooked(base):
        return ("its forward or its base layer is wrapped or hooked by another library (e.g. accelerate "
                "offloading); left on PEFT's path so the hooks run")
    names = _adapter_names(module)
    variants = [n for n in names if n in module.lora_variant]
    if variants:
        kinds = sorted({type(module.lora_variant[n]).__name__ for n in variants})
        return f"LoRA variant(s) {', '.join(kinds)} on adapter(s) {', '.join(variants)} (e.g. DoRA); not supported"
    if any(module.use_dora.get(n, False) for n in names) or len(module.lora_magnitude_vector) > 0:
        return "DoRA (use_dora / lora_magnitude_vector) is not supported"
    for n in names:
        a, b = module.lora_A[n], module.lora_B[n]
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None:
            return f"adapter {n!r}: lora_A/lora_B are not plain nn.Linear layers (lora_A without bias)"
        d = module.lora_dropout[n]
        if type(d) not in (nn.Dropout, nn.Identity):
            return f"adapter {n!r}: dropout module {type(d).__name__} is not nn.Dropout or nn.Identity"
    return None


class LayerState:
    """What patching keeps on one lora.Linear (stored as ``module._forgetkern_state``)."""

    def __init__(self, name: str, backend: str, originals: dict):
        self.name = name
        self.backend = backend
        self.originals = originals  # attr -> value it had in the instance __dict__ (absent: none)
        self.group = None  # SiblingGroup or None
        self.calls: collections.Counter = collections.Counter()
        self.fisher: dict = {}  # adapter name -> LoraFisher sink (set by FisherEstimator while it estimates)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # device type without autocast support
        return None
    return None


def _ac_cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    # autocast's rule for ops on its lower-precision list: eligible floating tensors (not float64) go to dtype
    if t is None or dtype is None or t.dtype == dtype or t.dtype == torch.float64 or not t.is_floating_point():
        return t
    return t.to(dtype)


def _mixed_ok(module, x) -> bool:
    with _backend_ctx(module._forgetkern_state.backend):
        return _ops().mixed_supported(x)


def plan_call(module, x, args, kwargs):
    """``(reason, plan)``: why this call goes to PEFT's forward (``plan`` None), or the fused op's arguments.

    ``plan = (x, weight, bias, adapters, training, autocast_dtype)`` with every tensor in the dtype the op
    computes in, exactly the values PEFT's forward would use for this call.
    """
    if args or kwargs:
        return ("forward arguments besides x (adapter_names= mixed batch or other)", None)
    if module.disable_adapters:
        return ("adapters disabled", None)
    if module.merged:
        return ("adapter weights merged", None)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.numel() == 0:
        return ("input is not a non-empty floating tensor", None)
    lora_a, lora_b, dropouts = module.lora_A, module.lora_B, module.lora_dropout
    active = [n for n in module.active_adapters if n in lora_a]
    if not active:
        return ("no active adapter on this layer", None)
    if any(n in module.lora_variant for n in active):
        return ("LoRA variant adapter active (e.g. DoRA)", None)
    base = module.base_layer
    if type(base) is nn.Linear:
        weight = base.weight
    else:
        Conv1D = _conv1d_type()
        if Conv1D is None or type(base) is not Conv1D:
            return ("base layer type changed", None)
        weight = base.weight.t()  # Conv1D stores [in, out]: a transposed view, no copy
    bias = base.bias
    if _global_hooks() or _module_hooked(base):
        return ("forward hooks on the base layer or global module hooks", None)
    if weight.requires_grad and torch.is_grad_enabled():
        return ("base weight is trainable (the fused op keeps W frozen)", None)
    if x.shape[-1] != weight.shape[1]:
        return ("input size does not match the layer (PEFT raises the usual error)", None)
    device = x.device
    if weight.device != device:
        return ("input and base weight on different devices", None)
    ac = _autocast_dtype(device.type)
    ops = _ops()
    sinks = module._forgetkern_state.fisher
    adapters = []
    training = False
    for n in active:
        a, b, d = lora_a[n], lora_b[n], dropouts[n]
        if _module_hooked(a) or _module_hooked(b) or _module_hooked(d):
            return ("forward hooks on lora_A/lora_B/dropout", None)
        if type(d) is nn.Identity:
            p = 0.0
        elif type(d) is nn.Dropout:
            p = float(d.p) if d.training else 0.0
        else:
            return ("dropout module is not nn.Dropout or nn.Identity", None)
        wa, wb, bb = a.weight, b.weight, b.bias
        # PEFT: x = self._cast_input_dtype(x, lora_A.weight.dtype) before the adapter path. float32 adapters on a
        # 16-bit layer (PEFT's autocast_adapter_dtype default) run fused where the op supports it (CPU, eager)
        if ac is None and wa.dtype != x.dtype and not (wa.dtype == torch.float32 and _mixed_ok(module, x)):
            return (f"mixed dtypes: input {str(x.dtype)[6:]}, adapter {str(wa.dtype)[6:]}", None)
        if p > 0.0:
            training = True
        fisher = sinks.get(n)
        adapters.append(ops.LoraAdapter(_ac_cast(wa, ac), _ac_cast(wb, ac), float(module.scaling[n]), p,
                                        _ac_cast(bb, ac), fisher))
    x_c, w_c, b_c = _ac_cast(x, ac), _ac_cast(weight, ac), _ac_cast(bias, ac)
    dt = x_c.dtype
    if w_c.dtype != dt or (b_c is not None and b_c.dtype != dt):
        return (f"mixed dtypes: input {str(x.dtype)[6:]}, base weight {str(weight.dtype)[6:]}", None)
    adt = adapters[0].lora_a.dtype
    if adt != dt and not (adt == torch.float32 and dt in (torch.float16, torch.bfloat16)):
        return (f"mixed dtypes: input {str(x.dtype)[6:]}, adapter {str(adt)[6:]}", None)
    for ad in adapters:
        if (ad.lora_a.dtype != adt or ad.lora_b.dtype != adt
                or (ad.lora_bias is not None and ad.lora_bias.dtype != adt)):
            return (f"mixed dtypes: adapters in {str(ad.lora_a.dtype)[6:]} and {str(adt)[6:]}", None)
        if ad.lora_a.device != device or ad.lora_b.device != device:
            return ("adapter weights on another device than the input", None)
    return (None, (x_c, w_c, b_c, adapters, training, ac))


def run_op(state: LayerState, plan):
    x, w, b, adapters, training, ac = plan
    ops = _ops()
    with _backend_ctx(state.backend), _no_autocast(ac, x.device.type):
        return ops.lora_linear_planned(x, [w], [b], [adapters], training=training)[0]


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _Null()


def _backend_ctx(backend: str):
    if backend == "auto":
        return _NULL
    from forgetkern._backend import use_backend

    return use_backend(backend, op="lora_linear")


def _no_autocast(ac, device_type: str):
    # the inputs are already cast the way autocast would; the op itself then runs with autocast off
    return _NULL if ac is None else torch.autocast(device_type, enabled=False)


def _original_forward(module):
    orig = module._forgetkern_state.originals.get("forward")
    if orig is None:
        return type(module).forward.__get__(module, type(module))
    return orig


# PEFT-path calls in which no adapter contributes (so no LoRA gradient exists to be missed)
_NO_LORA_GRADIENT = ("adapters disabled", "adapter weights merged", "no active adapter on this layer")


def _count(state: LayerState, kind: str) -> None:
    # Not inside torch.compile: Dynamo would trace the increment and guard on the counter's value, so the model
    # would compile again on every call (and fall back to eager once the recompile limit is hit). The calls a
    # compiled graph makes are therefore not counted.
    if not torch.compiler.is_compiling():
        state.calls[kind] += 1


def patched_forward(self, x, *args, **kwargs):
    """forgetkern's forward for a PEFT lora.Linear (falls back to PEFT's forward where it must)."""
    state: LayerState = self._forgetkern_state
    reason, plan = plan_call(self, x, args, kwargs)
    if reason is not None:
        if state.fisher and reason not in _NO_LORA_GRADIENT:
            raise RuntimeError(f"forgetkern: a Fisher estimation hooks the fused LoRA backward of {state.name!r}, "
                               f"but this call has to run on PEFT's forward ({reason}), where the per-sample "
                               f"Fisher would be missed; call forgetkern.unpatch(model) before estimating")
        _count(state, "PEFT: " + reason)
        return _original_forward(self)(x, *args, **kwargs)
    group = state.group
    if group is not None and group.enabled and not plan[4]:
        out = group.forward(self, x, plan)
        if out is not None:
            _count(state, "fused (siblings)")
            return out
    _count(state, "fused")
    return run_op(state, plan)


def patched_extra_repr(self) -> str:
    state: LayerState = self._forgetkern_state
    orig = state.originals.get("extra_repr")
    base = (type(self).extra_repr(self) if orig is None else orig()) or ""
    tag = f"forgetkern=patched({state.backend}"
    if state.group is not None and state.group.enabled:
        tag += ", siblings=" + "+".join(state.group.short_names)
    tag += ")"
    return f"{base}, {tag}" if base else tag


_FUNCS = {"forward": patched_forward, "extra_repr": patched_extra_repr}


class Bound:
    """``module.forward`` / ``module.extra_repr`` while patched: calls the patched function on ``module``.

    Unlike a bound method it pickles and deep-copies together with its module (``torch.save(model)``,
    ``copy.deepcopy(model)`` give a patched copy that runs on its own weights).
    """

    __slots__ = ("module", "attr")

    def __init__(self, module: nn.Module, attr: str):
        self.module, self.attr = module, attr

    def __call__(self, *args, **kwargs):
        return _FUNCS[self.attr](self.module, *args, **kwargs)

    def __reduce__(self):
        return (Bound, (self.module, self.attr))


def patch_layer(module: nn.Module, name: str, backend: str) -> LayerState:
    originals = {a: module.__dict__[a] for a in PATCHED_ATTRS if a in module.__dict__}
    state = LayerState(name, backend, originals)
    module.__dict__[STATE_ATTR] = state
    for attr in PATCHED_ATTRS:
        module.__dict__[attr] = Bound(module, attr)
    return state


def unpatch_layer(module: nn.Module) -> None:
    state: LayerState = module.__dict__.pop(STATE_ATTR)
    for attr in PATCHED_ATTRS:
        if attr in state.originals:
            module.__dict__[attr] = state.originals[attr]
        else:
            module.__dict__.pop(attr, None)
