"""Reference for the low-rank projection ``project_out_``: remove a protected subspace from many matrices.

Math, per layer ``i``, in place, in the compute type C (float64 for float64 inputs, else float32)::

    side="left":  X_i <- X_i - U_i (U_i^T X_i)        X_i: (m_i x n_i), U_i: (m_i x k_i), orthonormal columns
    side="right": X_i <- X_i - (X_i V_i) V_i^T        X_i: (n_i x m_i), V_i: (m_i x k_i), orthonormal columns

The projector ``I - U U^T`` (m x m) is never formed: two skinny products per layer, ``O(m n k)`` work and
``O(n k)`` scratch: one ``mm`` and one in-place ``addmm_`` per layer (float32 inputs are updated in place with no
copy). Stacking layers of one shape into ``bmm`` s was measured 3x slower on CPU (SmolLM2-135M shapes: it
copies the bases, in x k per layer, every call). Layers with ``k = 0`` or an empty ``X`` are left as they are.
The result is rounded once to ``X``'s dtype.
"""

from __future__ import annotations

from typing import List

import torch

SIDES = ("left", "right")


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def project_out_(tensors: List[torch.Tensor], bases: List[torch.Tensor], side: str) -> None:
    for x, u in zip(tensors, bases):
        if x.numel() == 0 or u.shape[1] == 0:
            continue
        acc = acc_dtype(x.dtype, u.dtype)
        xa = x if x.dtype == acc else x.to(acc)
        ua = u if u.dtype == acc else u.to(acc)
        if side == "left":
            xa.addmm_(ua, torch.mm(ua.t(), xa), alpha=-1.0)
        else:
            xa.addmm_(torch.mm(xa, ua), ua.t(), alpha=-1.0)
        if xa is not x:
            x.copy_(xa)
