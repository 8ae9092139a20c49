"""Merging of task vectors, fused over a whole list of tensors and all N tasks in one pass over memory.

Math (the reference, ``forgetkern/reference/merge_task_vectors.py``, writes it out per element): for each
tensor ``t`` with base ``b`` and task vectors ``tau_k = x_k - b`` (``subtract_base``) or ``tau_k = x_k``::

    v_k   = prune(tau_k)      magnitude: tau_k [|tau_k| >= thr_{t,k}]        (TIES trim, thr precomputed)
                              random:    tau_k keep_k / (1 - p)              (DARE, counter-based hash mask)
    delta = sum_k w_k v_k                                                    (no consensus: task arithmetic)
          = sum_{k: sign(v_k) = sigma} w_k v_k,  sigma = sign(sum_k v_k)     (TIES sign election, disjoint sum)
    out   = b + lam * delta / div                                            (div: 1, |agreeing|, sum w_agreeing)

One kernel reads every ``x_{t,k}`` and ``b`` once and writes ``out`` once: the sign election needs no
second pass because the sums over the positive and over the negative entries are accumulated side by side
and the elected one is kept. Thresholds for the magnitude trim are inputs (one per tensor and task): the
exact ``k``-th largest ``|tau|``, computed beforehand (:func:`magnitude_thresholds`: ``torch.kthvalue``, on the
tensors' device, also for the cuda backend; on the cpp backend a C++ ``std::nth_element`` selection, parallel over
tensors and tasks, with the same result). Values
tied with the threshold are all kept, so the trim is deterministic; PEFT's ``topk`` / mergekit's ``argsort``
keep exactly ``k`` and drop the surplus ties in an order their sort decides (rare: 5 of 62 M elements differed
on Llama-7B-shaped random float32 task vectors).

The DARE mask of element ``i`` (flat index, plus the tensor's ``offset``) of task ``k`` in tensor ``t`` is the
LoRA dropout hash (``forgetkern/reference/lora_linear.py``) with the 32-bit key
``key_{t,k} = mix32(dropout_keys(seed, N)[k] + id_t * 0x9E3779B9)``: a merge is reproducible from
``(seed, tensor ids)`` on every backend and does not depend on how the tensors are batched or sharded.

Dtypes: bases and inputs float32/bfloat16/float16/float64 (all inputs of a tensor share one dtype, which may
differ from the base's); math in float32 (float64 when any operand is float64); ``out`` has the base's
dtype, rounded once.

Backends: torch (the reference), cpp (OpenMP), triton, cuda (``csrc/cuda/merge_task_vectors.cu``: multi-tensor
launches whose pointer tables, DARE keys and weights travel in the kernel arguments, so at most 64 tasks per call
on that backend; bit-identical to the reference like the cpp kernel).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from forgetkern import _backend, _ext, _validate
from forgetkern.reference import merge_task_vectors as ref
from forgetkern.reference.lora_linear import M32, ROW_MUL, dropout_keys, mix32

OP = _backend.register_op("merge_task_vectors")


def _triton():
    from forgetkern.triton import merge_task_vectors

    return merge_task_vectors


KERNELS = _backend.Kernels(
    OP,
    torch=lambda: ref.merge_task_vectors,
    cpp=lambda: _ext.cpu_ops().merge_task_vectors,
    cuda=lambda: _ext.cuda_ops().merge_task_vectors,
    triton=lambda: _triton().merge_task_vectors,
)

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_PRUNE = {"task_arithmetic": ref.PRUNE_NONE, "ties": ref.PRUNE_MAGNITUDE, "dare_linear": ref.PRUNE_RANDOM,
          "dare_ties": ref.PRUNE_RANDOM, "magnitude_prune": ref.PRUNE_MAGNITUDE}
_CONSENSUS = {"total": ref.CONSENSUS_TOTAL, "frequency": ref.CONSENSUS_FREQUENCY}
_NORMALIZE = {None: ref.NORM_NONE, "none": ref.NORM_NONE, "count": ref.NORM_COUNT, "weight": ref.NORM_WEIGHT}


@torch.library.custom_op("forgetkern::merge_task_vectors", mutates_args=())
def _merge_op(base: List[torch.Tensor], inputs: List[torch.Tensor], weights: List[float],
              thresholds: torch.Tensor, keys: List[int], offsets: List[int], prune: int, p: float,
              rescale: bool, consensus: int, sign_weighted: bool, normalize: int, lam: float,
              subtract_base: bool) -> List[torch.Tensor]:
    return KERNELS(base[0].device)(base, inputs, weights, thresholds, keys, offsets, prune, p, rescale, consensus, sign_weighted,
              normalize, lam, subtract_base)


@_merge_op.register_fake
def _(base, inputs, weights, thresholds, keys, offsets, prune, p, rescale, consensus, sign_weighted, normalize,
      lam, subtract_base):
    return [torch.empty_like(b, memory_format=torch.contiguous_format) for b in base]


def task_keys(seed: int, tensor_ids: Sequence[int], n_tasks: int) -> List[int]:
    """The 32-bit DARE keys ``key_{t,k}`` (tensor-major) for ``seed`` and the tensors' 32-bit ids."""
    per_task = dropout_keys(int(seed), n_tasks)
    return [mix32((kk + (int(tid) & M32) * ROW_MUL) & M32) for tid in tensor_ids for kk in per_task]


def magnitude_thresholds(taus: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """Per tensor: the ``k``-th largest ``|tau|`` with ``k = int(density * numel)`` (PEFT's count), so that
    ``|tau| >= thr`` keeps the top-``k`` entries by magnitude (ties at the threshold are all kept). Exact
    selection with ``torch.kthvalue``; ``+inf`` when ``k == 0`` (keep nothing), ``0`` when ``density >= 1``.
    Returns a 1-D tensor in the compute type (float32, or float64 for float64 inputs) on the tensors' device.
    """
    out = []
    for tau in taus:
        c = torch.float64 if tau.dtype == torch.float64 else torch.float32
        n = tau.numel()
        k = n if density >= 1 else int(density * n)
        if k >= n:
            out.append(torch.zeros((), dtype=c, device=tau.device))
        elif k == 0:
            out.append(torch.full((), math.inf, dtype=c, device=tau.device))
        else:
            a = tau.reshape(-1).to(c).abs()
            out.append(torch.kthvalue(a, n - k + 1).values)
    if not out:
        return torch.zeros(0, dtype=torch.float32)
    dt = torch.float64 if any(x.dtype == torch.float64 for x in out) else torch.float32
    return torch.stack([x.to(dt) for x in out])


def _thresholds(base, flat, n: int, density: float, subtract_base: bool, c: torch.dtype) -> torch.Tensor:
    """Magnitude thresholds of every (tensor, task) pair, tensor-major: the C++ selection (``std::nth_element``
    on a scratch copy of ``|tau|``, OpenMP over the pairs) when the op runs on the cpp backend, else
    :func:`magnitude_thresholds` (``torch.kthvalue``) one pair at a time. Both are exact: the same values."""
    if _backend.resolve(OP, base[0].device) == "cpp":
        return _ext.cpu_ops().merge_magnitude_thresholds(base, flat, n, density, subtract_base).to(c)
    thr = []
    for t in range(len(base)):
        for k in range(n):
            x = flat[t * n + k]
            tau = x.to(c) - base[t].to(c) if subtract_base else x
            thr.append(magnitude_thresholds([tau], density)[0])
    return torch.stack(thr).to(c)


def resolve_method(method: str, *, density: Optional[float], p: Optional[float], where: str) -> tuple:
    """``(prune code, drop rate p, density)`` for ``method`` with its sparsity arguments checked."""
    if method not in METHODS:
        raise ValueError(f"forgetkern.{where}: method must be one of {METHODS}, got {method!r}")
    prune = _PRUNE[method]
    for name, v in (("density", density), ("p", p)):
        if v is not None:
            v = _validate.check_float(where, name, v)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"forgetkern.{where}: {name} must be in [0, 1], got {v}")
    if prune == ref.PRUNE_MAGNITUDE:
        if density is None:
            raise ValueError(f"forgetkern.{where}: method={method!r} needs density= (the fraction of each task "
                             f"vector kept by magnitude, e.g. 0.2)")
        if p is not None:
            raise ValueError(f"forgetkern.{where}: p= is the DARE drop rate; method={method!r} trims by "
                             f"magnitude with density=")
        return prune, 0.0, float(density)
    if prune == ref.PRUNE_RANDOM:
        if p is None and density is None:
            raise ValueError(f"forgetkern.{where}: method={method!r} needs p= (the drop probability, e.g. 0.9) or "
                             f"density= (the keep probability, 1 - p, as PEFT names it)")
        if p is not None and density is not None and abs((1.0 - p) - density) > 1e-12:
            raise ValueError(f"forgetkern.{where}: p={p} and density={density} disagree (density is 1 - p); "
                             f"pass one of them")
        p = float(p) if p is not None else 1.0 - float(density)
        if p >= 1.0:
            raise ValueError(f"forgetkern.{where}: p must be < 1 for DARE (p=1 drops everything and the rescale "
                             f"1/(1-p) is undefined)")
        return prune, p, 1.0 - p
    if density is not None or p is not None:
        raise ValueError(f"forgetkern.{where}: method={method!r} does not prune; density= and p= apply to ties, "
                         f"magnitude_prune, dare_linear and dare_ties")
    return prune, 0.0, 1.0


def _check(where, base, task_vectors, weights):
    base = _validate.tensor_list(where, "base", base)
    if isinstance(task_vectors, torch.Tensor) or not isinstance(task_vectors, (list, tuple)):
        raise TypeError(f"forgetkern.{where}: task_vectors must be a list of N lists of tensors (one list per "
                        f"task, parallel to base), got {type(task_vectors).__name__}")
    tvs = [_validate.tensor_list(where, f"task_vectors[{k}]", tv) for k, tv in enumerate(task_vectors)]
    n = len(tvs)
    if n == 0:
        raise ValueError(f"forgetkern.{where}: task_vectors is empty; pass at least one task")
    for k, tv in enumerate(tvs):
        if len(tv) != len(base):
            raise ValueError(f"forgetkern.{where}: task_vectors[{k}] has {len(tv)} tensors but base has "
                             f"{len(base)}; each task's list is parallel to base")
    if weights is None:
        weights = [1.0] * n
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if not isinstance(weights, (list, tuple)) or len(weights) != n:
        raise ValueError(f"forgetkern.{where}: weights must be a list of {n} floats (one per task), got "
                         f"{weights!r}")
    weights = [_validate.check_float(where, f"weights[{k}]", w) for k, w in enumerate(weights)]
    device = base[0].device if base else torch.device("cpu")
    for t, b in enumerate(base):
        for name, x in [("base", b)] + [(f"task_vectors[{k}]", tvs[k][t]) for k in range(n)]:
            label = f"forgetkern.{where}: {name}[{t}]" if name != "base" else f"forgetkern.{where}: base[{t}]"
            if x.layout != torch.strided:
                raise TypeError(f"{label} must be a dense (strided) tensor, got layout {x.layout}")
            if x.dtype not in _validate.FLOAT_DTYPES:
                raise TypeError(f"{label} has dtype {x.dtype}; expected one of float32, float16, bfloat16, "
                                f"float64")
            if x.device != device:
                raise ValueError(f"{label} is on {x.device} but base[0] is on {device}; all tensors must be on "
                                 f"one device")
            if x.shape != b.shape:
                raise ValueError(f"{label} has shape {tuple(x.shape)} but base[{t}] has shape {tuple(b.shape)}")
        dts = {tvs[k][t].dtype for k in range(n)}
        if len(dts) > 1:
            raise TypeError(f"forgetkern.{where}: the task vectors of tensor {t} have dtypes {sorted(map(str, dts))};"
                            f" the N inputs of one tensor must share one dtype (cast them)")
    return base, tvs, weights, device


def merge_task_vectors(base, task_vectors, *, method: str = "task_arithmetic", weights=None,
                       density: Optional[float] = None, p: Optional[float] = None, lam: float = 1.0,
                       seed: int = 0, tensor_ids: Optional[Sequence[int]] = None,
                       offsets: Optional[Sequence[int]] = None, thresholds: Optional[torch.Tensor] = None,
                       subtract_base: bool = False, sign: str = "total", sign_weighted: bool = False,
                       normalize: Optional[str] = "default", rescale: bool = True) -> List[torch.Tensor]:
    """Merge N task vectors into ``T`` base tensors in one fused pass; returns the ``T`` merged tensors.

    Args:
        base: ``T`` base tensors ``b_t`` (the pre-trained weights, or zeros to get the merged delta).
        task_vectors: N lists (one per task) of ``T`` tensors shaped like ``base``: the task vectors
            ``tau_{t,k}``, or the fine-tuned weights with ``subtract_base=True`` (``tau = x - b`` on the fly,
            no task-vector copy).
        method: ``task_arithmetic`` (``b + lam sum_k w_k tau_k``), ``ties`` (trim to ``density`` by
            magnitude, elect signs, disjoint mean), ``dare_linear`` (drop with probability ``p``, rescale by
            ``1/(1-p)``, weighted sum), ``dare_ties`` (DARE drop then the TIES election and mean),
            ``magnitude_prune`` (trim by magnitude, weighted sum).
        weights: N floats (default all 1).
        density / p: the kept fraction for the magnitude trim; the DARE drop rate (or its ``density = 1 - p``).
        lam: scale of the merged delta (TIES' lambda).
        seed, tensor_ids, offsets: the DARE mask's seed, per-tensor 32-bit ids (default ``0..T-1``) and flat
            element offsets (default 0; a tile of a larger tensor passes its first element's index).
        thresholds: precomputed magnitude thresholds (``T * N``, tensor-major, compute dtype), else computed
            here with :func:`magnitude_thresholds`.
        sign: ``total`` (sign of the sum, TIES/PEFT default) or ``frequency`` (sign of the count).
        sign_weighted: vote with ``w_k v_k`` (mergekit) instead of ``v_k`` (PEFT, the TIES paper).
        normalize: ``none``, ``count`` (divide by the number of agreeing entries: PEFT's disjoint mean; the
            default for ties/dare_ties; with no election, by N) or ``weight`` (by the sum of the agreeing
            weights: mergekit's ``normalize``; with no election, by ``sum w``).
        rescale: DARE's ``1/(1-p)`` rescale (default True).
    """
    where = "merge_task_vectors"
    base, tvs, weights, device = _check(where, base, task_vectors, weights)
    prune, p, density = resolve_method(method, density=density, p=p, where=where)
    if sign not in _CONSENSUS:
        raise ValueError(f"forgetkern.{where}: sign must be 'total' or 'frequency', got {sign!r}")
    consensus = _CONSENSUS[sign] if method in ("ties", "dare_ties") else ref.CONSENSUS_NONE
    if normalize == "default":
        normalize = "count" if consensus != ref.CONSENSUS_NONE else "none"
    if normalize not in _NORMALIZE:
        raise ValueError(f"forgetkern.{where}: normalize must be 'none', 'count' or 'weight', got {normalize!r}")
    lam = _validate.check_float(where, "lam", lam)
    T, n = len(base), len(tvs)
    if T == 0:
        return []
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"forgetkern.{where}: seed must be an int, got {type(seed).__name__}")
    tensor_ids = list(range(T)) if tensor_ids is None else [int(i) for i in tensor_ids]
    offsets = [0] * T if offsets is None else [int(o) for o in offsets]
    for name, xs in (("tensor_ids", tensor_ids), ("offsets", offsets)):
        if len(xs) != T:
            raise ValueError(f"forgetkern.{where}: {name} has {len(xs)} entries but base has {T}")
    if any(o < 0 for o in offsets):
        raise ValueError(f"forgetkern.{where}: offsets must be >= 0, got {offsets}")
    base = [b.contiguous() for b in base]
    flat = [tvs[k][t].contiguous() for t in range(T) for k in range(n)]
    c = torch.float64 if any(x.dtype == torch.float64 for x in base + flat) else torch.float32
    if prune == ref.PRUNE_MAGNITUDE:
        if thresholds is None:
            thresholds = _thresholds(base, flat, n, density, bool(subtract_base), c)
        else:
            if not isinstance(thresholds, torch.Tensor) or thresholds.numel() != T * n:
                raise ValueError(f"forgetkern.{where}: thresholds must be a tensor of T * N = {T * n} values "
                                 f"(tensor-major), got {thresholds!r}")
            thresholds = thresholds.reshape(-1).to(device=device, dtype=c).contiguous()
    else:
        thresholds = torch.zeros(0, dtype=c, device=device)
    keys = task_keys(seed, tensor_ids, n) if prune == ref.PRUNE_RANDOM else []
    return _merge_op(base, flat, weights, thresholds, keys, offsets, prune, p, bool(rescale), consensus,
                     bool(sign_weighted), _NORMALIZE[normalize], lam, bool(subtract_base))
