"""Reference for the EWC penalty and its gradient (``ewc_fused``).

Math, with ``d = theta - theta_star`` computed in float32 (float64 for float64 parameters)::

    penalty = lam / 2 * sum_i F_i * d_i^2           (one 0-dim tensor over all tensors of the lists;
                                                     float64 if any parameter is float64, else float32)
    grad_i  = [grad_i if accumulate else 0] + lam * F_i * d_i      (only when write_grad)

``grad`` is stored in its own dtype, rounded once.
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ewc_fused(params: list, anchors: list, fishers: list, grads: list, lam: float, write_grad: bool,
              accumulate: bool) -> torch.Tensor:
    device = params[0].device if params else torch.device("cpu")
    out = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    total = torch.zeros((), dtype=out, device=device)
    for i, (p, a, f) in enumerate(zip(params, anchors, fishers)):
        if p.numel() == 0:
            continue
        acc = acc_dtype(p.dtype)
        d = p.to(acc) - a.to(acc)
        fd = f.to(acc) * d
        total = total + (fd * d).sum(dtype=acc).to(out)
        if write_grad:
            g = grads[i]
            step = fd * lam
            g.copy_(g.to(acc) + step if accumulate else step)
    return total * (lam / 2)
