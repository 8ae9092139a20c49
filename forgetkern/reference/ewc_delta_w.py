"""Reference for the EWC penalty of LoRA updates (``ewc_delta_w``): materialises ``B_i A_i``.

Math, per layer ``i`` with ``A_i`` (r x in), ``B_i`` (out x r), Fisher ``F_i`` (out x in), scaling ``s_i``, all
read in the compute type C (float64 when the factors are float64, else float32)::

    D_i     = B_i @ A_i                         (out x in, never scaled: s_i enters as s_i^2 below)
    G_i     = F_i * D_i
    penalty = lam / 2 * sum_i s_i^2 * sum(G_i * D_i)
    grads_a[i] += s_i^2 * lam * B_i^T @ G_i     (r x in;  = d penalty / d A_i)
    grads_b[i] += s_i^2 * lam * G_i @ A_i^T     (out x r; = d penalty / d B_i)

The penalty is one 0-dim tensor (float64 if any factor is float64, else float32); the gradients are added in
C and rounded once to the factors' dtype. This file is the test oracle and the fallback of every backend; it
allocates out x in temporaries, the kernels do not.
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def result_dtype(lora_a) -> torch.dtype:
    return torch.float64 if any(a.dtype == torch.float64 for a in lora_a) else torch.float32


def ewc_delta_w(lora_a: list, lora_b: list, fishers: list, scaling: list, lam: float, grads_a: list,
                grads_b: list, write_grad: bool) -> torch.Tensor:
    device = lora_a[0].device if lora_a else torch.device("cpu")
    out = result_dtype(lora_a)
    total = torch.zeros((), dtype=out, device=device)
    for i, (a, b, f) in enumerate(zip(lora_a, lora_b, fishers)):
        acc = acc_dtype(a.dtype)
        s2 = float(scaling[i]) ** 2
        d = b.to(acc) @ a.to(acc)
        g = f.to(acc) * d
        total = total + ((g * d).sum(dtype=acc) * s2).to(out)
        if write_grad:
            coef = s2 * lam
            ga, gb = grads_a[i], grads_b[i]
            ga.copy_(ga.to(acc) + (b.to(acc).t() @ g) * coef)
            gb.copy_(gb.to(acc) + (g @ a.to(acc).t()) * coef)
    return total * (lam / 2)


def ewc_delta_w_grads(lora_a: list, lora_b: list, fishers: list, scaling: list, lam: float) -> tuple:
    """``(dP/dA_i, dP/dB_i)`` as differentiable torch expressions (for double backward), in the factors'
    dtype."""
    grads_a, grads_b = [], []
    for i, (a, b, f) in enumerate(zip(lora_a, lora_b, fishers)):
        acc = acc_dtype(a.dtype)
        coef = float(scaling[i]) ** 2 * lam
        a32, b32 = a.to(acc), b.to(acc)
        g = f.to(acc) * (b32 @ a32)
        grads_a.append(((b32.t() @ g) * coef).to(a.dtype))
        grads_b.append(((g @ a32.t()) * coef).to(b.dtype))
    return grads_a, grads_b
