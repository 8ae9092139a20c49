"""What :func:`forgetkern.patch` did: patched layers, layers left on PEFT's path (with the reason), sibling
groups, and live per-call statistics (how many calls ran fused, how many went to PEFT and why)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Tuple


@dataclasses.dataclass
class PatchReport:
    backend: str
    patched: List[str] = dataclasses.field(default_factory=list)
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)
    already_patched: List[str] = dataclasses.field(default_factory=list)
    fused_groups: List[Tuple[str, ...]] = dataclasses.field(default_factory=list)
    _states: list = dataclasses.field(default_factory=list, repr=False, compare=False)
    _groups: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    @property
    def n_patched(self) -> int:
        return len(self.patched) + len(self.already_patched)

    def call_stats(self, per_layer: bool = False):
        """Calls since patching: ``{"fused": n, "fused (siblings)": n, "PEFT: <reason>": n}``, summed over the
        layers (or ``{layer_name: {...}}`` with ``per_layer=True``). Eager calls only: the calls a
        ``torch.compile``'d model makes inside its graph are not counted (a counter would make it recompile)."""
        if per_layer:
            return {s.name: dict(s.calls) for s in self._states}
        total: collections.Counter = collections.Counter()
        for s in self._states:
            total.update(s.calls)
        return dict(total)

    def active_groups(self) -> List[Tuple[str, ...]]:
        """Sibling groups still fusing (a group whose parent does not feed its members one input turns off)."""
        return [g.names for g in self._groups if g.enabled]

    def __str__(self) -> str:
        lines = [f"forgetkern.patch: {len(self.patched)} LoRA layer(s) patched (backend={self.backend})"
                 + (f", {len(self.already_patched)} already patched" if self.already_patched else "")
                 + f", {len(self.skipped)} left on PEFT's path, {len(self.fused_groups)} sibling group(s)"]
        by_reason: dict = collections.defaultdict(list)
        for name, reason in self.skipped.items():
            by_reason[reason].append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            lines.append(f"  left on PEFT: {reason}: {shown}")
        for g in self.fused_groups[:6]:
            lines.append("  fused siblings: " + " + ".join(g))
        if len(self.fused_groups) > 6:
            lines.append(f"  ... {len(self.fused_groups) - 6} more sibling groups")
        stats = self.call_stats()
        if stats:
            lines.append("  calls: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
        return "\n".join(lines)
