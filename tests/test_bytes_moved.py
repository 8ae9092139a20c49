"""Bytes moved by the Triton multi-tensor kernels, counted in the interpreter, vs the analytic minimum.

Minimum = every input read once + every output written once (+ the per-program penalty workspace). The
kernels also read one small int64 row of the chunk table per program; on realistic lists that stays far
below the 10% budget.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py)", allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from forgetkern.testing.bytes_moved import count_bytes  # noqa: E402
from forgetkern.triton import ewc_penalty as tri_ewc  # noqa: E402
from forgetkern.triton import fisher_accumulate as tri_fisher  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
BUDGET = 1.1


def _sizes():
    # 20 tensors, mixed sizes up to ~1e5 elements (weights, biases, norms, an odd embedding slice)
    return [100_000, 768, 768, 65_536, 3072, 1, 49_152, 12_288, 7, 90_001,
            4096, 4096, 33_333, 16_384, 16_385, 512, 0, 77_777, 2, 25_000]


@triton.jit
def _masked_copy(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


def test_counter_counts_masked_in_elements_times_element_size():
    src, dst = torch.randn(1000), torch.empty(1000)
    with count_bytes() as moved:
        _masked_copy[(4,)](src, dst, 1000, BLOCK=256)
    assert (moved.loads, moved.stores, moved.launches) == (4000, 4000, ["_masked_copy"])
    src16, dst16 = torch.randn(10).to(BF16), torch.empty(10, dtype=BF16)
    with count_bytes() as outer:
        with count_bytes() as inner:
            _masked_copy[(1,)](src16, dst16, 10, BLOCK=16)
        assert torch.equal(src16, dst16)
    assert (inner.loads, inner.stores) == (outer.loads, outer.stores) == (20, 20)


def _ratio(moved, minimum, what):
    ratio = moved.total / minimum
    print(f"\n{what}: loads={moved.loads} stores={moved.stores} minimum={minimum} ratio={ratio:.4f}")
    assert minimum <= moved.total <= BUDGET * minimum, f"{what}: {ratio:.3f}x the minimum"
    return ratio


@pytest.mark.parametrize("pd,sd", [(F32, F32), (F32, BF16), (BF16, BF16)], ids=["fp32", "bf16-state", "bf16"])
def test_ewc_fused_write_accumulate_moves_each_byte_once(pd, sd):
    g = torch.Generator().manual_seed(0)
    sizes = _sizes()
    params = [torch.randn(n, generator=g).to(pd) for n in sizes]
    anchors = [(p.float() + 0.01).to(sd) for p in params]
    fishers = [torch.rand(n, generator=g).to(sd) for n in sizes]
    grads = [torch.randn(n, generator=g).to(pd) for n in sizes]
    with count_bytes() as moved:
        tri_ewc.ewc_fused(params, anchors, fishers, grads, 0.5, True, True)
    n = sum(sizes)
    esz_p, esz_s = params[0].element_size(), fishers[0].element_size()
    programs = sum(-(-k // tri_ewc.CHUNK) for k in sizes)
    minimum = n * (esz_p + 2 * esz_s + 2 * esz_p) + programs * 4  # p, a, F, g read; g written; workspace
    assert moved.launches == ["ewc_fused_kernel"]
    _ratio(moved, minimum, f"ewc_fused p={pd} state={sd}")


def test_ewc_penalty_only_reads_three_lists():
    sizes = _sizes()
    params = [torch.randn(n) for n in sizes]
    anchors = [p.to(BF16) for p in params]
    fishers = [torch.rand(n).to(BF16) for n in sizes]
    with count_bytes() as moved:
        tri_ewc.ewc_fused(params, anchors, fishers, [], 0.5, False, False)
    programs = sum(-(-k // tri_ewc.CHUNK) for k in sizes)
    _ratio(moved, sum(sizes) * (4 + 2 + 2) + programs * 4, "ewc penalty only")


@pytest.mark.parametrize("fd,gd", [(F32, F32), (BF16, BF16), (F32, F16)], ids=["fp32", "bf16", "fp32-fp16"])
def test_fisher_accumulate_reads_f_g_writes_f_once(fd, gd):
    g = torch.Generator().manual_seed(1)
    sizes = _sizes()
    fishers = [torch.rand(n, generator=g).to(fd) for n in sizes]
    grads = [torch.randn(n, generator=g).to(gd) for n in sizes]
    with count_bytes() as moved:
        tri_fisher.fisher_accumulate_(fishers, grads, 0.9, 0.1)
    esz_f, esz_g = fishers[0].element_size(), grads[0].element_size()
    assert moved.launches == ["fisher_accumulate_kernel"]
    _ratio(moved, sum(sizes) * (2 * esz_f + esz_g), f"fisher_accumulate_ F={fd} g={gd}")


# ---- LoRA linear (forgetkern/triton/lora_linear.py) ---------------------------------------------------------
# Tiled GEMMs re-read their operands once per tile of the other side (on a GPU mostly from L2), so the check is
# against the exact tile model of the kernels' loads, and the stores must be the outputs exactly once: y and
# the rank-r product in the forward, nothing of y's size twice (PEFT writes the base output, the LoRA output
# and their sum).

from forgetkern.testing.bytes_moved import lora_forward_min_bytes, lora_forward_tile_bytes  # noqa: E402
from forgetkern.triton import lora_linear as tri_lora  # noqa: E402


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_lora_forward_moves_the_tile_model_and_writes_outputs_once(dtype, bias):
    m, k, n, r = 96, 80, 72, 8
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    a, b = torch.randn(r, k, generator=g).to(dtype), torch.randn(n, r, generator=g).to(dtype)
    bs = [torch.randn(n, generator=g).to(dtype)] if bias else []
    with count_bytes() as moved:
        ys, xa = tri_lora.lora_linear_fwd(x, [w], bs, [0] if bias else [], [a], [b], [0], [2.0], [0.0], [0])
    esz = x.element_size()
    bm, bn = tri_lora._BIG["interp"][:2]
    rbm, bq = tri_lora._SKINNY["interp"][0], 16
    loads, stores = lora_forward_tile_bytes(m, k, n, r, esz, bias, (bm, bn, rbm, bq))
    assert moved.launches == ["_rows_kernel", "_fwd_kernel"]
    assert moved.stores == stores == (m * n + m * r) * esz  # y and xa, each written once
    assert moved.loads == loads, (moved.loads, loads)
    print(f"\nlora fwd {dtype} bias={bias}: loads={moved.loads} stores={moved.stores} "
          f"minimum={lora_forward_min_bytes(m, k, n, r, esz, bias)}")


def test_lora_backward_writes_each_gradient_once():
    m, k, n, r = 96, 80, 72, 8
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    a, b = torch.randn(r, k, generator=g), torch.randn(n, r, generator=g)
    xa, dy = x @ a.t(), torch.randn(m, n, generator=g)
    with count_bytes() as moved:
        dx, da, db = tri_lora.lora_linear_bwd([dy], x, [w], [a], [b], xa, [0], [2.0], [0.0], [0], True, True, True)
    esz = 4
    # g = s dy B [M, r] (one rank-r buffer), then dx, dA, dB: every output written exactly once
    assert moved.stores == (m * r + m * k + r * k + n * r) * esz, moved.stores
    torch.testing.assert_close(dx, dy @ w + 2.0 * (dy @ b) @ a, rtol=1e-4, atol=1e-4)
