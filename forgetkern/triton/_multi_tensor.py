"""Host side of the multi-tensor Triton launchers: dtype grouping and per-program chunk tables.

A call on lists ``(xs_0[i], xs_1[i], ...)`` becomes ONE kernel launch per dtype group (the tuple of the
dtypes at index ``i``). Empty tensors are skipped. Every tensor of a group is cut into chunks of ``chunk``
elements, and each chunk is one program. Program ``pid`` reads row ``pid`` of an int64 table::

    [addr_0, addr_1, ..., addr_{L-1}, count, aligned]

``addr_j`` is the address of the chunk's first element in list ``j`` (the tensor's ``data_ptr()`` advanced
to the chunk start, 0 for a list that is not passed), ``count`` the number of elements in the chunk
(``<= chunk``) and ``aligned`` 1 when every ``addr_j`` is a multiple of 16 bytes (the kernel then takes a
path with alignment hints, i.e. 128-bit vector loads/stores; sliced views may be misaligned and take the
plain path). The kernel casts ``addr_j`` to a typed pointer (``int_to_ptr``, which the interpreter also
supports), so rows carry everything a program needs and there is a single dependent table load before the
data loads: the per-tensor (address, numel) table and the block -> (tensor, chunk) map are folded into one
row per block.

The table is built with one ``torch.tensor`` call per group plus a few vectorised CPU ops; it is uploaded
through pinned memory with a non-blocking copy (no host sync) and cached by (device, chunk, dtypes,
addresses, numels): a table only holds addresses and sizes, so an entry whose key matches is valid even if
the tensors were reallocated at the same addresses.
"""

from __future__ import annotations

import collections
from typing import List, NamedTuple, Optional, Sequence

import torch

ALIGN_BYTES = 16
_CACHE_SIZE = 64
_cache: "collections.OrderedDict[tuple, List[Group]]" = collections.OrderedDict()


class Group(NamedTuple):
    """One launch: the tensors at ``indices`` share ``dtypes``; ``table`` has one row per program."""

    dtypes: tuple
    indices: tuple
    table: torch.Tensor  # int64 [num_programs, num_lists + 2] on the tensors' device
    num_programs: int


def group_indices(lists: Sequence[Optional[Sequence[torch.Tensor]]]) -> "dict[tuple, list]":
    """Indices of non-empty tensors grouped by the tuple of dtypes across ``lists`` (None lists ignored).

    Groups are returned in order of first appearance (deterministic).
    """
    groups: dict = {}
    live = [xs for xs in lists if xs is not None]
    for i, x in enumerate(lists[0]):
        if x.numel() == 0:
            continue
        key = tuple(xs[i].dtype for xs in live)
        groups.setdefault(key, []).append(i)
    return groups


def _build_table(lists, indices, chunk: int, device: torch.device) -> torch.Tensor:
    n_lists = len(lists)
    flat = []
    for i in indices:
        flat.extend(xs[i].data_ptr() if xs is not None else 0 for xs in lists)
        flat.append(lists[0][i].numel())
    base = torch.tensor(flat, dtype=torch.int64).view(len(indices), n_lists + 1)
    esize = torch.tensor([xs[indices[0]].element_size() if xs is not None else 0 for xs in lists],
                         dtype=torch.int64)
    numel = base[:, n_lists]
    nchunks = (numel + chunk - 1) // chunk
    tensor_of = torch.repeat_interleave(torch.arange(len(indices)), nchunks)
    first = torch.repeat_interleave(torch.cumsum(nchunks, 0) - nchunks, nchunks)
    start = (torch.arange(tensor_of.numel()) - first) * chunk
    addrs = base[tensor_of, :n_lists] + start[:, None] * esize[None, :]
    count = torch.clamp(numel[tensor_of] - start, max=chunk)
    aligned = (addrs % ALIGN_BYTES == 0).all(dim=1).to(torch.int64)
    table = torch.cat([addrs, count[:, None], aligned[:, None]], dim=1).contiguous()
    if device.type != "cpu":
        table = table.pin_memory().to(device, non_blocking=True)
    return table


def build_groups(lists: Sequence[Optional[Sequence[torch.Tensor]]], chunk: int) -> List[Group]:
    """Group the tensors of ``lists`` (index-aligned; ``lists[0]`` decides emptiness and sizes).

    A list passed as ``None`` gets address 0 in every row (e.g. gradients when they are not written).
    """
    device = lists[0][0].device
    key = (device, chunk, tuple(None if xs is None else tuple((x.data_ptr(), x.numel(), x.dtype) for x in xs)
                                for xs in lists))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    out = []
    for dtypes, idx in group_indices(lists).items():
        table = _build_table(lists, idx, chunk, device)
        out.append(Group(dtypes, tuple(idx), table, table.shape[0]))
    _cache[key] = out
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return out


def clear_cache() -> None:
    _cache.clear()
