"""Triton multi-tensor kernels against the PyTorch reference: compiled on CUDA tensors with a GPU, else under
the interpreter on CPU tensors.

TRITON_INTERPRET=1 comes from tests/conftest.py when there is no GPU. The interpreter stores bf16 by truncation,
so bf16 outputs are compared with 1 ulp of slack; float32/float64 results use the reference's own operation
order and must match to a few ulps. Launch counts are read from the interpreter (count_bytes), so they are
checked only there.
"""

import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRETING and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device, or TRITON_INTERPRET=1 (tests/conftest.py) to run Triton kernels on CPU "
                "tensors", allow_module_level=True)
pytest.importorskip("triton")
DEV = "cpu" if INTERPRETING else "cuda"

from forgetkern.reference import ewc_penalty as ref_ewc  # noqa: E402
from forgetkern.reference import fisher_accumulate as ref_fisher  # noqa: E402
from forgetkern.testing.bytes_moved import count_bytes  # noqa: E402
from forgetkern.triton import _multi_tensor  # noqa: E402
from forgetkern.triton import ewc_penalty as tri_ewc  # noqa: E402
from forgetkern.triton import fisher_accumulate as tri_fisher  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ULP = {F32: 2.0**-23, F16: 2.0**-10, BF16: 2.0**-7, F64: 2.0**-52}


@pytest.fixture(autouse=True)
def _on_device():
    """Tensors made by the tests (without a generator) on the kernels' device."""
    with torch.device(DEV):
        yield


def _launches(moved, n):
    """The interpreter records the launched kernels; a compiled run does not go through it."""
    if INTERPRETING:
        assert len(moved.launches) == n, moved.launches


def _many_small():
    g = torch.Generator().manual_seed(0)
    sizes = [int(n) for n in torch.randint(1, 40, (520,), generator=g, device="cpu")]
    sizes[::9] = [0] * len(sizes[::9])
    return sizes


SIZES = {"empty": [0], "one": [1], "seven": [7], "65537": [65537], "520-small": _many_small()}


def _cases(dtypes):
    """(sizes, dtypes) pairs: every size in the first dtype combination, the long 520-tensor list (seconds
    each in the interpreter) only there; tests/test_fisher_accumulate.py and test_ewc_penalty.py run it on the
    Triton backend in every dtype against float64 oracles, what is checked here is the launch plan."""
    return [(s, *d) for d in dtypes for s in SIZES if s != "520-small" or d == dtypes[0]]


def _rand(sizes, dtype, seed, scale=1.0, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, generator=g, dtype=F64, device="cpu") * scale
        out.append((x.abs() if positive else x).to(dtype).to(DEV))
    return out


def _close(got, want, dtype, ulps, what):
    """|got - want| <= ulps * ulp(dtype) * max(|want|, tiny), elementwise."""
    assert got.dtype == want.dtype, what
    g, w = got.double(), want.double()
    bound = ulps * ULP[dtype] * w.abs().clamp_min(1e-30)
    bad = ~((g - w).abs() <= bound) & ~(g.isnan() & w.isnan())
    assert not bad.any(), f"{what}: {int(bad.sum())} off, got {g[bad][:4].tolist()} want {w[bad][:4].tolist()}"


def _ulps(dtype):
    # one rounding more than the reference at most (fma contraction), +1 ulp for truncating bf16 stores
    return {F32: 4.0, F64: 4.0, F16: 1.0, BF16: 2.0}[dtype]


# ------------------------------------------------------------------------------------------------------
FISHER_DTYPES = [(F32, F32), (F32, F16), (F32, BF16), (BF16, BF16), (BF16, F32), (F64, F64)]


@pytest.mark.parametrize("sizes,fd,gd", _cases(FISHER_DTYPES), ids=lambda d: str(d).replace("torch.", ""))
def test_fisher_matches_reference(sizes, fd, gd):
    shapes = SIZES[sizes]
    fishers = _rand(shapes, fd, 1, positive=True)
    grads = _rand(shapes, gd, 2, scale=3.0)
    want = [f.clone() for f in fishers]
    want_flag = ref_fisher.fisher_accumulate_(want, grads, 0.9, 0.25)
    with count_bytes() as moved:
        flag = tri_fisher.fisher_accumulate_(fishers, grads, 0.9, 0.25)
    assert flag.dtype == F32 and flag.dim() == 0 and flag.item() == want_flag.item() == 0.0
    _launches(moved, 1 if any(shapes) else 0)
    for i, (f, w) in enumerate(zip(fishers, want)):
        _close(f, w, fd, _ulps(fd), f"fishers[{i}]")


@pytest.mark.parametrize("fd,gd", [(F32, F32), (F32, F16), (BF16, BF16), (F64, F64)], ids=lambda d: str(d)[6:])
def test_fisher_non_finite_gradients_are_skipped_and_flagged(fd, gd):
    fishers = _rand([70000, 33, 5], fd, 3, positive=True)  # first tensor: several chunks, tail program
    grads = _rand([70000, 33, 5], gd, 4)
    grads[0][[0, 16384 * 2 + 1, 69999]] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(gd)
    grads[1][32] = float("nan")
    before = [f.clone() for f in fishers]
    want = [f.clone() for f in fishers]
    ref_fisher.fisher_accumulate_(want, grads, 0.5, 2.0)
    flag = tri_fisher.fisher_accumulate_(fishers, grads, 0.5, 2.0)
    assert flag.item() == 1.0
    for i, (f, w, b, g) in enumerate(zip(fishers, want, before, grads)):
        bad = ~torch.isfinite(g)
        assert torch.equal(f[bad], b[bad]), f"non-finite elements of fishers[{i}] changed"
        assert torch.isfinite(f).all()
        _close(f, w, fd, _ulps(fd), f"fishers[{i}]")
    # a clean call afterwards reports 0 (fresh flag per call)
    assert tri_fisher.fisher_accumulate_(fishers[2:], grads[2:], 1.0, 1.0).item() == 0.0


def test_fisher_fp16_gradients_do_not_overflow():
    grads = [torch.full((33,), 60000.0, dtype=F16), torch.full((5,), -65504.0, dtype=F16)]
    fishers = [torch.zeros(33), torch.ones(5)]
    flag = tri_fisher.fisher_accumulate_(fishers, grads, 1.0, 1.0)
    assert flag.item() == 0.0
    assert torch.equal(fishers[0], torch.full((33,), 60000.0**2))
    assert torch.equal(fishers[1], torch.full((5,), 1.0 + 65504.0**2))


def test_fisher_mixed_dtypes_one_launch_per_group():
    dts = [(F32, F16), (BF16, F32), (F32, F16), (F64, F64), (F32, BF16), (BF16, F32), (F32, F16)]
    fishers = [torch.rand(50 + i).to(fd) for i, (fd, _) in enumerate(dts)]
    grads = [torch.randn(50 + i).to(gd) for i, (_, gd) in enumerate(dts)]
    want = [f.clone() for f in fishers]
    ref_fisher.fisher_accumulate_(want, grads, 1.0, 0.5)
    with count_bytes() as moved:
        tri_fisher.fisher_accumulate_(fishers, grads, 1.0, 0.5)
    _launches(moved, len(set(dts)))
    for i, (f, w) in enumerate(zip(fishers, want)):
        _close(f, w, f.dtype, _ulps(f.dtype), f"fishers[{i}]")


# ------------------------------------------------------------------------------------------------------
EWC_DTYPES = [(F32, F32, F32), (F32, BF16, BF16), (F16, F32, F32), (BF16, BF16, BF16), (BF16, F16, F32),
              (F64, F64, F64)]
MODES = [(False, False), (True, False), (True, True)]


def _ewc_lists(shapes, pd, ad, fd, seed):
    params = _rand(shapes, pd, seed)
    anchors = [(p.double() + 0.1 * torch.randn(p.shape, dtype=F64)).to(ad) for p in params]
    fishers = _rand(shapes, fd, seed + 1, positive=True)
    grads = _rand(shapes, pd, seed + 2, scale=0.01)
    return params, anchors, fishers, grads


def _check_ewc(params, anchors, fishers, grads, lam, write_grad, accumulate, launches=None):
    ref_grads = [g.clone() for g in grads] if write_grad else []
    want = ref_ewc.ewc_fused(params, anchors, fishers, ref_grads, lam, write_grad, accumulate)
    tri_grads = grads if write_grad else []
    before = [g.clone() for g in grads]
    with count_bytes() as moved:
        got = tri_ewc.ewc_fused(params, anchors, fishers, tri_grads, lam, write_grad, accumulate)
    assert got.dim() == 0 and got.dtype == want.dtype
    all64 = all(p.dtype == F64 for p in params)  # float32 groups accumulate in float32 even in a float64 call
    torch.testing.assert_close(got, want, rtol=1e-12 if all64 else 1e-5, atol=1e-30)
    if launches is not None:
        _launches(moved, launches)
    if write_grad:
        for i, (g, w) in enumerate(zip(grads, ref_grads)):
            _close(g, w, g.dtype, _ulps(g.dtype), f"grads[{i}]")
    else:
        assert all(torch.equal(g, b) for g, b in zip(grads, before))
    return got


@pytest.mark.parametrize("sizes,pd,ad,fd", _cases(EWC_DTYPES), ids=lambda d: str(d).replace("torch.", ""))
def test_ewc_matches_reference(sizes, pd, ad, fd):
    shapes = SIZES[sizes]
    params, anchors, fishers, grads = _ewc_lists(shapes, pd, ad, fd, 5)
    # every mode on the small cases; the write+accumulate mode (the training step) on the long list
    modes = MODES if len(shapes) == 1 else [(True, True)]
    for write_grad, accumulate in modes:
        _check_ewc(params, anchors, fishers, [g.clone() for g in grads], 0.7, write_grad, accumulate,
                   launches=1 if any(shapes) else 0)


def test_ewc_overwrite_ignores_old_gradient():
    params, anchors, fishers, _ = _ewc_lists([300, 7], F32, F32, F32, 6)
    grads = [torch.full_like(p, float("nan")) for p in params]
    _check_ewc(params, anchors, fishers, grads, 2.5, True, False)
    assert all(torch.isfinite(g).all() for g in grads)


def test_ewc_mixed_dtypes_fp64_result():
    shapes = [40, 0, 17, 3000, 9, 1]
    dts = [(F32, F32, F32), (F64, F64, F32), (BF16, BF16, F32), (F32, F32, F32), (F64, F32, F64),
           (F16, BF16, BF16)]
    params = [torch.randn(n, dtype=F64).to(d[0]) for n, d in zip(shapes, dts)]
    anchors = [(p.double() + 0.1).to(d[1]) for p, d in zip(params, dts)]
    fishers = [torch.rand(n, dtype=F64).to(d[2]) for n, d in zip(shapes, dts)]
    grads = [torch.randn(n, dtype=F64).to(d[0]) for n, d in zip(shapes, dts)]
    groups = {d for n, d in zip(shapes, dts) if n}
    got = _check_ewc(params, anchors, fishers, grads, 0.3, True, True, launches=len(groups))
    assert got.dtype == F64
    # without the float64 tensors: float32 result
    keep = [i for i, d in enumerate(dts) if d[0] != F64]
    got = _check_ewc(*[[xs[i] for i in keep] for xs in (params, anchors, fishers, grads)], 0.3, True, True)
    assert got.dtype == F32


def test_ewc_penalty_is_deterministic():
    params, anchors, fishers, _ = _ewc_lists([65537, 1000, 3], F32, F32, F32, 7)
    a = tri_ewc.ewc_fused(params, anchors, fishers, [], 0.7, False, False)
    b = tri_ewc.ewc_fused(params, anchors, fishers, [], 0.7, False, False)
    assert torch.equal(a, b)


def test_all_empty_lists():
    assert tri_ewc.ewc_fused([], [], [], [], 1.0, True, True).item() == 0.0
    z = [torch.empty(0)]
    assert tri_ewc.ewc_fused(z, z, z, [torch.empty(0)], 1.0, True, True).item() == 0.0
    assert tri_fisher.fisher_accumulate_([torch.empty(0)], [torch.empty(0)], 1.0, 1.0).item() == 0.0


# ------------------------------------------------------------------------------------------------------
def _misaligned(n, dtype, fill):
    """A contiguous view whose data pointer is not 16-byte aligned (offset by one element)."""
    buf = torch.empty(n + 1, dtype=dtype)
    view = buf[1:]
    view.copy_(fill.to(dtype))
    assert view.data_ptr() % 16 != 0
    return view


def test_misaligned_views_take_the_plain_path():
    n = 16384 + 1500  # two programs: one full chunk, one tail
    params = [_misaligned(n, F32, torch.randn(n)), torch.randn(n)]
    anchors = [_misaligned(n, F32, torch.randn(n)), torch.randn(n)]
    fishers = [torch.rand(n), _misaligned(n, F32, torch.rand(n))]
    grads = [torch.randn(n), torch.randn(n)]
    groups = _multi_tensor.build_groups([params, anchors, fishers, grads], tri_ewc.CHUNK)
    assert groups[0].table[:, -1].tolist() == [0, 0, 0, 0]
    _check_ewc(params, anchors, fishers, grads, 1.5, True, True)
    fs = [_misaligned(n, BF16, torch.rand(n)), torch.rand(n)]
    gs = [torch.randn(n), _misaligned(n, F32, torch.randn(n))]
    want = [f.clone() for f in fs]
    ref_fisher.fisher_accumulate_(want, gs, 0.9, 0.1)
    tri_fisher.fisher_accumulate_(fs, gs, 0.9, 0.1)
    for f, w in zip(fs, want):
        _close(f, w, f.dtype, _ulps(f.dtype), "fishers")


def test_chunk_table_layout():
    _multi_tensor.clear_cache()
    xs = [torch.zeros(n) for n in (5, 0, 40000, 16384)]
    ys = [torch.zeros(n, dtype=BF16 if i == 3 else F32) for i, n in enumerate((5, 0, 40000, 16384))]
    groups = _multi_tensor.build_groups([xs, ys, None], 16384)
    assert [g.dtypes for g in groups] == [(F32, F32), (F32, BF16)]
    assert groups[0].indices == (0, 2) and groups[1].indices == (3,)
    t = groups[0].table
    assert t.dtype == torch.int64 and t.shape == (4, 5)
    assert t[:, 3].tolist() == [5, 16384, 16384, 40000 - 2 * 16384]  # counts
    assert t[:, 2].tolist() == [0] * 4  # the None list
    assert t[2, 0].item() == xs[2].data_ptr() + 16384 * 4 and t[2, 1].item() == ys[2].data_ptr() + 16384 * 4
    assert t[:, 4].tolist() == [int(x % 16 == 0 and y % 16 == 0) for x, y in t[:, :2].tolist()]
    assert _multi_tensor.build_groups([xs, ys, None], 16384) is groups  # cached
