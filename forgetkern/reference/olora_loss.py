"""Reference for the O-LoRA orthogonality loss (``olora_loss``): layers grouped by shape, one ``bmm`` per group.

Math, per adapted layer ``i`` with the frozen past factors ``A_past_i`` (p_i x in_i, the earlier tasks' LoRA A
rows stacked along the rank) and the current adapter's ``A_i`` (r_i x in_i), all read in the compute type C
(float64 when any factor is float64, else float32)::

    P_i  = A_past_i @ A_i^T                       (p_i x r_i)
    loss = sum_i sum |P_i|                        norm="l1"   (the O-LoRA code's form)
    loss = sum_i sum P_i^2                        norm="fro2" (the paper's ||.||_F^2)
    dL/dA_i = sign(P_i)^T @ A_past_i              norm="l1"   (subgradient 0 where P_i == 0)
    dL/dA_i = 2 P_i^T @ A_past_i                  norm="fro2"

Layers with the same (p, r, in) and dtype are stacked and multiplied by one ``bmm``: the CPU fallback and
the test oracle's structure (the tests compare against a float64 ``einsum`` per layer). Layers with ``p = 0``
(no past task yet) add nothing and get a zero gradient.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

NORMS = ("l1", "fro2")


def acc_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _groups(past: List[torch.Tensor], cur: List[torch.Tensor]) -> Dict[Tuple, List[int]]:
    groups: Dict[Tuple, List[int]] = {}
    for i, (p, c) in enumerate(zip(past, cur)):
        if p.shape[0] == 0 or c.numel() == 0:
            continue
        groups.setdefault((tuple(p.shape), tuple(c.shape), p.dtype, c.dtype), []).append(i)
    return groups


def _stack(xs: List[torch.Tensor], idx: List[int], dtype: torch.dtype) -> torch.Tensor:
    if len(idx) == 1:
        return xs[idx[0]].to(dtype).unsqueeze(0)
    return torch.stack([xs[i] for i in idx]).to(dtype)


def olora_loss(past: List[torch.Tensor], cur: List[torch.Tensor], norm: str) -> torch.Tensor:
    device = cur[0].device if cur else torch.device("cpu")
    acc = acc_dtype(list(past) + list(cur))
    total = torch.zeros((), dtype=acc, device=device)
    for idx in _groups(past, cur).values():
        prod = torch.bmm(_stack(past, idx, acc), _stack(cur, idx, acc).transpose(1, 2))
        total = total + (prod.abs().sum() if norm == "l1" else prod.square().sum())
    return total


def olora_loss_backward(past: List[torch.Tensor], cur: List[torch.Tensor], norm: str,
                        grad_out: torch.Tensor) -> List[torch.Tensor]:
    """``grad_out * dL/dA_i`` for every layer, in ``cur[i]``'s dtype (rounded once)."""
    acc = acc_dtype(list(past) + list(cur))
    grads = [torch.zeros_like(c) for c in cur]
    g = grad_out.to(acc)
    for idx in _groups(past, cur).values():
        pst = _stack(past, idx, acc)
        prod = torch.bmm(pst, _stack(cur, idx, acc).transpose(1, 2))
        s = prod.sign() if norm == "l1" else prod * 2
        out = torch.bmm(s.transpose(1, 2), pst) * g
        for j, i in enumerate(idx):
            grads[i].copy_(out[j])
    return grads
