"""Reference for ``fisher_accumulate_``.

Math, per element, for each pair (F, g) of the lists::

    F <- decay * F + (scale * g) * g        (computed in float32, or float64 for float64 state)

An element whose gradient is not finite (inf or nan), or whose update is not finite once stored (a finite
gradient can overflow: ``(1e20)^2`` in float32, or a float32 result past bfloat16's range), is left unchanged,
and the op returns a 0-dim float32 tensor on the device that is 1.0 if any such element was seen and 0.0
otherwise (no host synchronisation).
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fisher_accumulate_(fishers: list, grads: list, decay: float, scale: float) -> torch.Tensor:
    device = fishers[0].device if fishers else torch.device("cpu")
    found = torch.zeros((), dtype=torch.float32, device=device)
    for f, g in zip(fishers, grads):
        if f.numel() == 0:
            continue
        acc = acc_dtype(f.dtype)
        g32 = g.to(acc)
        new = (f.to(acc) * decay + scale * g32 * g32).to(f.dtype)  # rounded once to the state dtype
        finite = torch.isfinite(g32) & torch.isfinite(new)
        f.copy_(torch.where(finite, new, f))
        found = torch.maximum(found, (~finite).any().to(torch.float32))
    return found
