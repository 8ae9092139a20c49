"""Reference for the low-rank projection ``project_out_``: remove a protected subspace from many matrices.

Math, per layer ``i``, in place, in the compute type C (float64 for float64 inputs, else float32)::

    side="left":  X_i <- X_i - U_i (U_i^T X_i)        X_i: (m_i x n_i), U_i: (m_i x k_i), orthonormal columns
    side="right": X_i <- X_i - (X_i V_i) V_i^T        X_i: (n_i x m_i), V_i: (m_i x k_i), orthonormal columns

The projector ``I - U U^T`` (m x m) is never formed: two skinny products per layer, ``O(m n k)`` work and
``O(n k)`` scratch. Layers with the same shapes and dtypes are stacked and handled by two ``bmm`` s per group
(then copied back, one ``_foreach_copy_``); layers with ``k = 0`` or an empty ``X`` are left as they are.
The result is rounded once to ``X``'s dtype.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

SIDES = ("left", "right")


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _groups(tensors, bases) -> Dict[Tuple, List[int]]:
    groups: Dict[Tuple, List[int]] = {}
    for i, (x, u) in enumerate(zip(tensors, bases)):
        if x.numel() == 0 or u.shape[1] == 0:
            continue
        groups.setdefault((tuple(x.shape), tuple(u.shape), x.dtype, u.dtype), []).append(i)
    return groups


def project_out_(tensors: List[torch.Tensor], bases: List[torch.Tensor], side: str) -> None:
    for idx in _groups(tensors, bases).values():
        x0, u0 = tensors[idx[0]], bases[idx[0]]
        acc = acc_dtype(x0.dtype, u0.dtype)
        xs = torch.stack([tensors[i] for i in idx]).to(acc)
        us = torch.stack([bases[i] for i in idx]).to(acc)
        if side == "left":
            xs.baddbmm_(us, torch.bmm(us.transpose(1, 2), xs), alpha=-1.0)
        else:
            xs.baddbmm_(torch.bmm(xs, us), us.transpose(1, 2), alpha=-1.0)
        torch._foreach_copy_([tensors[i] for i in idx], list(xs.to(x0.dtype).unbind(0)))
