"""Reference (and CPU path) for ``linear_persample_sq_grad_``: squared per-sample gradients of a Linear weight.

For a Linear layer ``y = x W^T`` with inputs ``x`` [N, T, in] and output gradients ``g = dL/dy`` [N, T, out]
(token ``t`` of sample ``n`` counted only where ``mask[n, t]`` is true)::

    sample granularity:  F += scale * sum_n  G_n * G_n,     G_n = sum_t g_nt x_nt^T          [out, in]
    token granularity:   F += scale * sum_n  S_n,           S_n = sum_t (g_nt * g_nt)(x_nt * x_nt)^T

``G_n`` is the gradient of sample ``n``'s loss with respect to ``W`` (when ``g`` is the gradient of the sum of
the per-sample losses). Math in float32 (float64 for float64 state); 16-bit inputs are upcast before any
product, so squares of fp16/bf16 values never overflow.

Non-finite contributions are never folded in: an element of a sample's contribution (``G_n^2`` or ``S_n``)
that is inf/nan is dropped, and the returned 0-dim float32 flag is 1.0 (else 0.0). The same holds for an
element whose update ``F + scale * sum`` overflows although every contribution was finite: it keeps its
previous value and raises the flag.

Memory: the work is chunked over samples and tokens so that the extra memory stays O(out x in): one reused
float32 ``[out, in]`` per-sample gradient buffer (a few samples for small layers, within ``chunk_bytes``), one
float32 accumulator when the state is not float32/float64 itself, and reused float32 copies of at most
``chunk_bytes`` of activations when they must be upcast, masked or squared. It never materialises
``[N, out, in]``.
"""

from __future__ import annotations

from typing import Optional

import torch

MIN_CHUNK_BYTES = 1 << 20
# |G| below this bound has a finite float32 square (sqrt(FLT_MAX) ~ 1.8e19); a float64 state gets no bound.
_SQ_SAFE = {torch.float32: 1.8e19, torch.float64: 1.3e154}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Blocks:
    """Copies of (sample, token) blocks of ``x`` and ``g`` in the accumulation dtype, masked (and squared) in
    reused buffers; views of the inputs when no copy is needed."""

    def __init__(self, x, g, mask, acc, square, c, tb):
        self.x, self.g, self.mask, self.acc, self.square = x, g, mask, acc, square
        self.copy = square or mask is not None or x.dtype != acc or g.dtype != acc
        if self.copy:
            self.xbuf = torch.empty(c, tb, x.shape[-1], dtype=acc, device=x.device)
            self.gbuf = torch.empty(c, tb, g.shape[-1], dtype=acc, device=x.device)

    def get(self, n0, n1, t0, t1):
        xs, gs = self.x[n0:n1, t0:t1], self.g[n0:n1, t0:t1]
        if not self.copy:
            return xs, gs
        xb = self.xbuf[:n1 - n0, :t1 - t0]
        gb = self.gbuf[:n1 - n0, :t1 - t0]
        xb.copy_(xs)
        gb.copy_(gs)
        if self.mask is not None:
            keep = self.mask[n0:n1, t0:t1, None]
            xb.masked_fill_(~keep, 0)
            gb.masked_fill_(~keep, 0)
        if self.square:
            xb.square_()
            gb.square_()
        return xb, gb


def linear_persample_sq_grad_(fisher: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor,
                              mask: Optional[torch.Tensor], scale: float, token_level: bool, *,
                              chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """In place ``F += scale * sum_n contribution_n`` (see the module docstring); returns the non-finite flag.

    ``x`` [N, T, in], ``grad_out`` [N, T, out], ``mask`` [N, T] bool or None, ``fisher`` [out, in].
    ``chunk_bytes`` bounds the per-chunk temporaries (default: the float32 size of ``fisher``, at least 1 MiB).
    Per chunk of samples: one GEMM (over token blocks) into a reused buffer, one pass that checks it is finite
    (and that its square is), one fused square-and-add pass; a chunk that fails the check is redone sample
    by sample, dropping the non-finite elements.
    """
    found = torch.zeros((), dtype=torch.float32, device=fisher.device)
    n, t, d_in = x.shape
    d_out = grad_out.shape[-1]
    if n == 0 or t == 0 or fisher.numel() == 0:
        return found
    acc = acc_dtype(fisher.dtype)
    esize = torch.finfo(acc).bits // 8
    budget = int(chunk_bytes) if chunk_bytes else max(d_out * d_in * esize, MIN_CHUNK_BYTES)
    mask = None if mask is None else mask.to(device=x.device, dtype=torch.bool)
    if t == 1:  # one token per sample: G_n = g_n x_n^T, so G_n^2 = (g_n^2)(x_n^2)^T, a token-level sum
        token_level = True
    # ``target`` receives the contributions: the state itself when it has the accumulation dtype. Adding
    # into the state directly is safe while max|F| + the added bound stays below ``limit``; past it (values
    # near 1e38, rare) a chunk is added element-checked: an element whose update overflows keeps its value.
    direct = fisher.dtype == acc
    target = fisher if direct else torch.zeros(d_out, d_in, dtype=acc, device=fisher.device)
    limit = torch.finfo(acc).max / 2
    level = _absmax(fisher) if direct else 0.0
    copies = x.dtype != acc or grad_out.dtype != acc or mask is not None or token_level
    row_bytes = (d_in + d_out) * esize if copies else 0
    if token_level:  # chunks of whole samples (or token blocks of one sample): one GEMM per block
        rows = max(1, budget // max(row_bytes, 1))
        c, tb = (max(1, min(n, rows // t)), t) if rows >= t else (1, rows)
    else:
        c = max(1, min(n, budget // (d_out * d_in * esize)))
        if copies:
            c = max(1, min(c, budget // max(row_bytes * t, 1)))
        tb = t if not copies else max(1, min(t, budget // max(row_bytes * c, 1)))
    blocks = _Blocks(x, grad_out, mask, acc, token_level, c, tb)
    shape = (d_out, d_in) if token_level else (c, d_out, d_in)
    buf = torch.empty(shape, dtype=acc, device=fisher.device)
    bound = float("inf") if token_level else _SQ_SAFE[acc]
    for n0 in range(0, n, c):
        n1 = min(n, n0 + c)
        out = buf if token_level else buf[:n1 - n0]
        _gemm(out, blocks, n0, n1, t, tb, token_level)
        m = _absmax(out)
        if m < bound:
            grow = scale * (m if token_level else m * m * (n1 - n0))
            if not direct or level + grow < limit:
                level += grow
                if token_level:
                    target.add_(out, alpha=scale)
                else:
                    for i in range(n1 - n0):
                        target.addcmul_(out[i], out[i], value=scale)
                continue
            if _checked_add_(fisher, out.clone() if token_level else (out * out).sum(0), scale):
                found.fill_(1.0)
            level = _absmax(fisher)
            continue
        chunk = torch.zeros(d_out, d_in, dtype=acc, device=fisher.device) if direct else target
        for i in range(n0, n1):  # rare: redo sample by sample, dropping the non-finite elements
            one = buf if token_level else buf[:1]
            _gemm(one, blocks, i, i + 1, t, tb, token_level)
            if not token_level:
                one = one[0].square_()
            if not _absmax(one) < float("inf"):
                found.fill_(1.0)
                one.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            chunk.add_(one, alpha=1.0 if direct else scale)
        if direct:
            if _checked_add_(fisher, chunk, scale):
                found.fill_(1.0)
            level = _absmax(fisher)
    del buf, blocks
    if not direct and _checked_add_(fisher, target, 1.0):
        found.fill_(1.0)
    return found


def _absmax(c: torch.Tensor) -> float:
    """max |c| in one pass without temporaries (aminmax propagates nan: returns nan, never below a bound)."""
    lo, hi = torch.aminmax(c)
    return float(torch.maximum(hi, -lo))


def _checked_add_(fisher: torch.Tensor, s: torch.Tensor, scale: float) -> bool:
    """``fisher <- S(fisher + scale * s)`` where that is finite (S: rounded once to fisher's dtype); elements
    that overflow keep their value. Consumes ``s``; returns whether some element overflowed."""
    new = s.mul_(scale).add_(fisher).to(fisher.dtype)
    finite = torch.isfinite(new)
    if bool(finite.all()):
        fisher.copy_(new)
        return False
    fisher.copy_(torch.where(finite, new, fisher))
    return True


def _gemm(out, blocks: _Blocks, n0: int, n1: int, t: int, tb: int, token_level: bool) -> None:
    """``out`` = sum over the token blocks of g^T x: [c, out, in] per sample, or [out, in] summed (token)."""
    for t0 in range(0, t, tb):
        xb, gb = blocks.get(n0, n1, t0, min(t, t0 + tb))
        if token_level:
            a, b = gb.reshape(-1, gb.shape[-1]).t(), xb.reshape(-1, xb.shape[-1])
            torch.mm(a, b, out=out) if t0 == 0 else out.addmm_(a, b)
        else:
            torch.bmm(gb.transpose(1, 2), xb, out=out) if t0 == 0 else out.baddbmm_(gb.transpose(1, 2), xb)
