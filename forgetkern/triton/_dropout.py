"""Triton helpers shared by the LoRA kernels: the counter-based dropout hash and the dot-product wrapper.

The hash is bit-identical to ``forgetkern.reference.lora_linear.keep_mask`` and to ``fk_lora_keep`` in
``csrc/include/forgetkern/lora_linear.h``: for a 32-bit ``key`` (passed as the int32 with the same bits),
row ``i`` and column ``j``::

    rh = mix32(key + i * 0x9E3779B9);  h = mix32(rh + j * 0x85EBCA77);  keep = (h >> 8) >= threshold

in uint32 arithmetic (wrapping), with ``mix32`` the two-round xorshift-multiply finaliser.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mix32(h):
    h = h ^ (h >> 16)
    h = h * 0x21F0AAAD
    h = h ^ (h >> 15)
    h = h * 0x735A2D97
    return h ^ (h >> 15)


@triton.jit
def keep_tile(key, thresh, rows, cols):
    """Bool [len(rows), len(cols)]: the dropout keep mask of the elements (rows[i], cols[j])."""
    rh = mix32(key.to(tl.uint32) + rows.to(tl.uint32) * 0x9E3779B9)
    h = mix32(rh[:, None] + cols.to(tl.uint32)[None, :] * 0x85EBCA77)
    return (h >> 8).to(tl.int32) >= thresh


@triton.jit
def dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b with fp32 accumulation. DOT_F32: fp32 operands (fp32 inputs, exact IEEE products, and the
    interpreter, which holds bf16 as raw bits); otherwise the 16-bit operands go to the tensor cores."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def scale_cast(v, s, DT: tl.constexpr):
    """(v * s) rounded to the storage dtype DT (the operand of a tensor-core dot)."""
    return (v.to(tl.float32) * s).to(DT)
