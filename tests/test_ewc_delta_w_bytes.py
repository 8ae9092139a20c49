"""Bytes moved by the Triton ewc_delta_w kernels, counted in the interpreter, against the tile model.

The model (per layer, out x in, rank r padded to R, tiles BLOCK_M x BLOCK_N, row chunks of CHUNK_M): the Fisher
read exactly once; A read once per row chunk, B once per column tile; one int64 table row per program; the
workspaces (fp32 partials of ``B^T E`` per (chunk, column tile) and of ``E A^T`` per (row tile, column tile))
written once and read once by the reduce kernels; the gradients read and written once.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py)", allow_module_level=True)
pytest.importorskip("triton")

from forgetkern.testing.bytes_moved import count_bytes  # noqa: E402
from forgetkern.triton import ewc_delta_w as tri  # noqa: E402


def _cdiv(a, b):
    return -(-a // b)


def _layers(shapes, dtype, f_dtype):
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(r, i, generator=g).to(dtype) for o, i, r in shapes]
    b = [torch.randn(o, r, generator=g).to(dtype) for o, i, r in shapes]
    f = [torch.rand(o, i, generator=g).to(f_dtype) for o, i, r in shapes]
    return a, b, f


def _model(shapes, esz, fsz, write_grad):
    """(F bytes, factor bytes, table bytes, workspace + partial bytes, gradient bytes) of the kernels."""
    f_bytes = fac = table = ws = grads = 0
    for o, i, r in shapes:
        rp = tri.padded_rank(r)
        n_ct, n_mt, n_ch = _cdiv(i, tri.block_n(rp)), _cdiv(o, tri.BLOCK_M), _cdiv(o, tri.CHUNK_M)
        f_bytes += o * i * fsz
        fac += n_ch * r * i * esz + n_ct * o * r * esz      # A per row chunk, B per column tile
        table += n_ct * n_ch * tri.TABLE_COLS * 8 + 4 * n_ct * n_ch  # + 4: the s^2 load
        ws += 4 * n_ct * n_ch                               # penalty partials
        if write_grad:
            table += (n_ct + n_mt) * (tri.RED_COLS * 8 + 4)
            ws += 2 * 4 * (n_ct * n_ch * rp * tri.block_n(rp) + n_mt * n_ct * tri.BLOCK_M * rp)
            grads += 2 * (r * i + o * r) * esz
    return f_bytes, fac, table, ws, grads


@pytest.mark.parametrize("dtype,f_dtype,write_grad", [(torch.float32, torch.float32, True),
                                                      (torch.bfloat16, torch.bfloat16, True),
                                                      (torch.float32, torch.bfloat16, False)],
                         ids=["fp32-grad", "bf16-grad", "fp32-bf16F-penalty"])
def test_fisher_read_exactly_once_and_traffic_matches_the_tile_model(dtype, f_dtype, write_grad):
    shapes = [(260, 140, 16), (40, 129, 5), (33, 70, 1), (20, 70, 40)]  # 2 row chunks, 2 column tiles; r 1, 64
    a, b, f = _layers(shapes, dtype, f_dtype)
    ga, gb = [torch.zeros_like(x) for x in a], [torch.zeros_like(x) for x in b]
    s = [1.0, 0.5, 2.0]
    with count_bytes() as moved:
        tri.ewc_delta_w(a, b, f, s, 0.3, ga, gb, write_grad)
    esz, fsz = a[0].element_size(), f[0].element_size()
    f_bytes, fac, table, ws, grads = _model(shapes, esz, fsz, write_grad)
    per_group = ["ewc_dw_tile_kernel"] + ["ewc_dw_reduce_kernel"] * (2 if write_grad else 0)
    assert moved.launches == per_group * 2  # two (dtype, padded rank) groups: R = 16 and R = 64
    assert moved.total == f_bytes + fac + table + ws + grads, (moved, f_bytes, fac, table, ws, grads)
    # the Fisher's bytes exactly once: the same run with the Fishers in another dtype changes the traffic by
    # exactly (out * in) * the element-size difference
    f2 = [x.to(torch.float64 if f_dtype == torch.float32 else torch.float32) for x in f]
    with count_bytes() as moved2:
        tri.ewc_delta_w(a, b, f2, s, 0.3, ga, gb, write_grad)
    n_f = sum(o * i for o, i, _ in shapes)
    assert moved2.loads - moved.loads == n_f * (f2[0].element_size() - fsz)

