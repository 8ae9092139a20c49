"""Horizontal fusion of sibling LoRA layers that read the same input (q/k/v, gate/up).

A parent such as ``LlamaAttention`` calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` one after another with
the same tensor ``h``. The first sibling called computes the outputs of all of them with one
``lora_linear_siblings`` call (one pass over ``h``) and keeps the others' outputs, keyed on the identity and
version of ``h`` (and the grad/autocast mode); the next siblings called with that same tensor get their output
from there. Anything else (another input, a sibling whose call must go to PEFT, dropout active) computes the
layer alone, so the numbers never depend on the call pattern. A forward hook on the parent (always called)
drops outputs that were not picked up; a group whose parent does not feed its members the same tensor turns
itself off after two misses.

Only dropout-inactive calls fuse (eval mode, or ``lora_dropout=0``): with dropout each layer draws its own mask.
Inference tensors (``torch.inference_mode``) carry no version counter, so an in-place change of ``h`` between
two sibling calls could not be seen: their calls compute each layer alone (exact, one pass over ``h`` per
layer); ``torch.no_grad`` keeps the fusion.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from forgetkern.patching import lora

# Children of one parent that read the same input in the models forgetkern knows (Llama/Mistral/Qwen/Gemma
# attention and gated MLPs).
SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MAX_MISSES = 2


def _mode_key(x: torch.Tensor, ac) -> tuple:
    return (x._version, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), ac)


class SiblingGroup:
    def __init__(self, parent: nn.Module, parent_name: str, members: list):
        self.parent_name = parent_name
        self.short_names = tuple(n for n, _ in members)
        self.names = tuple(f"{parent_name}.{n}" if parent_name else n for n in self.short_names)
        self.members = [m for _, m in members]
        self.enabled = True
        self.misses = 0
        self.fused_calls = 0
        self._pending: dict = {}
        self._x_ref = None
        self._key = None
        self.handle = parent.register_forward_hook(self._end_of_parent, always_call=True)

    # -- cache -------------------------------------------------------------------------------------------
    def _miss(self) -> None:
        self.misses += 1
        if self.misses >= MAX_MISSES:
            self.enabled = False

    def _drop(self) -> None:
        self._pending.clear()
        self._x_ref = None
        self._key = None

    def _end_of_parent(self, module, args, output):
        if self._pending:
            self._miss()  # a sibling was not called with the same input during the parent's forward
        self._drop()
        return None

    # -- the fused call ----------------------------------------------------------------------------------
    def forward(self, module: nn.Module, x: torch.Tensor, plan):
        """The output of ``module`` from the group's fused call, or ``None`` to compute it alone."""
        if torch.compiler.is_compiling():
            # the pending-output bookkeeping (weak refs, version counters) cannot be traced: under torch.compile
            # every layer calls the op alone, and the compiler sees the shared input itself
            return None
        if x.is_inference():
            self._drop()
            return None
        ac = plan[5]
        key = _mode_key(x, ac)
        mid = id(module)
        if self._pending:
            same = self._x_ref is not None and self._x_ref() is x and self._key == key
            if same and mid in self._pending:
                return self._pending.pop(mid)
            if not same:
                self._miss()
            self._drop()
            if not self.enabled:
                return None
        plans = []
        for m in self.members:
            if m is module:
                plans.append(plan)
                continue
            if lora.STATE_ATTR not in m.__dict__:
                return None
            reason, p = lora.plan_call(m, x, (), {})
            if reason is not None or p[4] or p[0].dtype != plan[0].dtype:
                return None
            plans.append(p)
        state = module._forgetkern_state
        ops = lora._ops()
        with lora._backend_ctx(state.backend), lora._no_autocast(ac, x.device.type):
            outs = ops.lora_linear_planned(plan[0], [p[1] for p in plans], [p[2] for p in plans],
                                           [p[3] for p in plans], training=False)
        self.fused_calls += 1
        mine = None
        for m, out in zip(self.members, outs):
            if m is module:
                mine = out
            else:
                self._pending[id(m)] = out
        if self._pending:
            self._x_ref = weakref.ref(x)
            self._key = key
        return mine

    def remove(self) -> None:
        self._drop()
        self.handle.remove()


def find_groups(model: nn.Module) -> list:
    """``(parent, parent_name, [(short_name, module), ...])`` for every set of patched siblings (>= 2)."""
    out = []
    for pname, parent in model.named_modules():
        children = dict(parent.named_children())
        for names in SIBLING_NAMES:
            members = [(n, children[n]) for n in names
                       if n in children and lora.STATE_ATTR in children[n].__dict__]
            if len(members) < 2:
                continue
            if any(m._forgetkern_state.group is not None for _, m in members):
                continue
            in_features = {m.base_layer.weight.shape[1 if type(m.base_layer) is nn.Linear else 0]
                           for _, m in members}
            if len(in_features) != 1:
                continue
            out.append((parent, pname, members))
    return out
