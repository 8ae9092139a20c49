"""Reference for the O-LoRA orthogonality loss (``olora_loss``): the test oracle's structure and the CPU path.

Math, per adapted layer ``i`` with the frozen past factors ``A_past_i`` (p_i x in_i, the earlier tasks' LoRA A
rows stacked along the rank) and the current adapter's ``A_i`` (r_i x in_i), all read in the compute type C
(float64 when any factor is float64, else float32)::

    P_i  = A_past_i @ A_i^T                       (p_i x r_i)
    loss = sum_i sum |P_i|                        norm="l1"   (the O-LoRA code's form)
    loss = sum_i sum P_i^2                        norm="fro2" (the paper's ||.||_F^2)
    dL/dA_i = sign(P_i)^T @ A_past_i              norm="l1"   (subgradient 0 where P_i == 0)
    dL/dA_i = 2 P_i^T @ A_past_i                  norm="fro2"

One ``mm`` per layer, the per-layer sums stacked and added in a fixed order (deterministic). Stacking layers of
one shape into a ``bmm`` was measured slower on CPU (SmolLM2-135M shapes, 1 thread: the copies of the stacked
factors cost more than the ~200 calls save). Layers with ``p = 0`` (no past task yet) add nothing and get a
zero gradient.
"""

from __future__ import annotations

from typing import List

import torch

NORMS = ("l1", "fro2")


def acc_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def olora_loss(past: List[torch.Tensor], cur: List[torch.Tensor], norm: str) -> torch.Tensor:
    device = cur[0].device if cur else torch.device("cpu")
    acc = acc_dtype(list(past) + list(cur))
    terms = []
    for p, c in zip(past, cur):
        if p.shape[0] == 0 or c.numel() == 0:
            continue
        prod = torch.mm(p.to(acc), c.to(acc).t())
        terms.append(prod.abs().sum() if norm == "l1" else prod.square().sum())
    if not terms:
        return torch.zeros((), dtype=acc, device=device)
    return torch.stack(terms).sum()  # fixed order: deterministic


def olora_loss_backward(past: List[torch.Tensor], cur: List[torch.Tensor], norm: str,
                        grad_out: torch.Tensor) -> List[torch.Tensor]:
    """``grad_out * dL/dA_i`` for every layer, in ``cur[i]``'s dtype (rounded once)."""
    acc = acc_dtype(list(past) + list(cur))
    g = grad_out.to(acc)
    grads = []
    for p, c in zip(past, cur):
        if p.shape[0] == 0 or c.numel() == 0:
            grads.append(torch.zeros_like(c))
            continue
        p_acc = p.to(acc)
        prod = torch.mm(p_acc, c.to(acc).t())
        s = prod.sign_() if norm == "l1" else prod.mul_(2)
        s.mul_(g)  # scale the small p x r factor, not the r x in gradient
        out = torch.mm(s.t(), p_acc)
        grads.append(out if out.dtype == c.dtype else out.to(c.dtype))
    return grads
