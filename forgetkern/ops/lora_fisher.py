"""The Fisher option of :func:`forgetkern.lora_linear`: per-sample squared gradients of an adapter's factors,
added by the op's backward.

An adapter given ``LoraAdapter(..., fisher=LoraFisher(...))`` gets a hook on its layer's output. When the output
gradient ``g`` arrives, the hook calls :func:`forgetkern.lora_persample_sq_grad_` with the forward's rank-r
product ``xa = drop(x) A^T`` (reused) and ``g``::

    fisher_b    += scale * s^2 * sum_n (G_n^T XA_n)^2          (dB_n = s G_n^T (X_n A^T))
    fisher_a    += scale * s^2 * sum_n ((G_n B)^T X_n)^2       (dA_n = s (G_n B)^T X_n)
    fisher_bias += scale * s^2 * sum_n (sum_t g_nt)^2          (the lora_bias)

with ``n`` over the samples (``x`` [N, T, in]; token granularity: every row). No extra forward or backward: two
rank-r GEMMs over the tokens. :class:`forgetkern.FisherEstimator` uses it on models patched by
``forgetkern.patch``.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor

from forgetkern.ops.linear_persample_sq_grad import bias_persample_sq_grad_, lora_persample_sq_grad_
from forgetkern.reference.lora_linear import dropped


def _err(where: str, what: str) -> str:
    return f"forgetkern.lora_linear: {where}{what}"


class LoraFisher:
    """Where the backward of :func:`lora_linear` adds one adapter's per-sample squared gradients.

    ``fisher_a`` [r, in], ``fisher_b`` [out, r], ``fisher_bias`` [out] (the ``lora_bias``): state buffers
    (float32, bfloat16 or float64; any may be None), updated in place by every backward while ``active``.
    The rows of ``x`` [..., in] are grouped into samples by their leading dimension, which must be
    ``samples`` (``x`` [N, T, in]); ``granularity="token"`` counts every row on its own. ``mask`` [N, T]
    selects the tokens that count; ``scale`` multiplies the sum. ``found`` is the running 0-dim non-finite
    flag (None until a backward ran) and ``grads`` counts the gradients received since the last reset: with
    ``granularity="sample"`` a second one in the same backward (the layer ran twice) raises, as a sample's
    gradient would then be a sum over the calls.
    """

    __slots__ = ("fisher_a", "fisher_b", "fisher_bias", "samples", "mask", "scale", "granularity", "active",
                 "found", "grads")

    def __init__(self, fisher_a: Optional[Tensor] = None, fisher_b: Optional[Tensor] = None,
                 fisher_bias: Optional[Tensor] = None, *, samples: Optional[int] = None,
                 mask: Optional[Tensor] = None, scale: float = 1.0, granularity: str = "sample"):
        if fisher_a is None and fisher_b is None and fisher_bias is None:
            raise ValueError("forgetkern.LoraFisher: fisher_a, fisher_b and fisher_bias are all None")
        if granularity not in ("sample", "token"):
            raise ValueError(f"forgetkern.LoraFisher: granularity must be 'sample' or 'token', got {granularity!r}")
        self.fisher_a, self.fisher_b, self.fisher_bias = fisher_a, fisher_b, fisher_bias
        self.samples, self.mask, self.scale, self.granularity = samples, mask, float(scale), granularity
        self.active, self.found, self.grads = True, None, 0

    def _group(self, x2: Tensor, g: Tensor, lead: tuple):
        """``(x3, g3, mask)``: the rows as [N, T, .] samples (token: [M, 1, .])."""
        if self.granularity == "token":
            m = self.mask
            m = m.reshape(-1, 1) if m is not None and tuple(m.shape) == tuple(lead) else None
            return x2.unsqueeze(1), g.unsqueeze(1), m
        n = self.samples
        if len(lead) < 2 or n is None or lead[0] != n:
            raise RuntimeError(f"forgetkern.LoraFisher: x has leading shape {tuple(lead)}, whose first dimension "
                               f"is not the number of samples {n}; per-sample attribution needs x [N, T, in] "
                               f"(use granularity='token')")
        m = self.mask if self.mask is not None and tuple(self.mask.shape) == (n, x2.shape[0] // n) else None
        return x2.view(n, -1, x2.shape[1]), g.view(n, -1, g.shape[1]), m

    def _record(self, found: Tensor) -> None:
        self.found = found if self.found is None else torch.maximum(self.found, found)


def _fisher_hook(sink: LoraFisher, x2: Tensor, xa: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                 p: float, key: int, lead: tuple, g: Tensor) -> None:
    """Tensor hook on a layer output: adds the adapter's per-sample squared gradients into ``sink``."""
    if not sink.active:
        return None
    sink.grads += 1
    if sink.grads > 1 and sink.granularity == "sample":
        raise RuntimeError("forgetkern.LoraFisher: the layer received a second output gradient in one backward "
                           "(it ran twice, e.g. weight sharing); its per-sample gradient is a sum over the "
                           "calls, which is not combined: use granularity='token'")
    with torch.no_grad():
        g = g.reshape(-1, g.shape[-1])
        if lora_a.dtype != x2.dtype:  # float32 adapters on a 16-bit layer: their gradients are float32
            x2, g = x2.to(lora_a.dtype), g.to(lora_a.dtype)
        xk = dropped(x2, key, p) if p > 0.0 else x2
        x3, g3, mask = sink._group(xk, g.contiguous(), lead)
        if sink.fisher_a is not None or sink.fisher_b is not None:
            xa3 = xa.reshape(x3.shape[0], x3.shape[1], xa.shape[1])
            sink._record(lora_persample_sq_grad_(sink.fisher_a, sink.fisher_b, x3, g3, lora_a, lora_b,
                                                 scaling=scaling, scale=sink.scale, mask=mask,
                                                 granularity=sink.granularity, xa=xa3))
        if sink.fisher_bias is not None:
            sink._record(bias_persample_sq_grad_(sink.fisher_bias, g3, scale=sink.scale * scaling * scaling,
                                                 mask=mask, granularity=sink.granularity))
    return None


def check_fisher(sink, where: str, x: Tensor, shape_a: tuple, shape_b: tuple) -> None:
    """Validate ``LoraAdapter.fisher`` of adapter ``where`` (shapes of its factors ``shape_a``, ``shape_b``)."""
    if not isinstance(sink, LoraFisher):
        raise TypeError(_err(where, f".fisher must be a LoraFisher or None, got {type(sink).__name__}"))
    for attr, shape in (("fisher_a", shape_a), ("fisher_b", shape_b), ("fisher_bias", shape_b[:1])):
        t = getattr(sink, attr)
        if t is None:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(_err(where, f".fisher.{attr} must be a Tensor of shape {shape}, got {got}"))
        if t.device != x.device:
            raise ValueError(_err(where, f".fisher.{attr} is on {t.device} but x is on {x.device}"))
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise TypeError(_err(where, f".fisher.{attr} has dtype {t.dtype}; expected float32, bfloat16 or "
                                         f"float64 (float16 state overflows)"))


def attach_fisher(sinks, ys, x2, xa, lead, lora_a, lora_b, layer, scaling, dropout_p, keys) -> None:
    """Hook each ``(adapter index, sink)`` of ``sinks`` on its layer's output in ``ys``: the sink's per-sample Fisher
    is added when the output gradient arrives (``x2`` [M, in] and ``xa`` [M, sum r] from the forward)."""
    if torch.compiler.is_compiling():
        raise RuntimeError("forgetkern.lora_linear: a LoraFisher sink needs eager mode (it hooks the output "
                           "gradient); run the Fisher estimation without torch.compile")
    off = 0
    offs = []
    for a in lora_a:
        offs.append(off)
        off += a.shape[0]
    x2, xa = x2.detach(), xa.detach()
    for k, sink in sinks:
        y = ys[layer[k]]
        if not y.requires_grad:
            continue
        r = lora_a[k].shape[0]
        y.register_hook(partial(_fisher_hook, sink, x2, xa[:, offs[k]:offs[k] + r], lora_a[k].detach(),
                                lora_b[k].detach(), scaling[k], dropout_p[k], keys[k], tuple(lead)))
