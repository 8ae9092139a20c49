"""Count the bytes Triton kernels load and store, under the interpreter (``TRITON_INTERPRET=1``).

    with count_bytes() as moved:
        kernel[grid](...)
    moved.loads, moved.stores, moved.total, moved.launches

Every global-memory access of an interpreted kernel goes through ``InterpreterBuilder.create_masked_load`` /
``create_masked_store`` (unmasked ``tl.load``/``tl.store`` call them with an all-true mask, block-pointer
and descriptor accesses end there too); the counter wraps those two (and ``create_atomic_rmw``, counted as a
load plus a store) and adds ``(number of masked-in elements) * (element size)``. Masked-off lanes move no
memory on a GPU either, so the totals are what the kernel asks of DRAM/L2 at most once per access: a kernel
that reads an input twice is counted twice. Host-side copies done by the interpreter itself (it copies
argument storages back after a launch) are not counted. Launched kernels are recorded by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, List

import numpy as np


@dataclasses.dataclass
class BytesMoved:
    loads: int = 0
    stores: int = 0
    launches: List[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return self.loads + self.stores


_active: List[BytesMoved] = []
_saved: dict = {}


def _elem_bytes(ptr_handle) -> int:
    return max(1, ptr_handle.get_element_ty().primitive_bitwidth // 8)


def _active_elems(ptrs, mask) -> int:
    if mask is None:
        return int(np.size(ptrs.data))
    return int(np.count_nonzero(np.broadcast_to(mask.data, np.shape(ptrs.data))))


def _install() -> None:
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    load, store, rmw = builder_cls.create_masked_load, builder_cls.create_masked_store, builder_cls.create_atomic_rmw
    call = interpreter.GridExecutor.__call__
    _saved.update(load=load, store=store, rmw=rmw, call=call)

    def counted_load(self, ptrs, mask, *args, **kwargs):
        n = _active_elems(ptrs, mask) * _elem_bytes(ptrs)
        for c in _active:
            c.loads += n
        return load(self, ptrs, mask, *args, **kwargs)

    def counted_store(self, ptrs, value, mask, *args, **kwargs):
        n = _active_elems(ptrs, mask) * _elem_bytes(ptrs)
        for c in _active:
            c.stores += n
        return store(self, ptrs, value, mask, *args, **kwargs)

    def counted_rmw(self, op, ptr, val, mask, *args, **kwargs):
        n = _active_elems(ptr, mask) * _elem_bytes(ptr)
        for c in _active:
            c.loads += n
            c.stores += n
        return rmw(self, op, ptr, val, mask, *args, **kwargs)

    def counted_call(self, *args, **kwargs):
        for c in _active:
            c.launches.append(getattr(self.fn, "__name__", str(self.fn)))
        return call(self, *args, **kwargs)

    builder_cls.create_masked_load = counted_load
    builder_cls.create_masked_store = counted_store
    builder_cls.create_atomic_rmw = counted_rmw
    interpreter.GridExecutor.__call__ = counted_call


def _uninstall() -> None:
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    builder_cls.create_masked_load = _saved.pop("load")
    builder_cls.create_masked_store = _saved.pop("store")
    builder_cls.create_atomic_rmw = _saved.pop("rmw")
    interpreter.GridExecutor.__call__ = _saved.pop("call")


@contextlib.contextmanager
def count_bytes() -> Iterator[BytesMoved]:
    """Count loads/stores of the Triton kernels interpreted inside the block (nestable)."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("count_bytes() needs TRITON_INTERPRET=1 (set before the kernels are imported)")
    counter = BytesMoved()
    if not _active:
        _install()
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)
        if not _active:
            _uninstall()


# ---- analytic models of the LoRA forward's memory traffic (x [M, K], W [N, K], A [r, K], B [N, r]) -----------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lora_forward_tile_bytes(m: int, k: int, n: int, r: int, esz: int, bias: bool, tiles: tuple) -> tuple:
    """``(loads, stores)`` of forgetkern's Triton forward for one adapter without dropout, every tile load counted:
    ``xa = x A^T`` (rows kernel, ``tiles[2:]`` = its BM, BQ) then ``y = x W^T + (xa * s) B^T + b`` (fwd kernel,
    ``tiles[:2]`` = BM, BN). A GEMM tile re-reads its operand panels once per tile of the other side; on a GPU
    those re-reads mostly hit L2."""
    bm, bn, rbm, bq = tiles
    rows = _cdiv(r, bq) * m * k * esz + _cdiv(m, rbm) * k * r * esz
    fwd = (_cdiv(n, bn) * m * (k + r) * esz + _cdiv(m, bm) * n * (k + r) * esz
           + _cdiv(m, bm) * _cdiv(n, bn) * r * 4 + (_cdiv(m, bm) * n * esz if bias else 0))
    return rows + fwd, (m * n + m * r) * esz


def lora_forward_min_bytes(m: int, k: int, n: int, r: int, esz: int, bias: bool) -> int:
    """The compulsory traffic of a fused forward: x, W, A, B (and b) read once; y and xa written once."""
    return (m * k + n * k + r * k + n * r + (n if bias else 0) + m * n + m * r) * esz


def peft_forward_min_bytes(m: int, k: int, n: int, r: int, esz: int, bias: bool, dropout: bool) -> int:
    """The compulsory traffic of PEFT's ``lora.Linear.forward`` op by op (each op reads its inputs and writes its
    output once): base ``y = x W^T + b``; [dropout: ``xd = x * mask / (1-p)`` plus the saved bool mask];
    ``h = xd A^T``; ``o = h B^T``; ``o * s``; ``y + that``."""
    base = (m * k + n * k + (n if bias else 0) + m * n) * esz
    drop = (2 * m * k * esz + m * k) if dropout else 0
    lora_a = (m * k + r * k + m * r) * esz
    lora_b = (m * r + n * r + m * n) * esz
    return base + drop + lora_a + lora_b + 2 * m * n * esz + 3 * m * n * esz
