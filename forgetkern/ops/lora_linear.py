"""Fused LoRA linear with a frozen base: ``y = x W^T + b + sum_k s_k (drop_k(x) A_k^T B_k^T + lora_bias_k)``.

Public API::

    lora_linear(x, weight, bias, adapters, *, training, seed=None) -> Tensor
    lora_linear_siblings(x, weights, biases, adapters_per_layer, *, training, seed=None) -> list[Tensor]
    LoraAdapter(lora_a [r, in], lora_b [out, r], scaling, dropout_p=0.0, lora_bias=None)

* ``weight`` is the frozen base: its gradient is NEVER computed (if it requires grad, it gets none and a
  warning is issued once). ``bias`` may be trainable (then ``db = sum dy``). ``lora_bias`` is PEFT's
  ``lora_B.bias`` and is scaled by ``scaling`` like the rest of the branch (PEFT: ``lora_B(...) * scaling``).
* Several adapters are summed. ``scaling`` is read at call time (a Python float).
* Dropout is active iff ``training`` and ``dropout_p > 0``. Masks come from a counter-based hash of
  (seed, adapter, row, column), identical on every backend, regenerated in the backward (never stored).
  ``seed=None`` draws one from torch's default generator of the device, so ``torch.manual_seed`` reproduces.
* Forward writes base and LoRA into ONE output buffer; saved for backward: ``x`` and the rank-r product
  ``xa = drop(x) A^T`` only. Backward: ``dx``, ``dA``, ``dB`` (+ ``db``, ``dlora_bias`` when they require
  grad), with the scaling folded into the rank-r products.
* All tensors must share one dtype (float32/float16/bfloat16; float64 runs on the torch and cpp backends) and one
  device. Under autocast, cast at the module level first (PEFT casts ``x`` to ``lora_A.weight.dtype``).
  One exception, PEFT's default layout for half models (``autocast_adapter_dtype``): float32 adapters on a
  float16/bfloat16 ``x`` and base, with PEFT's numerics (``MixedFn``: base in 16 bits, the branch in float32 on
  the upcast input, the sum rounded once); torch and cpp backends, eager mode.

Fisher option: an adapter given ``fisher=LoraFisher(...)`` has the squared per-sample gradients of its
factors added to the sink's buffers by the backward (``forgetkern/ops/lora_fisher.py``).

Eager calls on the torch and cpp backends run a plain ``autograd.Function`` (``forgetkern/ops/_lora_eager.py``);
the custom ops below serve ``torch.compile``, tracing and the GPU backends.

``lora_linear_siblings`` serves layers that read the same ``x`` (q/k/v, gate/up): the adapters without
active dropout compute ``x [A_q | A_k | A_v]^T`` in ONE GEMM and their ``dx`` contributions
``[g_q | g_k | g_v] [A_q; A_k; A_v]`` in ONE GEMM. An adapter with active dropout gets its own GEMMs:
independent dropout masks make the inputs ``drop_q(x)``, ``drop_k(x)`` differ, so nothing can be shared.

On CUDA tensors: ``triton`` (the ``auto`` choice) fuses the frozen GEMM and the LoRA branch in one kernel;
``cuda`` (``csrc/cuda/lora_linear.{cpp,cu}``) follows punica / S-LoRA: cuBLAS computes ``x W^T + b`` (and
``dy W``) into the output buffer, then rank-r kernels do the rest, every adapter in one launch: shrink
``xa = [drop_1(x) A_1^T | ...]`` (and ``g = [s_1 dy B_1 | ...]``), expand ``y += sum s_k xa_k B_k^T`` (and
``dx += sum drop_k(g_k A_k)``) in place, and the dropout-masked ``dA``; masks hashed in the kernels.
"""

from __future__ import annotations

import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from forgetkern import _backend, _ext
from forgetkern.ops._lora_eager import EagerFn, MixedFn, eager, lora_grads
from forgetkern.ops.lora_fisher import LoraFisher, attach_fisher, check_fisher
from forgetkern.reference import lora_linear as lref
from forgetkern.reference.lora_linear import dropout_keys

OP = _backend.register_op("lora_linear")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


class LoraAdapter(NamedTuple):
    lora_a: Tensor                      # [r, in]   (PEFT lora_A.weight)
    lora_b: Tensor                      # [out, r]  (PEFT lora_B.weight)
    scaling: float                      # PEFT lora_alpha / r (or alpha / sqrt(r) with rslora)
    dropout_p: float = 0.0
    lora_bias: Optional[Tensor] = None  # [out]     (PEFT lora_B.bias, scaled by ``scaling``)
    fisher: Optional[LoraFisher] = None  # per-sample Fisher of this adapter's factors, added by the backward


def _supported(x: Tensor) -> tuple:
    if x.dtype == torch.float64:
        return ("torch", "cpp")
    return ("torch", "cpp", "triton", "cuda")


def _impl_name(x: Tensor) -> str:
    # auto on CUDA prefers the Triton kernels over the CUDA C++ backend (cuBLAS + rank-r kernels; see
    # forgetkern._backend._AUTO_ORDER_BY_OP)
    return _backend.resolve(OP, x.device, supported=_supported(x))


def _triton():
    from forgetkern.triton import lora_linear

    return lora_linear


def _cpp():
    from forgetkern.cpu import lora_linear  # the reference's GEMMs with the C++ dropout kernels

    return lora_linear


FWD_KERNELS = _backend.Kernels(
    OP,
    torch=lambda: lref.lora_linear_fwd,
    cpp=lambda: _cpp().lora_linear_fwd,
    cuda=lambda: _ext.cuda_ops().lora_linear_fwd,
    triton=lambda: _triton().lora_linear_fwd,
)
BWD_KERNELS = _backend.Kernels(
    OP,
    torch=lambda: lref.lora_linear_bwd,
    cpp=lambda: _cpp().lora_linear_bwd,
    cuda=lambda: _ext.cuda_ops().lora_linear_bwd,
    triton=lambda: _triton().lora_linear_bwd,
)


def eager_kernels(backend: str):
    """``(fwd, bwd)`` for :class:`EagerFn` when ``backend`` runs eagerly (torch GEMMs on the host), else None."""
    if backend not in ("torch", "cpp"):
        return None
    return FWD_KERNELS.get(backend), BWD_KERNELS.get(backend)


@torch.library.custom_op("forgetkern::lora_linear_fwd", mutates_args=())
def _fwd_op(x: Tensor, weights: List[Tensor], biases: List[Tensor], bias_layer: List[int], lora_a: List[Tensor],
            lora_b: List[Tensor], layer: List[int], scaling: List[float], dropout_p: List[float],
            keys: List[int]) -> Tuple[List[Tensor], Tensor]:
    return FWD_KERNELS(x.device, supported=_supported(x))(x, weights, biases, bias_layer, lora_a, lora_b, layer, scaling,
                                        dropout_p, keys)


@_fwd_op.register_fake
def _(x, weights, biases, bias_layer, lora_a, lora_b, layer, scaling, dropout_p, keys):
    m = x.shape[0]
    return [x.new_empty((m, w.shape[0])) for w in weights], x.new_empty((m, sum(a.shape[0] for a in lora_a)))


@torch.library.custom_op("forgetkern::lora_linear_bwd", mutates_args=())
def _bwd_op(dys: List[Tensor], x: Tensor, weights: List[Tensor], lora_a: List[Tensor], lora_b: List[Tensor],
            xa: Tensor, layer: List[int], scaling: List[float], dropout_p: List[float], keys: List[int],
            need_dx: bool, need_da: bool, need_db: bool) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    return BWD_KERNELS(x.device, supported=_supported(x))(dys, x, weights, lora_a, lora_b, xa, layer, scaling, dropout_p, keys,
                                        need_dx, need_da, need_db)


@_bwd_op.register_fake
def _(dys, x, weights, lora_a, lora_b, xa, layer, scaling, dropout_p, keys, need_dx, need_da, need_db):
    e = x.new_empty((0,))
    return (x.new_empty(x.shape) if need_dx else e, [a.new_empty(a.shape) if need_da else e for a in lora_a],
            [b.new_empty(b.shape) if need_db else e for b in lora_b])


def _setup_context(ctx, inputs, output):
    x, weights, biases, bias_layer, lora_a, lora_b, layer, scaling, dropout_p, keys = inputs
    ys, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, xa, *weights, *lora_a, *lora_b)
    ctx.meta = (len(weights), len(lora_a), list(layer), list(scaling), list(dropout_p), list(keys),
                list(bias_layer))
    ctx.need = (x.requires_grad, [a.requires_grad for a in lora_a], [b.requires_grad for b in lora_b],
                [b.requires_grad for b in biases])


def _backward(ctx, dys, _dxa):
    n_l, n_ad, layer, scaling, dropout_p, keys, bias_layer = ctx.meta
    need_dx, need_a, need_b, need_bias = ctx.need
    saved = ctx.saved_tensors
    x, xa, weights = saved[0], saved[1], list(saved[2:2 + n_l])
    lora_a, lora_b = list(saved[2 + n_l:2 + n_l + n_ad]), list(saved[2 + n_l + n_ad:])
    dx, d_a, d_b, d_bias = lora_grads(_bwd_op, dys, x, xa, weights, lora_a, lora_b, layer, scaling, dropout_p,
                                      keys, bias_layer, need_dx, need_a, need_b, need_bias)

    def nog(v):  # an empty non-tensor list is flattened like an (empty) tensor list: mirror its structure
        return [] if len(v) == 0 else None

    return (dx, [None] * n_l, d_bias, nog(bias_layer), d_a, d_b, nog(layer), nog(scaling), nog(dropout_p),
            nog(keys))


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


_warned_weight = False


def _name(where: str, what: str) -> str:
    return f"forgetkern.lora_linear: {where}{what}"


def _check_tensor(t, name: str, ref: Tensor, shape: tuple, dtype: Optional[torch.dtype] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(_name(name, f" must be a Tensor, got {type(t).__name__}"))
    if dtype is not None and t.dtype != dtype:
        raise TypeError(_name(name, f" has dtype {t.dtype} but lora_a has {dtype}; an adapter's tensors share "
                                    f"one dtype"))
    if dtype is None and t.dtype != ref.dtype:
        raise TypeError(_name(name, f" has dtype {t.dtype} but x has {ref.dtype}; all tensors must share one "
                                    f"dtype, except float32 adapters on a float16/bfloat16 x and base (cast at "
                                    f"the module level, as PEFT does under autocast)"))
    if t.device != ref.device:
        raise ValueError(_name(name, f" is on {t.device} but x is on {ref.device}"))
    if tuple(t.shape) != shape:
        raise ValueError(_name(name, f" has shape {tuple(t.shape)}, expected {shape}"))


def _check_layer(x: Tensor, weight, bias, adapters, li: Optional[int]):
    where = "" if li is None else f"[{li}]"
    k_in = x.shape[-1]
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(_name(f"weight{where}", " must be a 2-D Tensor [out, in]"))
    n_out = weight.shape[0]
    _check_tensor(weight, f"weight{where}", x, (n_out, k_in))
    if bias is not None:
        _check_tensor(bias, f"bias{where}", x, (n_out,))
    if isinstance(adapters, LoraAdapter) or not isinstance(adapters, (list, tuple)):
        raise TypeError(_name(f"adapters{where}", " must be a sequence of LoraAdapter"))
    for i, ad in enumerate(adapters):
        w = f"adapters{where}[{i}]"
        if not isinstance(ad, LoraAdapter):
            raise TypeError(_name(w, f" must be a LoraAdapter, got {type(ad).__name__}"))
        if not isinstance(ad.lora_a, Tensor) or ad.lora_a.dim() != 2:
            raise ValueError(_name(w, ".lora_a must be a 2-D Tensor [r, in]"))
        r = ad.lora_a.shape[0]
        mixed = ad.lora_a.dtype == torch.float32 and x.dtype in _HALF
        _check_tensor(ad.lora_a, f"{w}.lora_a", x, (r, k_in), torch.float32 if mixed else None)
        if not isinstance(ad.lora_b, Tensor) or ad.lora_b.dim() != 2 or ad.lora_b.shape[1] != r:
            got = tuple(ad.lora_b.shape) if isinstance(ad.lora_b, Tensor) else type(ad.lora_b).__name__
            raise ValueError(_name(w, f".lora_b must be [out, r] = [{n_out}, {r}] (its columns = lora_a's rows, "
                                      f"the rank), got {got}"))
        _check_tensor(ad.lora_b, f"{w}.lora_b", x, (n_out, r), torch.float32 if mixed else None)
        if ad.lora_bias is not None:
            _check_tensor(ad.lora_bias, f"{w}.lora_bias", x, (n_out,), torch.float32 if mixed else None)
        if ad.fisher is not None:
            check_fisher(ad.fisher, w, x, (r, k_in), (n_out, r))
        for attr in ("scaling", "dropout_p"):
            v = getattr(ad, attr)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
                raise TypeError(_name(w, f".{attr} must be a finite Python float, got {v!r}"))
        if not 0.0 <= ad.dropout_p <= 1.0:
            raise ValueError(_name(w, f".dropout_p must be in [0, 1], got {ad.dropout_p}"))
    if len({ad.lora_a.dtype for ad in adapters}) > 1:
        raise TypeError(_name(f"adapters{where}", f" mix dtypes {sorted(str(ad.lora_a.dtype) for ad in adapters)}; "
                                                  f"the adapters of one layer share one dtype"))
    global _warned_weight
    if weight.requires_grad and torch.is_grad_enabled() and not _warned_weight:
        _warned_weight = True
        warnings.warn("forgetkern.lora_linear: weight requires grad, but the base weight is treated as frozen: "
                      "its gradient is not computed", stacklevel=3)


def _draw_seed(device: torch.device) -> int:
    """A 63-bit seed from torch's default generator of ``device`` (advances it; no device sync)."""
    if device.type == "cuda":
        gen = torch.cuda.default_generators[device.index if device.index is not None
                                            else torch.cuda.current_device()]
        try:
            off = gen.get_offset()
            gen.set_offset(off + 4)
            return (gen.initial_seed() * 0x9E3779B97F4A7C15 + off) & ((1 << 63) - 1)
        except (AttributeError, RuntimeError):
            pass
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64, generator=torch.default_generator))


def _check_x(x, seed) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(_name("x", f" must be a Tensor, got {type(x).__name__}"))
    if x.dtype not in _DTYPES:
        raise TypeError(_name("x", f" has dtype {x.dtype}; expected float32, float16, bfloat16 or float64"))
    if x.dim() < 1:
        raise ValueError(_name("x", " must have at least one dimension [..., in]"))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(_name("seed", f" must be an int or None, got {type(seed).__name__}"))


def mixed_supported(x: Tensor) -> bool:
    """Whether float32 adapters on a 16-bit ``x`` (``MixedFn``) can run for ``x``: the torch and cpp
    backends, eagerly. Elsewhere such a call raises (``forgetkern.patch`` leaves it on PEFT's path)."""
    return x.dtype in _HALF and eager_kernels(_impl_name(x)) is not None and eager((x,))


class _Flat(NamedTuple):
    """The adapters of one call, flattened in call order (adapter ``k`` belongs to layer ``layer[k]``)."""
    lora_a: List[Tensor]
    lora_b: List[Tensor]
    layer: List[int]
    scaling: List[float]
    dropout_p: List[float]         # 0 where dropout is inactive (eval)
    keys: List[int]                # dropout keys (0 when no adapter has active dropout)
    lora_bias: List[List[Tensor]]  # per layer: the s_k * lora_bias_k terms (vectors [out])
    sinks: list                    # (k, LoraFisher) for the adapters with the Fisher option


def _flatten(per_layer, training: bool, seed: Optional[int], device: torch.device) -> _Flat:
    f = _Flat([], [], [], [], [], [], [[] for _ in per_layer], [])
    for li, ads in enumerate(per_layer):
        for ad in ads:
            if ad.fisher is not None:
                f.sinks.append((len(f.lora_a), ad.fisher))
            f.lora_a.append(ad.lora_a.contiguous())
            f.lora_b.append(ad.lora_b.contiguous())
            f.layer.append(li)
            f.scaling.append(float(ad.scaling))
            f.dropout_p.append(float(ad.dropout_p) if training else 0.0)
            if ad.lora_bias is not None:  # an [out] vector: folding it into a bias costs nothing of x's size
                f.lora_bias[li].append(ad.lora_bias * float(ad.scaling))
    n = len(f.lora_a)
    f.keys.extend(dropout_keys(_draw_seed(device) if seed is None else seed, n)
                  if any(p > 0 for p in f.dropout_p) else [0] * n)
    return f


def _run_mixed(x2: Tensor, lead, weight: Tensor, bias: Optional[Tensor], ads, training: bool,
               seed: Optional[int]) -> Tensor:
    if not mixed_supported(x2):
        raise TypeError(_name("adapters", f" are float32 on a {x2.dtype} x: this mixed precision runs on the torch "
                                          f"and cpp backends in eager mode only (backend here: "
                                          f"{_impl_name(x2)}); cast the adapters to x's dtype"))
    f = _flatten([ads], training, seed, x2.device)
    lbias = None
    for lb in f.lora_bias[0]:
        lbias = lb if lbias is None else lbias + lb
    weight = weight if weight.is_contiguous() or weight.t().is_contiguous() else weight.contiguous()
    meta = (f.layer, f.scaling, f.dropout_p, f.keys)
    y, xa = MixedFn.apply(eager_kernels(_impl_name(x2)), meta, x2, weight, bias, lbias, *f.lora_a, *f.lora_b)
    if f.sinks and torch.is_grad_enabled():
        attach_fisher(f.sinks, [y], x2, xa, lead, f.lora_a, f.lora_b, f.layer, f.scaling, f.dropout_p, f.keys)
    return y.view(*lead, y.shape[-1])


def _run(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], per_layer, training: bool,
         seed: Optional[int]) -> List[Tensor]:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    if any(ad.lora_a.dtype != x.dtype for ads in per_layer for ad in ads):  # float32 adapters, 16-bit x
        if len(weights) > 1:  # siblings: layer by layer (each layer's dropout keys from its own seed)
            return [_run(x, [w], [b], [ads], training, None if seed is None else (seed + li * 0x9E3779B97F4A7C15)
                         & ((1 << 63) - 1))[0] for li, (w, b, ads) in enumerate(zip(weights, biases, per_layer))]
        return [_run_mixed(x2, lead, weights[0], biases[0], per_layer[0], training, seed)]
    f = _flatten(per_layer, training, seed, x.device)
    bias_all, bias_layer = [], []
    for li, bias in enumerate(biases):
        for lb in f.lora_bias[li]:
            bias = lb if bias is None else bias + lb
        if bias is not None:
            bias_all.append(bias.contiguous())
            bias_layer.append(li)
    args = (f.lora_a, f.lora_b, f.layer, f.scaling, f.dropout_p, f.keys)
    kernels = eager_kernels(_impl_name(x2))
    if kernels is not None and eager((x2, *weights, *bias_all, *f.lora_a, *f.lora_b)):
        # the torch / cpp kernels hand W to BLAS with a transpose flag: a transposed view (GPT-2 Conv1D stores
        # [in, out]) is used as it is, without a per-call copy
        weights = [w if w.is_contiguous() or w.t().is_contiguous() else w.contiguous() for w in weights]
        meta = (len(weights), len(bias_all), len(f.lora_a), bias_layer, f.layer, f.scaling, f.dropout_p, f.keys)
        *ys, xa = EagerFn.apply(kernels, meta, x2, *weights, *bias_all, *f.lora_a, *f.lora_b)
    else:
        weights = [w.contiguous() for w in weights]
        ys, xa = _fwd_op(x2, weights, bias_all, bias_layer, *args)
    if f.sinks and torch.is_grad_enabled():
        attach_fisher(f.sinks, ys, x2, xa, lead, *args)
    return [y.view(*lead, y.shape[-1]) for y in ys]


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[LoraAdapter], *,
                training: bool, seed: Optional[int] = None) -> Tensor:
    """``x W^T + b + sum_k s_k (drop_k(x) A_k^T B_k^T + lora_bias_k)`` for ``x`` [..., in] (module docstring)."""
    _check_x(x, seed)
    _check_layer(x, weight, bias, adapters, None)
    return _run(x, [weight], [bias], [list(adapters)], bool(training), seed)[0]


def lora_linear_planned(x: Tensor, weights: List[Tensor], biases: List[Optional[Tensor]], per_layer, *,
                        training: bool) -> List[Tensor]:
    """:func:`lora_linear_siblings` without the argument checks, for ``forgetkern.patch``: its plan reads the
    arguments off PEFT layers and validates the dtype, device and size of each one before the call (the checks
    cost about as much as a small layer's whole LoRA branch)."""
    return _run(x, weights, biases, per_layer, training, None)


def lora_linear_siblings(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                         adapters_per_layer: Sequence[Sequence[LoraAdapter]], *, training: bool,
                         seed: Optional[int] = None) -> List[Tensor]:
    """:func:`lora_linear` for several layers reading the same ``x``, horizontally fused (module docstring).

    Every adapter of every layer gets its own dropout mask (one seed per call is enough).
    """
    _check_x(x, seed)
    if not (len(weights) == len(biases) == len(adapters_per_layer)) or not weights:
        raise ValueError(_name("weights", f", biases and adapters_per_layer must be non-empty and have equal "
                                          f"lengths, got {len(weights)}, {len(biases)}, {len(adapters_per_layer)}"))
    for li, (w, b, ads) in enumerate(zip(weights, biases, adapters_per_layer)):
        _check_layer(x, w, b, ads, li)
    return _run(x, list(weights), list(biases), [list(a) for a in adapters_per_layer], bool(training), seed)
