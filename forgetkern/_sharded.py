"""DTensor (FSDP2 ``fully_shard``) support for the elementwise EWC ops: run the fused kernel on each rank's
local shard and all-reduce the 0-dim penalty once (sum); no parameter, anchor or Fisher is ever gathered.

The penalty ``lam/2 sum F (theta - theta*)^2`` is a sum of elementwise terms, so over a sharded tensor it is the
sum over ranks of the local shards' penalties, and its gradient on each shard is the local
``lam F (theta - theta*)``: exactly what the kernel computes on ``.to_local()``. Supported layouts: every
sharded tensor on the same 1-D device mesh with ``Shard(dim)`` placements (what ``fully_shard`` gives) and
anchors / Fishers / grads laid out like their parameters; replicated (``Replicate``) or partial placements and
multi-dimensional meshes (HSDP) are refused with the reason (a plain all-reduce would count replicas twice).
"""

from __future__ import annotations

from typing import List, Optional

import torch


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def any_dtensor(*lists) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and any(isinstance(x, DTensor) for xs in lists if xs is not None for x in xs)


def _mesh_of(op: str, params) -> object:
    DTensor = _dtensor_type()
    mesh = None
    for i, p in enumerate(params):
        if not isinstance(p, DTensor):
            raise TypeError(f"forgetkern.{op}: params[{i}] is a plain tensor but other params are DTensors; pass "
                            f"all parameters of one sharded (fully_shard) model, or none")
        if p.device_mesh.ndim != 1 or not all(pl.is_shard() for pl in p.placements):
            raise ValueError(f"forgetkern.{op}: params[{i}] has placements {p.placements} on a "
                             f"{p.device_mesh.ndim}-D mesh; only Shard placements on a 1-D mesh (FSDP2 "
                             f"fully_shard) are supported")
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(f"forgetkern.{op}: params[{i}] is on another device mesh than params[0]")
    return mesh


def local_lists(op: str, params, named_lists) -> tuple:
    """``(mesh, [local params], {name: [local tensors]})``: each DTensor's ``.to_local()``; the companions of a
    DTensor parameter must be DTensors with its placements (the anchors / Fishers taken from the sharded model)."""
    DTensor = _dtensor_type()
    mesh = _mesh_of(op, params)
    out = {}
    for name, xs in named_lists.items():
        if xs is None:
            out[name] = None
            continue
        loc = []
        for i, (x, p) in enumerate(zip(xs, params)):
            if not isinstance(x, DTensor):
                raise TypeError(f"forgetkern.{op}: params[{i}] is a DTensor but {name}[{i}] is a plain tensor; "
                                f"shard it like the parameter (EWC does: anchors and Fishers taken from a "
                                f"sharded model are DTensors), e.g. torch.distributed.tensor.distribute_tensor("
                                f"{name}[{i}], p.device_mesh, p.placements)")
            if x.placements != p.placements or x.device_mesh != p.device_mesh or x.shape != p.shape:
                raise ValueError(f"forgetkern.{op}: {name}[{i}] has shape {tuple(x.shape)}, placements "
                                 f"{x.placements}; params[{i}] has {tuple(p.shape)}, {p.placements}: lay it out "
                                 f"like the parameter")
            loc.append(x.to_local())
        out[name] = loc
    return mesh, out


class _AllReduceSum(torch.autograd.Function):
    """Forward: the sum over the group of a 0-dim tensor. Backward: the incoming gradient unchanged (every rank
    differentiates the same global scalar; its derivative w.r.t. this rank's local term is 1)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        torch.distributed.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


def all_reduce_sum(x: torch.Tensor, mesh) -> torch.Tensor:
    return _AllReduceSum.apply(x, mesh.get_group())


def shard_like(x: torch.Tensor, p) -> torch.Tensor:
    """A full tensor ``x`` laid out like the DTensor ``p`` (each rank keeps its slice; no gather)."""
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(p, DTensor) or isinstance(x, DTensor):
        return x
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(x.to(p.to_local().device), p.device_mesh, p.placements, src_data_rank=None)
