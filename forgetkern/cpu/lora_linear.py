"""LoRA linear on the cpp backend: the reference's blocked GEMMs with a fused C++ dropout kernel.

Same math, signatures and results (bit for bit) as :mod:`forgetkern.reference.lora_linear`, whose module
docstring defines the masker interface. The reference's pure-torch masker regenerates the keep mask of a row
block in ~14 int32 torch passes, then multiplies and fills; :class:`CppMasker` does the whole dropout of a block
in ONE pass over it::

    apply(v, r0)      = torch.ops.forgetkern_cpu.lora_dropout(v, key, p, r0)    # v * keep / (1 - p)
    add_(dst, v, r0):   torch.ops.forgetkern_cpu.lora_dropout_add_(dst, v, key, p, r0)   # dst += that

(``csrc/cpu/lora_dropout.cpp``: the same hash of (key, row, col), the same rounding). The row blocks are the
reference's, so the GEMMs and their summation order are identical too.
"""

from __future__ import annotations

from typing import List

import torch

from forgetkern import _ext
from forgetkern.reference import lora_linear as ref


class CppMasker:
    """The masker of :mod:`forgetkern.reference.lora_linear` backed by the C++ kernels; the block handle is ``r0``
    (the global row of the block's first row)."""

    __slots__ = ("key", "p", "ops")

    def __init__(self, key: int, p: float, x: torch.Tensor):
        self.key, self.p, self.ops = key, p, _ext.cpu_ops()

    def block(self, r0: int, r1: int) -> int:
        return r0

    def apply(self, v: torch.Tensor, r0: int) -> torch.Tensor:
        return self.ops.lora_dropout(v, self.key, self.p, r0)

    def add_(self, dst: torch.Tensor, v: torch.Tensor, r0: int) -> None:
        self.ops.lora_dropout_add_(dst, v, self.key, self.p, r0)


def lora_linear_fwd(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                    bias_layer: List[int], lora_a: List[torch.Tensor], lora_b: List[torch.Tensor],
                    layer: List[int], scaling: List[float], dropout_p: List[float], keys: List[int]):
    """:func:`forgetkern.reference.lora_linear.lora_linear_fwd` with :class:`CppMasker`."""
    return ref.lora_linear_fwd(x, weights, biases, bias_layer, lora_a, lora_b, layer, scaling, dropout_p, keys,
                               masker=CppMasker)


def lora_linear_bwd(dys: List[torch.Tensor], x: torch.Tensor, weights: List[torch.Tensor],
                    lora_a: List[torch.Tensor], lora_b: List[torch.Tensor], xa: torch.Tensor,
                    layer: List[int], scaling: List[float], dropout_p: List[float], keys: List[int],
                    need_dx: bool, need_da: bool, need_db: bool):
    """:func:`forgetkern.reference.lora_linear.lora_linear_bwd` with :class:`CppMasker`."""
    return ref.lora_linear_bwd(dys, x, weights, lora_a, lora_b, xa, layer, scaling, dropout_p, keys, need_dx,
                               need_da, need_db, masker=CppMasker)
