"""Learning without Forgetting (Li & Hoiem 2016) for causal LMs: cross-entropy plus distillation to a teacher,
fused with the LM head in row chunks so the full-vocabulary logits of teacher and student are never both held.

Math, over the ``n`` positions whose label is not ``-100`` (rows of ``h_s``/``h_t``: student and teacher hidden
states at the positions that predict ``labels``), with ``z = h W^T + b`` and ``p^T = softmax(z / T)``::

    ce   = 1/n sum_rows -log softmax(z_s)[y]
    kl   = 1/n sum_rows T^2 * sum_v p_t^T (log p_t^T - log p_s^T)          (Hinton et al.'s T^2 scaling)
    loss = ce_weight * ce + alpha * kl

    d loss / d z_s = ce_weight/n * (softmax(z_s) - onehot(y)) + alpha*T/n * (p_s^T - p_t^T)
    d loss / d h_s = (d loss / d z_s) W ,   d loss / d W = (d loss / d z_s)^T h_s ,   d loss / d b = sum_rows

The gradients are computed in the forward pass, chunk by chunk (the logits of one chunk of rows at a time, in
float32, float64 for float64 inputs), as Liger-Kernel's fused linear losses do; backward only scales them by
the incoming gradient. Memory: two ``chunk_size x V`` logit blocks instead of two ``n x V`` ones.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def lwf_loss(h_s: torch.Tensor, h_t: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
             bias: Optional[torch.Tensor], alpha: float, temperature: float, ce_weight: float, chunk_size: int,
             need_weight_grad: bool) -> Tuple[torch.Tensor, ...]:
    """``(loss, ce, kl, grad_h, grad_w, grad_b)`` for flattened rows ``h_s, h_t [N, H]``, ``labels [N]``.

    ``grad_w`` / ``grad_b`` are empty tensors unless ``need_weight_grad`` (and a bias is given)."""
    acc = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    T = float(temperature)
    valid = labels != -100
    n = int(valid.sum())
    N = h_s.shape[0]
    grad_h = torch.zeros(h_s.shape, dtype=acc, device=h_s.device)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight_grad else weight.new_empty(0)
    grad_b = (torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_weight_grad and bias is not None
              else h_s.new_empty(0))
    ce_sum = torch.zeros((), dtype=acc, device=h_s.device)
    kl_sum = torch.zeros((), dtype=acc, device=h_s.device)
    if n == 0:
        zero = torch.zeros((), dtype=acc, device=h_s.device)
        return zero, zero.clone(), zero.clone(), grad_h.to(h_s.dtype), grad_w, grad_b
    w = weight.to(acc)  # one upcast per call (none for float32 weights)
    b = bias.to(acc) if bias is not None else None
    rows = valid.nonzero().squeeze(1)
    for s in range(0, rows.numel(), chunk_size):
        idx = rows[s:s + chunk_size]
        hs, ht = h_s[idx].to(acc), h_t[idx].to(acc)
        zs, zt = hs @ w.T, ht @ w.T
        if b is not None:
            zs, zt = zs + b, zt + b
        y = labels[idx]
        lse = torch.logsumexp(zs, dim=-1)
        ce_sum += (lse - zs.gather(-1, y[:, None]).squeeze(1)).sum()
        ls_T = torch.log_softmax(zs / T, dim=-1)
        lt_T = torch.log_softmax(zt / T, dim=-1)
        pt_T = lt_T.exp()
        kl_sum += (pt_T * (lt_T - ls_T)).sum() * (T * T)
        dz = torch.exp(zs - lse[:, None]).mul_(ce_weight / n)
        dz.scatter_add_(-1, y[:, None], torch.full((idx.numel(), 1), -ce_weight / n, dtype=acc, device=dz.device))
        dz.add_(ls_T.exp_().sub_(pt_T), alpha=alpha * T / n)
        grad_h[idx] = dz @ w
        if need_weight_grad:
            grad_w += dz.T @ hs
            if b is not None:
                grad_b += dz.sum(0)
    ce, kl = ce_sum / n, kl_sum / n
    loss = ce_weight * ce + alpha * kl
    if need_weight_grad:
        grad_w = grad_w.to(weight.dtype)
        if bias is not None:
            grad_b = grad_b.to(bias.dtype)
    del N
    return loss, ce, kl, grad_h.to(h_s.dtype), grad_w, grad_b
