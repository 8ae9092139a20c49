"""``linear_persample_sq_grad_``: the diagonal per-sample Fisher of a Linear weight, without per-sample gradients.

For ``y = x W^T (+ b)`` with ``x`` [N, T, in] and the output gradient ``g = dL/dy`` [N, T, out], where ``L`` is
the SUM of per-sample losses ``l_n`` (so that ``g[n]`` is the gradient of ``l_n`` alone)::

    granularity="sample":  F += scale * sum_n G_n * G_n,     G_n = sum_t m_nt g_nt x_nt^T  = d l_n / d W
    granularity="token":   F += scale * sum_n sum_t m_nt (g_nt * g_nt)(x_nt * x_nt)^T

(``*`` elementwise; ``m`` the optional [N, T] boolean mask, e.g. the attention mask: padded tokens count for
nothing, and are not even read). Sample granularity is the square of each sample's full gradient; token
granularity treats each token's contribution ``g_nt x_nt^T`` as an independent sample (one GEMM on squared
operands; it equals sample granularity when T = 1). With ``scale = 1 / N_total`` summed over batches, F is the
empirical Fisher ``1/N sum_n G_n^2`` of the per-sample loss ``l_n`` (e.g. the summed token cross-entropy).

How it runs: on GPU, one kernel per call (Triton or CUDA C++) computes each ``G_n`` tile by tile in registers
as a GEMM over the tokens and squares it in the epilogue before summing over samples, so the only memory it
touches beyond the inputs and ``F`` is a flag (and, for small layers, a split-N workspace of at most about 2x
the float32 size of ``F``). On CPU, the chunked PyTorch path (``forgetkern.reference``) keeps the extra memory
O(out x in): one float32 ``[out, in]`` per-sample gradient at a time (plus a float32 accumulator for bfloat16
state and bounded activation copies).

Numerics: inputs float32/float16/bfloat16 (float64 on the reference path); products and sums in float32 (16-bit
values are upcast, so squares never overflow); ``F`` float32, bfloat16 (rounded once per call) or float64.
An element of a sample's contribution that is inf/nan is dropped, never folded in, and the returned 0-dim
float32 flag (on the device, no sync) is 1.0.

On GPU, float32 inputs are multiplied at TF32 precision when ``torch.backends.cuda.matmul.allow_tf32`` is set,
else with the 3-pass TF32 scheme (about float32 accuracy).
"""

from __future__ import annotations

from typing import Optional

import torch

from forgetkern import _backend, _ext, _validate
from forgetkern.reference import linear_persample_sq_grad as reference

OP = _backend.register_op("linear_persample_sq_grad_")


def _triton():
    from forgetkern.triton import linear_persample_sq_grad

    return linear_persample_sq_grad


KERNELS = _backend.Kernels(
    OP,
    torch=lambda: reference.linear_persample_sq_grad_,
    cuda=lambda: _ext.cuda_ops().linear_persample_sq_grad_,
    triton=lambda: _triton().linear_persample_sq_grad_,
)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GRANULARITIES = ("sample", "token")


@torch.library.custom_op("forgetkern::linear_persample_sq_grad_", mutates_args=("fisher",))
def _op(fisher: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, mask: Optional[torch.Tensor],
        scale: float, token_level: bool) -> torch.Tensor:
    supported = ("torch",) if torch.float64 in (fisher.dtype, x.dtype) else None
    return KERNELS(fisher.device, supported=supported)(fisher, x, grad_out, mask, scale, token_level)


@_op.register_fake
def _(fisher, x, grad_out, mask, scale, token_level):
    return fisher.new_empty((), dtype=torch.float32)


def _as_3d(op: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"forgetkern.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() != 3:
        raise ValueError(f"forgetkern.{op}: {name} must be [N, T, features] or [N, features], got shape "
                         f"{tuple(t.shape)}; flatten extra token dimensions into T first")
    return t


def check_args(op: str, fisher, x, grad_out, mask, scale, granularity):
    """Validated ``(fisher, x3d, g3d, mask_bool_or_None, scale, token_level)``; errors name the argument."""
    if not isinstance(fisher, torch.Tensor):
        raise TypeError(f"forgetkern.{op}: fisher must be a Tensor, got {type(fisher).__name__}")
    x, grad_out = _as_3d(op, "x", x), _as_3d(op, "grad_out", grad_out)
    scale = _validate.check_nonnegative(op, "scale", scale)
    if granularity not in GRANULARITIES:
        raise ValueError(f"forgetkern.{op}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if fisher.dtype not in _validate.STATE_DTYPES:
        raise TypeError(f"forgetkern.{op}: fisher has dtype {fisher.dtype}; expected float32, bfloat16 or "
                        f"float64 (float16 state overflows)")
    for name, t in (("x", x), ("grad_out", grad_out)):
        if t.dtype not in INPUT_DTYPES:
            raise TypeError(f"forgetkern.{op}: {name} has dtype {t.dtype}; expected a float dtype")
        if t.device != fisher.device:
            raise ValueError(f"forgetkern.{op}: {name} is on {t.device} but fisher is on {fisher.device}")
        if t.layout != torch.strided:
            raise TypeError(f"forgetkern.{op}: {name} must be a dense (strided) tensor")
    if x.dtype != grad_out.dtype:
        raise TypeError(f"forgetkern.{op}: x has dtype {x.dtype} but grad_out has {grad_out.dtype}; "
                        f"they must match")
    if fisher.dim() != 2 or fisher.layout != torch.strided:
        raise ValueError(f"forgetkern.{op}: fisher must be a dense 2-D [out, in] tensor, got shape "
                         f"{tuple(fisher.shape)}")
    if not fisher.is_contiguous():
        raise ValueError(f"forgetkern.{op}: fisher is not contiguous (it is updated in place; pass a "
                         f"contiguous tensor)")
    if x.shape[:2] != grad_out.shape[:2]:
        raise ValueError(f"forgetkern.{op}: x has shape {tuple(x.shape)} but grad_out has "
                         f"{tuple(grad_out.shape)}; their [N, T] leading dimensions must match")
    if tuple(fisher.shape) != (grad_out.shape[2], x.shape[2]):
        raise ValueError(f"forgetkern.{op}: fisher has shape {tuple(fisher.shape)}, expected [out, in] = "
                         f"{(grad_out.shape[2], x.shape[2])} from grad_out and x")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"forgetkern.{op}: mask must be a Tensor or None, got {type(mask).__name__}")
        if mask.dim() == 1 and x.shape[1] == 1:
            mask = mask.unsqueeze(1)
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"forgetkern.{op}: mask has shape {tuple(mask.shape)}, expected [N, T] = "
                             f"{tuple(x.shape[:2])}")
        if mask.device != fisher.device:
            raise ValueError(f"forgetkern.{op}: mask is on {mask.device} but fisher is on {fisher.device}")
        mask = mask.detach() if mask.dtype == torch.bool else mask.detach() != 0
    if fisher.requires_grad:
        raise ValueError(f"forgetkern.{op}: fisher requires grad; pass a buffer (fisher.detach())")
    _validate.no_overlap(op, [("fisher", fisher)], [("x", x), ("grad_out", grad_out), ("mask", mask)])
    return fisher, x.detach(), grad_out.detach(), mask, scale, granularity == "token"


def linear_persample_sq_grad_(fisher: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, *,
                              scale: float = 1.0, mask: Optional[torch.Tensor] = None,
                              granularity: str = "sample") -> torch.Tensor:
    """Add the summed squared per-sample gradients of a Linear weight into ``fisher``, in place.

    Args:
        fisher: [out, in] state (float32, bfloat16 or float64), updated in place.
        x: the layer input, [N, T, in] (or [N, in], i.e. T = 1).
        grad_out: the gradient of the summed per-sample losses w.r.t. the layer output, [N, T, out]
            (or [N, out]); same dtype as ``x``.
        scale: factor on the sum over samples, e.g. ``1 / N_total`` for the mean over samples.
        mask: optional [N, T] (bool, or nonzero = keep) selecting the tokens that count (attention mask).
        granularity: ``"sample"`` (square of each sample's gradient) or ``"token"`` (sum over tokens of the
            squared per-token contributions); see the module docstring for the formulas.

    Returns:
        0-dim float32 tensor on the device: 1.0 if a non-finite contribution was dropped, else 0.0.

    For a bias, the per-sample gradient is ``sum_t g_nt``: use :func:`bias_persample_sq_grad_`.
    """
    args = check_args(OP, fisher, x, grad_out, mask, scale, granularity)
    return _op(*args)


def bias_persample_sq_grad_(fisher: torch.Tensor, grad_out: torch.Tensor, *, scale: float = 1.0,
                            mask: Optional[torch.Tensor] = None, granularity: str = "sample") -> torch.Tensor:
    """The bias counterpart: ``F += scale * sum_n (sum_t m_nt g_nt)^2`` (token: ``sum_{n,t} m_nt g_nt^2``).

    Small (O(N T out)), so plain PyTorch on every device; same flag and non-finite policy as the weight op.
    """
    op = "bias_persample_sq_grad_"
    if not isinstance(fisher, torch.Tensor) or fisher.dim() != 1:
        raise ValueError(f"forgetkern.{op}: fisher must be a 1-D [out] tensor")
    ones = grad_out.new_ones(grad_out.shape[:-1] + (1,))
    f2 = fisher.view(-1, 1)
    fisher_, x, g, m, scale, token = check_args(op, f2, ones, grad_out, mask, scale, granularity)
    from forgetkern.reference.linear_persample_sq_grad import linear_persample_sq_grad_ as ref

    return ref(fisher_, x, g, m, scale, token)


def _check_factors(op: str, x3, g3, lora_a, lora_b, xa, gb) -> None:
    """``lora_a`` [r, in], ``lora_b`` [out, r] (float, on x's device) and the optional intermediates [N, T, r]."""
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"forgetkern.{op}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"forgetkern.{op}: {name} has dtype {t.dtype}; expected a float dtype")
        if t.device != x3.device:
            raise ValueError(f"forgetkern.{op}: {name} is on {t.device} but x is on {x3.device}")
        if t.dim() != 2:
            raise ValueError(f"forgetkern.{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    r = lora_a.shape[0]
    if lora_a.shape[1] != x3.shape[2]:
        raise ValueError(f"forgetkern.{op}: lora_a has shape {tuple(lora_a.shape)}, expected [r, in] with "
                         f"in = {x3.shape[2]} (the last dimension of x)")
    if tuple(lora_b.shape) != (g3.shape[2], r):
        raise ValueError(f"forgetkern.{op}: lora_b has shape {tuple(lora_b.shape)}, expected [out, r] = "
                         f"{(g3.shape[2], r)} (out from grad_out, r from lora_a)")
    for name, t in (("xa", xa), ("gb", gb)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape[-1:]) != (r,)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"forgetkern.{op}: {name} must be a [N, T, r] tensor with r = {r}, got {got}")


def lora_persample_sq_grad_(fisher_a: Optional[torch.Tensor], fisher_b: Optional[torch.Tensor], x: torch.Tensor,
                            grad_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                            scaling: float, scale: float = 1.0, mask: Optional[torch.Tensor] = None,
                            granularity: str = "sample", xa: Optional[torch.Tensor] = None,
                            gb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Squared per-sample gradients of the LoRA factors, added into ``fisher_a`` [r, in] and ``fisher_b`` [out, r].

    For the LoRA branch ``y = base(x) + scaling * (x A^T) B^T`` (``A`` [r, in], ``B`` [out, r], ``x`` the
    branch input after dropout) and ``g = dL/dy`` of the summed per-sample losses::

        dB_n = scaling * G_n^T (X_n A^T)      ->  fisher_b += scale * scaling^2 * sum_n (U_n-Linear Fisher)
        dA_n = scaling * (G_n B)^T X_n        ->  fisher_a += scale * scaling^2 * sum_n (...)

    i.e. two calls of :func:`linear_persample_sq_grad_` with the LoRA intermediates as operands:
    ``U = x A^T`` [N, T, r] (the forward already has it: pass it as ``xa``) and ``V = g B`` [N, T, r] (the
    backward computes it for dA: pass it as ``gb``); the missing ones are computed here. A LoRA backward that
    already holds ``U`` and ``V`` adds the Fisher at the cost of two GEMMs over the tokens and no extra pass.
    ``granularity``, ``mask`` and the returned flag (max of both) are as in :func:`linear_persample_sq_grad_`.
    Either Fisher may be ``None`` (that factor is skipped). :func:`forgetkern.lora_linear` calls this from its
    backward for an adapter given a :class:`forgetkern.LoraFisher` (``xa`` from its forward).
    """
    op = "lora_persample_sq_grad_"
    scaling = _validate.check_float(op, "scaling", scaling)
    scale = _validate.check_nonnegative(op, "scale", scale)
    if fisher_a is None and fisher_b is None:
        raise ValueError(f"forgetkern.{op}: fisher_a and fisher_b are both None; pass at least one")
    x3, g3 = _as_3d(op, "x", x), _as_3d(op, "grad_out", grad_out)
    _check_factors(op, x3, g3, lora_a, lora_b, xa, gb)
    for name, f in (("fisher_a", fisher_a), ("fisher_b", fisher_b)):
        if f is not None and not isinstance(f, torch.Tensor):
            raise TypeError(f"forgetkern.{op}: {name} must be a Tensor or None, got {type(f).__name__}")
        if f is not None and not f.is_contiguous():
            raise ValueError(f"forgetkern.{op}: {name} is not contiguous (it is updated in place; pass a "
                             f"contiguous tensor)")
    # both Fishers are written: neither may share memory with the other or with any input (the second call
    # would read what the first one wrote)
    _validate.no_overlap(op, [("fisher_a", fisher_a), ("fisher_b", fisher_b)],
                         [("x", x3), ("grad_out", g3), ("lora_a", lora_a), ("lora_b", lora_b), ("xa", xa),
                          ("gb", gb), ("mask", mask if isinstance(mask, torch.Tensor) else None)])
    s2 = scale * scaling * scaling
    found = []
    with torch.no_grad():
        if fisher_b is not None:
            u = (x3 @ lora_a.detach().to(x3.dtype).t()) if xa is None else _as_3d(op, "xa", xa)
            found.append(linear_persample_sq_grad_(fisher_b, u, g3, scale=s2, mask=mask, granularity=granularity))
        if fisher_a is not None:
            v = (g3 @ lora_b.detach().to(g3.dtype)) if gb is None else _as_3d(op, "gb", gb)
            found.append(linear_persample_sq_grad_(fisher_a, x3, v, scale=s2, mask=mask, granularity=granularity))
    return found[0] if len(found) == 1 else torch.maximum(found[0], found[1])
