"""Small spectral helpers of the projection methods: top singular triples without a full SVD."""

from __future__ import annotations

import torch

__all__ = ["top_singular_triples"]


def top_singular_triples(w: torch.Tensor, k: int):
    """``(U_k, S_k, V_k)`` of ``w`` (float32 results): the top-k singular triples from the float64 eigenpairs of the
    smaller Gram matrix (``w^T w`` for a tall ``w``). The other factor is ``w V_k / S_k``; exact to float64
    rounding amplified by ``(s_1 / s_k)^2``, so when ``s_k`` is tiny against ``s_1`` (or zero) the full SVD is
    taken instead."""
    wd = w.double()
    tall = wd.shape[0] >= wd.shape[1]
    evals, evecs = torch.linalg.eigh(wd.t() @ wd if tall else wd @ wd.t())
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    sv = evals.clamp_min(0).sqrt()
    if not bool(sv[-1] > 1e-4 * sv[0]):
        u, s_, vh = torch.linalg.svd(w.float(), full_matrices=False)
        return u[:, :k].contiguous(), s_[:k].contiguous(), vh[:k].t().contiguous()
    other = (wd @ evecs if tall else wd.t() @ evecs) / sv
    u, v = (other, evecs) if tall else (evecs, other)
    return u.float(), sv.float(), v.float()
