"""``forgetkern.patch(model)`` / ``forgetkern.unpatch(model)``: run PEFT LoRA layers on forgetkern's fused op.

>>> model = peft.get_peft_model(base, peft.LoraConfig(r=16, target_modules="all-linear"))
>>> report = forgetkern.patch(model)       # PeftModel, LoraModel, or any module holding PEFT LoRA layers
>>> print(report)                          # what was patched, what stays on PEFT's path and why
>>> ...train...
>>> forgetkern.unpatch(model)              # PEFT's own forward again, bit for bit

Patching replaces the bound ``forward`` (and ``extra_repr``, so ``print(model)`` shows
``forgetkern=patched(<backend>)``) of each supported ``peft.tuners.lora.layer.Linear`` with instance attributes;
the model's parameters, buffers and state dict are untouched. See :mod:`forgetkern.patching.lora` for what is
mirrored from PEFT's forward and what is handed back to it.
"""

from __future__ import annotations

from torch import nn

from forgetkern import _backend
from forgetkern.patching import lora, siblings
from forgetkern.patching.report import PatchReport

__all__ = ["patch", "unpatch", "is_patched", "PatchReport"]


def _lora_layer_type():
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError as e:
        raise ImportError("forgetkern.patch needs peft (pip install peft)") from e
    return LoraLayer


def _check_op_available() -> None:
    try:
        ops = lora._ops()
        ops.lora_linear_planned, ops.LoraAdapter  # noqa: B018
    except (ImportError, AttributeError) as e:
        raise ImportError(f"forgetkern.patch: the fused LoRA op (forgetkern.ops.lora_linear) is unavailable: "
                          f"{e}") from e


def patch(model: nn.Module, *, backend: str = "auto", fuse_siblings: bool = True) -> PatchReport:
    """Run the PEFT LoRA linear layers of ``model`` on forgetkern's fused LoRA op.

    ``backend``: ``"auto"`` or a concrete backend (``"torch"``, ``"cpp"``, ``"cuda"``, ``"triton"``) used for
    every call of the op from these layers. ``fuse_siblings``: compute sibling layers that read one input
    (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``) in one fused call when dropout is inactive.

    Layers forgetkern cannot run exactly like PEFT (DoRA and other LoRA variants, quantized bases, embedding
    and conv LoRA, ...) stay on PEFT's path and are listed in ``report.skipped`` with the reason. Patching an
    already patched layer is a no-op. Raises ``ValueError`` when ``model`` holds no PEFT LoRA layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"forgetkern.patch: model must be a torch.nn.Module (a PeftModel, a LoraModel or a "
                        f"module holding PEFT LoRA layers), got {type(model).__name__}")
    backend = _backend._check_name(backend, "forgetkern.patch: backend")
    if not isinstance(fuse_siblings, bool):
        raise TypeError(f"forgetkern.patch: fuse_siblings must be a bool, got {type(fuse_siblings).__name__}")
    LoraLayer = _lora_layer_type()
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError(f"forgetkern.patch: {type(model).__name__} holds no PEFT LoRA layer "
                         f"(peft.tuners.lora.LoraLayer); wrap the model first, e.g. "
                         f"peft.get_peft_model(model, peft.LoraConfig(...))")
    report = PatchReport(backend=backend)
    todo = []
    for name, m in layers:
        if lora.STATE_ATTR in m.__dict__:
            report.already_patched.append(name)
            report._states.append(m._forgetkern_state)
            continue
        reason = lora.unsupported_reason(m)
        if reason is not None:
            report.skipped[name] = reason
        else:
            todo.append((name, m))
    if todo:
        _check_op_available()
        # load the extensions and fill the backend cache now: under torch.compile the first forward would
        # otherwise trace the loader (a lock: a graph break in every patched layer)
        _backend.availability(todo[0][1].base_layer.weight.device.type, "lora_linear")
        if backend != "auto":  # an explicit backend that cannot run the op here fails now, not mid-training
            device = todo[0][1].base_layer.weight.device
            with _backend.use_backend(backend, op="lora_linear"):
                _backend.resolve("lora_linear", device)
    for name, m in todo:
        report._states.append(lora.patch_layer(m, name, backend))
        report.patched.append(name)
    if fuse_siblings:
        for parent, pname, members in siblings.find_groups(model):
            group = siblings.SiblingGroup(parent, pname, members)
            for _, m in members:
                m._forgetkern_state.group = group
    seen = set()
    for st in report._states:
        g = st.group
        if g is not None and id(g) not in seen:
            seen.add(id(g))
            report._groups.append(g)
            report.fused_groups.append(g.names)
    return report


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` (or any module inside it) runs on forgetkern's patched forward."""
    return any(lora.STATE_ATTR in m.__dict__ for m in module.modules())


def unpatch(model: nn.Module) -> int:
    """Undo :func:`patch`: every patched layer gets its original instance attributes back (PEFT's forward),
    sibling hooks are removed. Returns the number of layers restored (0 if nothing was patched)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"forgetkern.unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    n = 0
    groups = {}
    for m in model.modules():
        st = m.__dict__.get(lora.STATE_ATTR)
        if st is None:
            continue
        if st.group is not None:
            groups[id(st.group)] = st.group
        lora.unpatch_layer(m)
        n += 1
    for g in groups.values():
        g.remove()
    return n
