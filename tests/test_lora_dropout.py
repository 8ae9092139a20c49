"""The fused C++ LoRA dropout kernels (torch.ops.forgetkern_cpu.lora_dropout / lora_dropout_add_) against the
hash's int64 definition and the reference masker, bit for bit; lora_linear on the cpp backend against the torch
backend, bit for bit; bad inputs; backend resolution.

NaN results are compared as NaN only: torch itself rounds a NaN to bfloat16 as 0x7FC0 or 0xFFFF depending on
whether its loop is vectorised.
"""

import pytest
import torch

import forgetkern
from forgetkern import _backend, _ext
from forgetkern.ops import lora_linear as ops
from forgetkern.reference import lora_linear as ref
from tests.test_cpu_ext import isa_params, use_isa  # noqa: F401  (use_isa is a fixture)
from tests.test_lora_linear import F16, F32, F64, BF16, _leaves, _make

_CPP_REASON = _backend.availability("cpu")["cpp"]
pytestmark = pytest.mark.skipif(_CPP_REASON is not None, reason=str(_CPP_REASON))

KEYS = [0, 1, 123456789, 2**32 - 1]
PS = [0.05, 0.1, 0.5, 0.9]
# (rows, cols, row0): a row, a column, empty, odd, a block large enough for OpenMP, row indices near and past 2^31
# and past 2^32 (the hash sees rows modulo 2^32)
SHAPES = [(1, 700, 0), (300, 1, 5), (0, 45, 0), (7, 0, 3), (37, 45, 0), (257, 301, 65530), (3, 129, 2**31 - 2),
          (4, 33, 2**32 - 2)]
BITS = {F32: torch.int32, F64: torch.int64, F16: torch.int16, BF16: torch.int16}


def _ops():
    return _ext.cpu_ops()


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), what
    g, w = got.view(BITS[got.dtype])[~nan], want.view(BITS[want.dtype])[~nan]
    if not torch.equal(g, w):
        bad = (g != w).nonzero()[:5].flatten().tolist()
        raise AssertionError(f"{what}: {int((g != w).sum())} of {g.numel()} differ; first at {bad}: got "
                             f"{got[~nan][bad].tolist()} want {want[~nan][bad].tolist()}")


def _special(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values over many magnitudes with infinities, NaN, signed zeros, subnormals and values that overflow
    once scaled by 1 / (1 - p)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=F64) * torch.exp2(torch.randint(-30, 30, (rows, cols), generator=g))
    info = torch.finfo(dtype)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 0.0, info.tiny / 4, -info.tiny / 3,
                            info.max, -info.max * 0.9, info.eps], dtype=F64)
    flat = x.view(-1)
    n = min(flat.numel(), special.numel())
    pos = torch.randperm(flat.numel(), generator=g)[:n]
    flat[pos] = special[:n]
    return x.to(dtype)


def test_mask_matches_int64_definition():
    for rows, cols, row0 in SHAPES:
        ones = torch.ones(rows, cols)
        for key in KEYS:
            for p in PS:
                got = _ops().lora_dropout(ones, key, p, row0) != 0
                want = ref.keep_mask_int64(key, p, rows, cols, row0=row0)
                assert torch.equal(got, want), (rows, cols, row0, key, p)
    x = torch.ones(5, 9)
    assert torch.equal(_ops().lora_dropout(x, 3, 0.0, 0), x)
    assert not _ops().lora_dropout(x, 3, 1.0, 0).any()


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
def test_values_match_reference_masker(dtype):
    for i, (rows, cols, row0) in enumerate(SHAPES):
        for key, p in zip(KEYS, PS):
            x = _special(rows, cols, dtype, seed=i)
            mk = ref._Masker(key, p, x)
            want = mk.apply(x, ~ref.keep_mask_int64(key, p, rows, cols, row0=row0))
            _assert_same_bits(_ops().lora_dropout(x, key, p, row0), want, f"{rows}x{cols}+{row0} key={key} p={p}")


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
def test_add_matches_reference_masker(dtype):
    for i, (rows, cols, row0) in enumerate(SHAPES):
        for key, p in zip(KEYS, PS):
            src, dst = _special(rows, cols, dtype, seed=i), _special(rows, cols, dtype, seed=100 + i)
            mk = ref._Masker(key, p, src)
            want = dst.clone()
            mk.add_(want, src, ~ref.keep_mask_int64(key, p, rows, cols, row0=row0))
            got = dst.clone()
            assert _ops().lora_dropout_add_(got, src, key, p, row0) is None
            _assert_same_bits(got, want, f"{rows}x{cols}+{row0} key={key} p={p}")
    # dst is src: dst += drop(dst)
    x = _special(40, 50, dtype, seed=7)
    want = x.clone()
    ref._Masker(9, 0.3, x).add_(want, x, ~ref.keep_mask_int64(9, 0.3, 40, 50, row0=11))
    _ops().lora_dropout_add_(x, x, 9, 0.3, 11)
    _assert_same_bits(x, want, "in place")


@pytest.mark.parametrize("isa", isa_params())
def test_instruction_set_paths_match(use_isa, isa):
    """The AVX-512, AVX2 and baseline (SSE2) builds of the row loop give the same bits (FORGETKERN_CPU_ISA picks
    the path, as for every CPU kernel: csrc/cpu/cpu_isa.h)."""
    use_isa(isa)
    ops = _ext.cpu_ops()
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for rows, cols, row0 in ((37, 45, 0), (129, 1031, 2**31 - 7), (3, 7, 1)):
            x, d = _special(rows, cols, dt, 1), _special(rows, cols, dt, 2)
            drop = ~ref.keep_mask_int64(77, 0.3, rows, cols, row0=row0)
            mk = ref._Masker(77, 0.3, x)
            want, got = mk.apply(x, drop), ops.lora_dropout(x, 77, 0.3, row0)
            want_add, got_add = d.clone(), d.clone()
            mk.add_(want_add, x, drop)
            ops.lora_dropout_add_(got_add, x, 77, 0.3, row0)
            for g, w in ((got, want), (got_add, want_add)):
                nan = w.isnan()
                assert torch.equal(g.isnan(), nan), (dt, rows, cols)
                assert torch.equal(g.view(BITS[dt])[~nan], w.view(BITS[dt])[~nan]), (dt, rows, cols)


def test_unknown_instruction_set_is_refused(monkeypatch):
    monkeypatch.setenv("FORGETKERN_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="FORGETKERN_CPU_ISA='sse9' is not an instruction set"):
        _ext.cpu_ops().lora_dropout(torch.ones(2, 2), 1, 0.5, 0)


def test_bad_inputs():
    x = torch.randn(6, 8)
    bad = [
        ((x.t(), 1, 0.5, 0), r"x must be contiguous.*\.contiguous\(\)"),
        ((x[0], 1, 0.5, 0), r"x must be 2-D \[rows, cols\], got 1 dimensions"),
        ((x.view(2, 3, 8), 1, 0.5, 0), r"x must be 2-D"),
        ((x.int(), 1, 0.5, 0), r"x has dtype Int; expected float32, float16, bfloat16 or float64"),
        ((x.bool(), 1, 0.5, 0), r"x has dtype Bool"),
        ((x, -1, 0.5, 0), r"key must be a 32-bit key in \[0, 2\^32\), got -1"),
        ((x, 2**32, 0.5, 0), r"key must be a 32-bit key"),
        ((x, 1, 1.5, 0), r"p must be a dropout probability in \[0, 1\], got 1.5"),
        ((x, 1, -0.1, 0), r"p must be a dropout probability"),
        ((x, 1, float("nan"), 0), r"p must be a dropout probability"),
        ((x, 1, 0.5, -1), r"row0 .* must be >= 0, got -1"),
    ]
    for args, pattern in bad:
        with pytest.raises(RuntimeError, match=pattern):
            _ops().lora_dropout(*args)
    d = torch.zeros(6, 8)
    bad_add = [
        ((d, torch.randn(6, 7)), r"src has shape \[6, 7\] but dst has \[6, 8\]"),
        ((d, x.double()), r"src has dtype Double but dst has Float; cast src first"),
        ((torch.zeros(8, 6).t(), x), r"dst must be contiguous"),
        ((d, x.t().contiguous().t()), r"src must be contiguous"),
        ((d.int(), x.int()), r"dst has dtype Int"),
    ]
    for (dst, src), pattern in bad_add:
        with pytest.raises(RuntimeError, match=pattern):
            _ops().lora_dropout_add_(dst, src, 1, 0.5, 0)
    buf = torch.zeros(7, 8)
    with pytest.raises(RuntimeError, match="src and dst partially overlap in memory"):
        _ops().lora_dropout_add_(buf[1:], buf[:-1], 1, 0.5, 0)


def test_schemas():
    x = torch.randn(6, 8)
    torch.library.opcheck(torch.ops.forgetkern_cpu.lora_dropout.default, (x, 5, 0.25, 3), test_utils="test_schema")
    torch.library.opcheck(torch.ops.forgetkern_cpu.lora_dropout_add_.default, (torch.randn(6, 8), x, 5, 0.25, 3),
                          test_utils="test_schema")


# ---- lora_linear on the cpp backend: the torch backend's results, bit for bit ----------------------------------

CASES = {  # (leading dims, in, out, [(rank, scaling, dropout_p, lora_bias)], bias, n_layers)
    "one": ((3, 37), 45, 29, [(5, 0.5, 0.3, True)], True, 1),
    "mixed": ((111,), 45, 29, [(5, 0.5, 0.3, True), (20, 2.0, 0.0, False), (4, 1.0, 0.1, False)], True, 1),
    "siblings": ((2, 17), 40, 24, [(5, 0.5, 0.2, True), (18, 1.5, 0.0, False)], False, 3),
    "empty-batch": ((0, 5), 12, 6, [(3, 0.5, 0.3, True)], True, 1),
}


def _run_lora(backend, x, layers, seed=11):
    for v in _leaves(x, layers):
        v.grad = None
    with forgetkern.use_backend(backend):
        ys = ops.lora_linear_siblings(x, [w for w, _, _ in layers], [b for _, b, _ in layers],
                                      [a for _, _, a in layers], training=True, seed=seed)
    gen = torch.Generator().manual_seed(3)
    sum((y * torch.randn(y.shape, generator=gen, dtype=F64).to(y.dtype)).sum() for y in ys).backward()
    return [y.detach() for y in ys] + [v.grad.clone() for v in _leaves(x, layers)]


@pytest.mark.parametrize("path", ["eager", "custom-op"])
@pytest.mark.parametrize("chunk", [200, None], ids=["small-blocks", "default-blocks"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_lora_linear_cpp_equals_torch(monkeypatch, case, dtype, chunk, path):
    if chunk is not None:
        monkeypatch.setattr(ref, "_CHUNK", chunk)
    if path == "custom-op":
        monkeypatch.setattr(ops, "eager", lambda ts: False)
    lead, k_in, n_out, ads, bias, n_layers = CASES[case]
    x, layers = _make(lead, k_in, n_out, ads, bias, dtype, n_layers=n_layers)
    want = _run_lora("torch", x, layers)
    got = _run_lora("cpp", x, layers)
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_same_bits(g, w, f"output/grad {i}")


def test_auto_picks_cpp_on_cpu():
    assert _backend.resolve("lora_linear", torch.device("cpu"), supported=ops._supported(torch.empty(0))) == "cpp"
    assert _backend.resolve("lora_linear", torch.device("cpu")) == "cpp"


def test_build_without_the_kernels_falls_back(monkeypatch):
    """An extension built from sources older than lora_dropout: auto runs torch, an explicit cpp says rebuild."""
    monkeypatch.setitem(_backend.CPP_KERNELS, "lora_linear", ("lora_dropout", "lora_dropout_v0"))
    _backend._availability.cache_clear()  # availability is cached per process
    try:
        assert "lora_dropout_v0" in _backend.availability("cpu", "lora_linear")["cpp"]
        assert _backend.availability("cpu")["cpp"] is None  # the other cpp ops are unaffected
        assert _backend.resolve("lora_linear", torch.device("cpu")) == "torch"
        with forgetkern.use_backend("cpp"):
            with pytest.raises(forgetkern.BackendError, match="lacks the kernels lora_dropout_v0.*rebuild"):
                _backend.resolve("lora_linear", torch.device("cpu"))
    finally:
        _backend._availability.cache_clear()
