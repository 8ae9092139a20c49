"""Reference for ``adamw_ewc_``: one AdamW step with the EWC penalty's gradient fused into it.

Plain per-tensor PyTorch, the math of ``csrc/include/forgetkern/adamw_ewc.h`` operation by operation, in the
compute type ``C`` (float32; float64 for float64 parameters), each stored tensor rounded once::

    coefficients (host, double, as torch.optim.AdamW's single-tensor path computes them):
        decay = 1 - lr * wd        w = 1 - beta1        c2 = 1 - beta2
        neg_step_size = -(lr / (1 - beta1 ** step))      bc2_sqrt = (1 - beta2 ** step) ** 0.5
    per element (every scalar rounded to C first):
        g    = sign * g                                  sign = -1 if maximize else 1
        d    = p - p*;  fd = F * d;  g = g + fd * lam;  term = fd * d        (EWC only)
        p    = p * decay
        m    = m + w * (g - m)   if |w| < 0.5 else   g - (g - m) * (1 - w)  (torch.lerp)
        v    = v * beta2 + (c2 * g) * g
        vmax = maximum(vmax, v);  vhat = vmax if amsgrad else v
        p    = p + (neg_step_size * m) / (sqrt(vhat) / bc2_sqrt + eps)
    penalty = lam / 2 * sum term                         (0-dim; 0 without EWC; float64 if any param is)

sqrt and the divisions of float32 values are evaluated in float64 and rounded to float32: the correctly
rounded IEEE result (float64 has more than 2 * 24 + 2 bits, so the double rounding is innocuous), which is what
the C++ and Triton kernels compute; torch's own float32 vector sqrt on CPU is not always correctly rounded.
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefficients(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float,
                 lam: float, maximize: bool) -> dict:
    """The step's scalars in double, computed as torch.optim.AdamW (non-capturable) computes them."""
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    return {"decay": 1 - lr * weight_decay, "w": 1 - beta1, "beta2": beta2, "c2": 1 - beta2,
            "neg_step_size": -(lr / bc1), "bc2_sqrt": bc2 ** 0.5, "eps": eps, "lam": lam,
            "sign": -1.0 if maximize else 1.0}


def _exact(op, a: torch.Tensor, *args) -> torch.Tensor:
    """A correctly rounded float32 sqrt / division (through float64); float64 as is."""
    if a.dtype == torch.float64:
        return op(a, *args)
    return op(a.double(), *(x.double() for x in args)).to(a.dtype)


def adamw_ewc_(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, max_exp_avg_sqs: list,
               anchors: list, fishers: list, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: float, lam: float, amsgrad: bool, maximize: bool) -> torch.Tensor:
    device = params[0].device if params else torch.device("cpu")
    out = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    total = torch.zeros((), dtype=out, device=device)
    co = coefficients(lr, beta1, beta2, eps, weight_decay, step, lam, maximize)
    ewc = len(anchors) > 0
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        acc = acc_dtype(p.dtype)
        c = {k: torch.tensor(v, dtype=acc, device=device) for k, v in co.items()}
        g = grads[i].to(acc) * c["sign"]
        pv = p.to(acc)
        if ewc:
            d = pv - anchors[i].to(acc)
            fd = fishers[i].to(acc) * d
            total = total + (fd * d).sum(dtype=acc).to(out)
            g = g + fd * c["lam"]
        pv = pv * c["decay"]
        m = exp_avgs[i].to(acc)
        diff = g - m
        if bool(c["w"].abs() < 0.5):
            m = m + c["w"] * diff
        else:
            m = g - diff * (torch.tensor(1.0, dtype=acc, device=device) - c["w"])
        v = exp_avg_sqs[i].to(acc) * c["beta2"] + (c["c2"] * g) * g
        vhat = v
        if amsgrad:
            vhat = torch.maximum(max_exp_avg_sqs[i].to(acc), v)
            max_exp_avg_sqs[i].copy_(vhat)
        den = _exact(torch.div, _exact(torch.sqrt, vhat), c["bc2_sqrt"]) + c["eps"]
        p.copy_(pv + _exact(torch.div, c["neg_step_size"] * m, den))
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
    return total * (lam / 2) if ewc else total
