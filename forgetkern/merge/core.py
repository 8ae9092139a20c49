"""Merging of whole-model state dicts (see :mod:`forgetkern.merge`)."""

from __future__ import annotations

import zlib
from typing import Dict, Mapping, Optional, Sequence

import torch

from forgetkern.ops.merge_task_vectors import merge_task_vectors, resolve_method


def tensor_id(name: str) -> int:
    """The 32-bit id of a named tensor in the DARE key: ``zlib.crc32`` of its UTF-8 name."""
    return zlib.crc32(name.encode("utf-8")) & 0xFFFFFFFF


def merge_kwargs(where: str, method: str, n: int, weights, density, p, lam, seed, sign, sign_weighted, normalize,
                 rescale) -> dict:
    """The keyword arguments of :func:`merge_task_vectors`, checked once for a whole merge."""
    resolve_method(method, density=density, p=p, where=where)
    if weights is not None and (not isinstance(weights, (list, tuple)) or len(weights) != n):
        raise ValueError(f"forgetkern.{where}: weights must be a list of {n} floats (one per fine-tuned model or "
                         f"adapter), got {weights!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"forgetkern.{where}: seed must be an int, got {type(seed).__name__}")
    return dict(method=method, weights=None if weights is None else list(weights), density=density, p=p, lam=lam,
                seed=seed, sign=sign, sign_weighted=sign_weighted, normalize=normalize, rescale=rescale)


def _check_sds(where: str, base_sd, ft_sds) -> None:
    if not isinstance(base_sd, Mapping):
        raise TypeError(f"forgetkern.{where}: base_sd must be a state dict (a mapping name -> tensor), got "
                        f"{type(base_sd).__name__}")
    if isinstance(ft_sds, Mapping) or not isinstance(ft_sds, (list, tuple)) or not ft_sds:
        raise TypeError(f"forgetkern.{where}: ft_sds must be a non-empty list of state dicts (one per fine-tuned "
                        f"model), got {type(ft_sds).__name__}")
    for k, sd in enumerate(ft_sds):
        if not isinstance(sd, Mapping):
            raise TypeError(f"forgetkern.{where}: ft_sds[{k}] must be a state dict, got {type(sd).__name__}")


def mergeable(name: str, base: torch.Tensor) -> bool:
    return isinstance(base, torch.Tensor) and base.is_floating_point()


def merge_models(base_sd: Mapping[str, torch.Tensor], ft_sds: Sequence[Mapping[str, torch.Tensor]], *,
                 method: str = "task_arithmetic", weights: Optional[Sequence[float]] = None,
                 density: Optional[float] = None, p: Optional[float] = None, lam: float = 1.0, seed: int = 0,
                 sign: str = "total", sign_weighted: bool = False, normalize: Optional[str] = "default",
                 rescale: bool = True, names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """Merge fine-tuned models into their base: ``base + lam * combine_k(w_k * prune(ft_k - base))``.

    ``method``: ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (see
    :func:`forgetkern.merge_task_vectors` for every parameter). The task vectors ``ft_k - base`` are formed on
    the fly inside the kernel (no copy), except one at a time to find the TIES thresholds. Floating-point
    tensors named in ``names`` (default: all of ``base_sd``) are merged; other entries (integer buffers) are
    copied from ``base_sd``. Every merged name must exist in every fine-tuned state dict with the base's shape.
    Returns a new state dict in the base's dtypes.
    """
    where = "merge_models"
    _check_sds(where, base_sd, ft_sds)
    kw = merge_kwargs(where, method, len(ft_sds), weights, density, p, lam, seed, sign, sign_weighted, normalize,
                      rescale)
    todo = list(base_sd) if names is None else list(names)
    for name in todo:
        if name not in base_sd:
            raise KeyError(f"forgetkern.{where}: {name!r} (in names) is not in base_sd")
    merge_names = [n for n in todo if mergeable(n, base_sd[n])]
    for k, sd in enumerate(ft_sds):
        for name in merge_names:
            if name not in sd:
                raise KeyError(f"forgetkern.{where}: ft_sds[{k}] has no tensor {name!r} (present in base_sd); "
                               f"pass names= to merge a subset")
            if tuple(sd[name].shape) != tuple(base_sd[name].shape):
                raise ValueError(f"forgetkern.{where}: ft_sds[{k}][{name!r}] has shape {tuple(sd[name].shape)} "
                                 f"but the base has {tuple(base_sd[name].shape)}")
    out = {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in base_sd.items() if n not in merge_names}
    if merge_names:
        base = [base_sd[n].detach() for n in merge_names]
        tvs = [[sd[n].detach().to(base_sd[n].device) for n in merge_names] for sd in ft_sds]
        merged = merge_task_vectors(base, tvs, subtract_base=True, tensor_ids=[tensor_id(n) for n in merge_names],
                                    **kw)
        out.update(zip(merge_names, merged))
    return {n: out[n] for n in base_sd if n in out}


def wise_ft(base_sd: Mapping[str, torch.Tensor], ft_sd: Mapping[str, torch.Tensor], alpha: float = 0.5,
            **kwargs) -> Dict[str, torch.Tensor]:
    """WiSE-FT (Wortsman et al. 2022): the linear interpolation ``(1 - alpha) * base + alpha * ft`` of a
    fine-tuned model with its base, computed as ``base + alpha * (ft - base)`` in float32 (one rounding to the
    base dtype; equal to the interpolation up to float32 rounding). ``alpha = 0`` gives the base, ``1`` the
    fine-tuned model."""
    from forgetkern import _validate

    alpha = _validate.check_float("wise_ft", "alpha", alpha)
    return merge_models(base_sd, [ft_sd], method="task_arithmetic", weights=[alpha], **kwargs)
