"""Low-rank projection ``project_out_``: remove protected subspaces from many matrices, in place, in one call.

Math, per layer ``i`` (the shared step of OPLoRA and GPM / InfLoRA-style gradient projection)::

    side="left":  X_i <- X_i - U_i (U_i^T X_i)     X_i (m_i x n_i), U_i (m_i x k_i)   e.g. LoRA B (out x r), U_k
    side="right": X_i <- X_i - (X_i V_i) V_i^T     X_i (n_i x m_i), V_i (m_i x k_i)   e.g. LoRA A (r x in), V_k

``U_i`` / ``V_i`` have orthonormal columns (then the map is the orthogonal projection onto the complement of
their span, and applying it twice changes nothing). The dense projector ``I - U U^T`` (m x m) is never formed:
two skinny products per layer, ``O(m n k)`` work. The math runs in float32 (float64 for float64 inputs), the
result is rounded once to ``X_i``'s dtype. ``k_i = 0`` leaves ``X_i`` as it is. Backends: ``torch`` (one ``mm`` and
one in-place ``addmm_`` per layer: the CPU path), ``triton`` (one launch per dtype pair, one program per layer,
the basis processed in column blocks) and ``cuda`` (csrc/cuda/project_out.cu: one launch per dtype pair over a
(layer, 32-column tile) grid, the layer table in the kernel arguments, ``U`` slabs and ``C = U^T X`` staged in
shared memory; bases with ``k <= 128`` columns, larger ones run on ``triton`` / ``torch``). float64 runs on
``torch``.
"""

from __future__ import annotations

from typing import List

import torch

from forgetkern import _backend, _ext, _validate
from forgetkern.reference import project_out as reference
from forgetkern.reference.project_out import SIDES

OP = _backend.register_op("project_out_")


def _triton():
    from forgetkern.triton import project_out

    return project_out


KERNELS = _backend.Kernels(OP, torch=lambda: reference.project_out_, triton=lambda: _triton().project_out_,
                           cuda=lambda: _ext.cuda_ops().project_out_)
CUDA_MAX_K = 128  # basis columns the CUDA kernel stages in shared memory (kProjMaxK in csrc/include/forgetkern/project_out.h)


@torch.library.custom_op("forgetkern::project_out_", mutates_args=("tensors",))
def _project_out_op(tensors: List[torch.Tensor], bases: List[torch.Tensor], side: str) -> None:
    # the Triton and CUDA kernels compute in float32: float64 inputs run on the torch backend; the CUDA kernel
    # keeps at most CUDA_MAX_K basis columns in shared memory
    f64 = any(t.dtype == torch.float64 for t in list(tensors) + list(bases))
    if f64:
        supported = ("torch",)
    elif any(u.shape[1] > CUDA_MAX_K for u in bases):
        supported = ("torch", "triton")
    else:
        supported = None
    KERNELS(tensors[0].device, supported=supported)(tensors, bases, side)


@_project_out_op.register_fake
def _(tensors, bases, side):
    return None


def project_out_prechecked_(tensors: List[torch.Tensor], bases: List[torch.Tensor], side: str) -> None:
    """:func:`project_out_` without the per-call argument checks, for callers that checked the structure once
    (``OPLoRA`` / ``GPM`` check their bases and layers at construction): ``tensors`` must be contiguous, distinct
    and shaped for ``bases`` (detached, on one device), a non-empty list; with hundreds of layers the checks cost
    more than the math on CPU. Contiguity (cheap) is still checked."""
    for i, x in enumerate(tensors):
        if not x.is_contiguous():
            raise ValueError(f"forgetkern.project_out_: tensors[{i}] is not contiguous; the op writes it in place")
    _project_out_op(tensors, bases, side)


def project_out_(tensors, bases, *, side: str) -> None:
    """Project every ``tensors[i]`` onto the orthogonal complement of ``bases[i]``'s columns, in place.

    Args:
        tensors: ``X_i`` per layer, 2-D, contiguous (LoRA factors or their ``.grad`` s).
        bases: ``U_i`` with orthonormal columns: (rows of ``X_i`` x k_i) for ``side="left"``, (columns of
            ``X_i`` x k_i) for ``side="right"``; any float dtype, on ``X``'s device; ``k_i`` may be 0.
        side: ``"left"`` (``X <- X - U U^T X``) or ``"right"`` (``X <- X - X V V^T``).
    """
    op = "project_out_"
    if side not in SIDES:
        raise ValueError(f"forgetkern.{op}: side must be 'left' (X <- X - U (U^T X)) or 'right' "
                         f"(X <- X - (X V) V^T), got {side!r}")
    tensors = _validate.tensor_list(op, "tensors", tensors)
    bases = _validate.tensor_list(op, "bases", bases)
    if len(tensors) != len(bases):
        raise ValueError(f"forgetkern.{op}: tensors has {len(tensors)} entries but bases has {len(bases)}; the "
                         f"lists are parallel (one basis per tensor)")
    if not tensors:
        return
    device = tensors[0].device
    _validate.matrix_lists(op, (("tensors", tensors), ("bases", bases)), device, "tensors[0]")
    dim = 0 if side == "left" else 1
    for i, (x, u) in enumerate(zip(tensors, bases)):
        if u.shape[0] != x.shape[dim]:
            what = "rows" if side == "left" else "columns"
            raise ValueError(f"forgetkern.{op}: bases[{i}] has shape {tuple(u.shape)} but tensors[{i}] has shape "
                             f"{tuple(x.shape)}: with side={side!r} the basis has one row per {what[:-1]} of the "
                             f"tensor ({x.shape[dim]} x k)")
        if not x.is_contiguous():
            raise ValueError(f"forgetkern.{op}: tensors[{i}] is not contiguous; the op writes it in place (an "
                             f"update of a copy would be lost): pass a contiguous tensor")
        if x.requires_grad and torch.is_grad_enabled() and x.is_leaf:
            raise ValueError(f"forgetkern.{op}: tensors[{i}] is a leaf that requires grad; project parameters "
                             f"under torch.no_grad() (or pass their .grad)")
    _validate.no_overlap(op, [("tensors", tensors)], [("bases", bases)])
    bases = [u.detach() for u in bases]  # any strides: the torch path reads them as they are
    _project_out_op([x.detach() if x.requires_grad else x for x in tensors], bases, side)
