"""Argument checks shared by the ops. Every error names the argument, the index and what was expected."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor_list(op: str, name: str, xs) -> list:
    """``xs`` as a list of tensors, or a TypeError naming ``name``."""
    if isinstance(xs, torch.Tensor):
        raise TypeError(f"forgetkern.{op}: {name} must be a list or tuple of tensors, got a single Tensor; "
                        f"wrap it: [{name}]")
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"forgetkern.{op}: {name} must be a list or tuple of tensors, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"forgetkern.{op}: {name}[{i}] must be a Tensor, got {type(x).__name__}")
    return list(xs)


def check_float(op: str, name: str, value, *, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"forgetkern.{op}: {name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if finite and not (value == value and abs(value) != float("inf")):
        raise ValueError(f"forgetkern.{op}: {name} must be finite, got {value}")
    return value


def check_tensor_lists(
    op: str,
    lists: Sequence[tuple],
    *,
    same_dtype_as: Optional[dict] = None,
) -> torch.device:
    """Check parallel tensor lists, given as ``(name, tensors, allowed_dtypes)`` triples.

    All lists have the same length; the tensors at one index have the same shape; every tensor is dense,
    contiguous, on one common device, with a dtype in its list's ``allowed_dtypes``. ``same_dtype_as`` maps a
    list name to another whose dtype it must match index by index (e.g. ``grads`` to ``params``).
    Returns the common device (``cpu`` for empty lists).
    """
    (first_name, first, _), n = lists[0], len(lists[0][1])
    for name, xs, _ in lists[1:]:
        if len(xs) != n:
            raise ValueError(f"forgetkern.{op}: {name} has {len(xs)} tensors but {first_name} has {n}; "
                             f"the lists are parallel and must have the same length")
    device = first[0].device if n else torch.device("cpu")
    by_name = {name: xs for name, xs, _ in lists}
    for name, xs, allowed in lists:
        for i, x in enumerate(xs):
            where = f"forgetkern.{op}: {name}[{i}]"
            if x.layout != torch.strided:
                raise TypeError(f"{where} must be a dense (strided) tensor, got layout {x.layout}")
            if x.dtype not in allowed:
                raise TypeError(f"{where} has dtype {x.dtype}; expected one of {_dtype_names(allowed)}")
            if x.device != device:
                raise ValueError(f"{where} is on {x.device} but {first_name}[0] is on {device}; "
                                 f"all tensors must be on one device")
            if x.shape != first[i].shape:
                raise ValueError(f"{where} has shape {tuple(x.shape)} but {first_name}[{i}] has shape "
                                 f"{tuple(first[i].shape)}")
            if not x.is_contiguous():
                raise ValueError(f"{where} is not contiguous; pass {name}[{i}].contiguous() (an in-place "
                                 f"update of a copy would be lost, so forgetkern does not copy silently)")
    for name, other in (same_dtype_as or {}).items():
        for i, (x, y) in enumerate(zip(by_name[name], by_name[other])):
            if x.dtype != y.dtype:
                raise TypeError(f"forgetkern.{op}: {name}[{i}] has dtype {x.dtype} but {other}[{i}] has "
                                f"{y.dtype}; they must match")
    return device



def check_nonnegative(op: str, name: str, value) -> float:
    """A finite Python float >= 0 (a negative decay or scale would make a Fisher negative)."""
    value = check_float(op, name, value)
    if value < 0:
        raise ValueError(f"forgetkern.{op}: {name} must be >= 0 (a negative {name} makes the Fisher negative), "
                         f"got {value}")
    return value


def no_grad_state(op: str, name: str, xs: Sequence[torch.Tensor]) -> None:
    """In-place state must not require grad: autograd would not see the update."""
    for i, x in enumerate(xs):
        if x.requires_grad:
            raise ValueError(f"forgetkern.{op}: {name}[{i}] requires grad; the op updates it in place as a "
                             f"buffer: pass {name}[{i}].detach() (or keep the state in a buffer)")


def no_overlap(op: str, written: Sequence[tuple], read: Sequence[tuple] = ()) -> None:
    """Refuse memory shared by a written tensor and any other argument.

    ``written`` and ``read`` are ``(name, tensors)`` pairs (``tensors`` a list, or one tensor or None). A tensor written in place must not share memory with
    another entry of any list: ``fishers=[F, F]`` would race, and a write into memory another argument reads
    changes what the kernel reads mid-pass (the result would depend on the backend). A contiguous tensor is
    the byte span ``[data_ptr, data_ptr + nbytes)``; a strided view (an input that is only read) is taken as the
    span from its first to its last element, a superset of the memory it touches.
    """
    spans = []
    for kind, pairs in (("w", written), ("r", read)):
        for name, xs in pairs:
            # a list is labelled name[i]; a single tensor (or None, skipped) by its name
            items = [(name, xs)] if xs is None or isinstance(xs, torch.Tensor) else [
                (f"{name}[{i}]", x) for i, x in enumerate(xs)]
            for label, x in items:
                if x is None or x.numel() == 0:
                    continue
                lo = x.data_ptr()
                last = sum((n - 1) * s for n, s in zip(x.shape, x.stride()))
                spans.append((lo, lo + (last + 1) * x.element_size(), kind, label))
    spans.sort()
    for j, (lo, hi, kind, label) in enumerate(spans):
        for lo2, _, kind2, label2 in spans[j + 1:]:
            if lo2 >= hi:
                break
            if "w" in (kind, kind2):
                w, other = (label, label2) if kind == "w" else (label2, label)
                raise ValueError(f"forgetkern.{op}: {w} and {other} share memory, and the op writes {w} in "
                                 f"place; pass distinct tensors (e.g. .clone() one of them)")


def matrix_lists(op: str, lists, device: torch.device, device_of: str, shape_hint: str = "") -> None:
    """Every tensor of ``lists`` ([(name, tensors)]) is a dense 2-D float tensor on ``device`` (that of the
    tensor named ``device_of``); errors name the tensor and the fix."""
    for name, xs in lists:
        for i, x in enumerate(xs):
            where = f"forgetkern.{op}: {name}[{i}]"
            if x.layout != torch.strided:
                raise TypeError(f"{where} must be a dense (strided) tensor, got layout {x.layout}")
            if x.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{where} has dtype {x.dtype}; expected one of float32, float16, bfloat16, float64")
            if x.device != device:
                raise ValueError(f"{where} is on {x.device} but {device_of} is on {device}; all tensors must be "
                                 f"on one device")
            if x.dim() != 2:
                raise ValueError(f"{where} must be 2-D{shape_hint}, got shape {tuple(x.shape)}")
