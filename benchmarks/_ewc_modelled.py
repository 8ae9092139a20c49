"""The modelled-GPU rows of ``benchmarks/bench_ewc.py`` (``modelled_rows``): H100 roofline times of the Triton EWC
and Fisher kernels from the bytes they move in the interpreter, next to the minimum bytes of each peer's sequence
of torch ops. Modelled, not measured; run by ``benchmarks/modelled.py`` under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import math

import torch

import _common as bc
from bench_ewc import EWC, FISHER, llama_shapes, make_state

# Bytes per element each peer's sequence of torch ops must move at least (fp32: 4 bytes per read or write; each
# op reads its inputs once and writes its output once; broadcast scalars and views move nothing).
PEER_OP_BYTES = {
    EWC: {
        # forward: d = p - p* (2 reads, 1 write), d.pow(2) (1, 1), F * d^2 (2, 1), .sum() (1); backward: grad of
        # the product = F * (expanded scalar) (1, 1), pow backward 2 * d * that (2, 1), accumulation into p.grad
        # (2, 1); 17 accesses
        "avalanche-loop": (17, "autograd: sub, pow, mul, sum forward; mul, pow backward, grad accumulation"),
        # _foreach_sub (2, 1), _foreach_addcmul_ (3, 1), _foreach_mul_(d, d) (1, 1), _foreach_mul_(d, F) (2, 1),
        # per-tensor sum (1); 13 accesses
        "torch-foreach": (13, "foreach: sub, addcmul_, mul_, mul_, sum"),
    },
    FISHER: {
        "python-loop": (5, "g**2 (1 read, 1 write), f += (2, 1)"),
        "torch-foreach-addcmul": (3, "_foreach_addcmul_(F, G, G): F and G read once, F written (the same bytes "
                                     "as the fused kernel)"),
    },
}


def _count_triton(params_target: float, seed: int = 0) -> dict:
    """Bytes the Triton EWC and Fisher kernels move on the Llama-shaped list of ``params_target`` parameters,
    counted in the interpreter, and the per-program overhead (chunk table row, penalty workspace) they show
    beyond each element read and written once."""
    from forgetkern.testing.bytes_moved import count_bytes
    from forgetkern.triton import ewc_penalty as tri_ewc
    from forgetkern.triton import fisher_accumulate as tri_fisher

    params, anchors, fishers, grads = make_state(llama_shapes(params_target), torch.device("cpu"), seed)
    n = sum(p.numel() for p in params)
    out = {"n": n}
    with count_bytes() as moved:
        tri_ewc.ewc_fused(params, anchors, fishers, grads, 0.4, True, True)
    progs = sum(-(-p.numel() // tri_ewc.CHUNK) for p in params)
    out[EWC] = (moved.total, progs, (moved.total - 20 * n) / progs)
    with count_bytes() as moved:
        tri_fisher.fisher_accumulate_(fishers, grads, 1.0, 1.0)
    progs = sum(-(-f.numel() // tri_fisher.CHUNK) for f in fishers)
    out[FISHER] = (moved.total, progs, (moved.total - 12 * n) / progs)
    return out


def modelled_rows(quick: bool) -> list:
    """Modelled H100 times (``benchmarks/modelled.py``, interpreter): forgetkern's Triton kernels from their
    interpreter byte counts, the peers from :data:`PEER_OP_BYTES`, fp32, at the sizes ``runner_argv`` times.

    The count runs on a smaller list (2e5 / 2e6 parameters); the model applied at the benchmark's size is
    ``20 (EWC) or 12 (Fisher) bytes per element + the per-program overhead measured there``; it is checked on
    a second, different list before it is used."""
    from forgetkern.triton import ewc_penalty as tri_ewc
    from forgetkern.triton import fisher_accumulate as tri_fisher

    small, check = (2e5, 5e4) if quick else (2e6, 2e5)
    target = 1e6 if quick else 100e6
    counted, second = _count_triton(small), _count_triton(check, seed=1)
    shapes = llama_shapes(target)
    n = sum(math.prod(s) for _, s in shapes)
    rows = []
    for op, per_elem, chunk in ((EWC, 20, tri_ewc.CHUNK), (FISHER, 12, tri_fisher.CHUNK)):
        total, progs, per_prog = counted[op]
        t2, p2, _ = second[op]
        predicted = per_elem * second["n"] + per_prog * p2
        if abs(predicted - t2) > 1e-6 * t2:
            raise AssertionError(f"{op}: byte model {predicted} != interpreter count {t2} on the check list")
        progs_at = sum(-(-math.prod(s) // chunk) for _, s in shapes)
        mode = "fp32-state" if op == EWC else "fp32"
        rows += bc.modelled_rows(op, "forgetkern-triton", mode, n, per_elem * n + per_prog * progs_at,
                                 how=f"bytes: interpreter count {total:,} B at {counted['n']:,} parameters "
                                     f"= {per_elem} B/element + {per_prog:g} B/program, checked on "
                                     f"{second['n']:,} parameters, applied at {n:,}")
        for peer, (accesses, what) in PEER_OP_BYTES[op].items():
            rows += bc.modelled_rows(op, peer, mode, n, 4 * accesses * n,
                                     how=f"bytes: {accesses} x 4 B/element, the minimum of its ops ({what})")
    return rows
