"""The CPU extension (torch.ops.forgetkern_cpu) against the pure-PyTorch reference.

Elementwise results (Fisher state, gradients) must equal the reference bit for bit: both evaluate the same
IEEE operations in the same order and round once to the storage dtype. The penalty is a sum, whose order
differs (chunked, vectorised), so it is compared with a tolerance relative to the sum of the terms; it must be
identical for any number of threads.

Every instruction set of the kernels (FORGETKERN_CPU_ISA=baseline|avx2|avx512, as far as this CPU has it)
must give the bits of the reference and of the baseline kernels, the penalty included.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest
import torch

import forgetkern
from forgetkern import _ext

try:
    from forgetkern.reference.ewc_penalty import ewc_fused as ref_ewc_fused
    from forgetkern.reference.fisher_accumulate import fisher_accumulate_ as ref_fisher_accumulate_
except ImportError:  # minimal local reference (same math) when the package reference is unavailable

    def _acc(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    def ref_fisher_accumulate_(fishers, grads, decay, scale):
        found = torch.zeros((), dtype=torch.float32)
        for f, g in zip(fishers, grads):
            if f.numel():
                acc = _acc(f.dtype)
                g32 = g.to(acc)
                finite = torch.isfinite(g32)
                f.copy_(torch.where(finite, f.to(acc) * decay + g32 * g32 * scale, f.to(acc)))
                found = torch.maximum(found, (~finite).any().float())
        return found

    def ref_ewc_fused(params, anchors, fishers, grads, lam, write_grad, accumulate):
        out = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        total = torch.zeros((), dtype=out)
        for i, (p, a, f) in enumerate(zip(params, anchors, fishers)):
            if p.numel():
                acc = _acc(p.dtype)
                d = p.to(acc) - a.to(acc)
                fd = f.to(acc) * d
                total = total + (fd * d).sum(dtype=acc).to(out)
                if write_grad:
                    step = fd * lam
                    grads[i].copy_(grads[i].to(acc) + step if accumulate else step)
        return total * (lam / 2)


OPS = _ext.cpu_ops()
pytestmark = pytest.mark.skipif(OPS is None, reason=f"CPU extension not loaded: {_ext.cpu_ext_error()}")

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
STATES = (torch.float32, torch.bfloat16, torch.float64)


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def size_sets() -> dict:
    gen = torch.Generator().manual_seed(1)
    many = [int(n) for n in torch.randint(0, 200, (520,), generator=gen)]
    many[::5] = [0] * len(many[::5])
    return {"empty": [0], "one": [1], "seven": [7], "65537": [65537], "520-mixed-empty": many,
            "shapes": [(3, 5), (0, 4), (128, 257), (2, 3, 4), (40000, 3)]}


SIZES = size_sets()


def rand(shapes, dtype, seed, *, positive=False, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        x = torch.randn((s,) if isinstance(s, int) else s, generator=gen, dtype=torch.float64) * scale
        out.append((x.abs() if positive else x).to(dtype))
    return out


def clone(xs):
    return [x.clone() for x in xs]


def assert_bitwise(got, want, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, what
        if not torch.equal(g, w):
            bad = (g != w).nonzero()[:3].tolist()
            raise AssertionError(f"{what}[{i}] differs at {bad}: got {g[g != w][:3].tolist()} "
                                 f"want {w[g != w][:3].tolist()}")


def penalty_bound(params, anchors, fishers, lam) -> float:
    """Tolerance for the penalty: 64 ulps of each tensor's compute dtype times the (positive) sum of its terms."""
    bound = 1e-30
    for p, a, f in zip(params, anchors, fishers):
        eps = 2.0**-52 if p.dtype == torch.float64 else 2.0**-23
        bound += 64 * eps * lam / 2 * float((f.double() * (p.double() - a.double()) ** 2).sum())
    return bound


# ---- fisher_accumulate_ ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("state,grad", list(itertools.product(STATES, FLOATS)),
                         ids=[f"{_name(s)}-{_name(g)}" for s, g in itertools.product(STATES, FLOATS)])
def test_fisher_accumulate_matches_reference(state, grad, sizes):
    shapes = SIZES[sizes]
    fishers = rand(shapes, state, 0, positive=True)
    grads = rand(shapes, grad, 1, scale=3.0)
    want_f = clone(fishers)
    want = ref_fisher_accumulate_(want_f, grads, 0.9, 0.1)
    got = OPS.fisher_accumulate_(fishers, grads, 0.9, 0.1)
    assert got.dtype == torch.float32 and got.shape == () and got.device.type == "cpu"
    assert float(got) == float(want) == 0.0
    assert_bitwise(fishers, want_f, "fishers")


@pytest.mark.parametrize("state", STATES, ids=_name)
@pytest.mark.parametrize("grad", FLOATS, ids=_name)
def test_fisher_accumulate_nonfinite_left_unchanged(state, grad):
    fishers = rand([7, 0, 70000], state, 2, positive=True)
    grads = rand([7, 0, 70000], grad, 3)
    grads[0][3] = float("nan")
    grads[2][5] = float("inf")
    grads[2][69999] = -float("inf")
    before = clone(fishers)
    want_f = clone(fishers)
    want = ref_fisher_accumulate_(want_f, grads, 1.0, 0.5)
    got = OPS.fisher_accumulate_(fishers, grads, 1.0, 0.5)
    assert float(got) == float(want) == 1.0
    assert_bitwise(fishers, want_f, "fishers")
    for t, i in ((0, 3), (2, 5), (2, 69999)):
        assert torch.equal(fishers[t][i], before[t][i])


def test_fisher_accumulate_mixed_dtypes_in_one_call():
    combos = list(itertools.product(STATES, FLOATS))
    shapes = [(i * 997) % 3001 for i in range(len(combos) * 3)]
    fishers = [rand([s], combos[i % len(combos)][0], 10 + i, positive=True)[0] for i, s in enumerate(shapes)]
    grads = [rand([s], combos[i % len(combos)][1], 100 + i)[0] for i, s in enumerate(shapes)]
    want_f = clone(fishers)
    ref_fisher_accumulate_(want_f, grads, 0.5, 2.0)
    assert float(OPS.fisher_accumulate_(fishers, grads, 0.5, 2.0)) == 0.0
    assert_bitwise(fishers, want_f, "fishers")


def test_fisher_accumulate_large_fp16_gradients_do_not_overflow():
    fishers = [torch.zeros(5)]
    grads = [torch.tensor([65504.0, -65504.0, 256.0, 1e-7, 0.0], dtype=torch.float16)]
    OPS.fisher_accumulate_(fishers, grads, 1.0, 1.0)
    assert torch.isfinite(fishers[0]).all()
    assert float(fishers[0][0]) == 65504.0**2


# ---- ewc_fused ---------------------------------------------------------------------------------------------


def _ewc_case(shapes, p_dtype, a_dtype, f_dtype, seed=0):
    params = rand(shapes, p_dtype, seed)
    anchors = [(p.double() + 0.1 * x.double()).to(a_dtype) for p, x in zip(params, rand(shapes, torch.float64,
                                                                                         seed + 1))]
    fishers = rand(shapes, f_dtype, seed + 2, positive=True)
    grads = rand(shapes, p_dtype, seed + 3)
    return params, anchors, fishers, grads


def _check_ewc(params, anchors, fishers, grads, lam, write_grad, accumulate):
    want_g = clone(grads) if write_grad else []
    got_g = clone(grads) if write_grad else []
    want = ref_ewc_fused(params, anchors, fishers, want_g, lam, write_grad, accumulate)
    got = OPS.ewc_fused(params, anchors, fishers, got_g, lam, write_grad, accumulate)
    assert got.shape == () and got.dtype == want.dtype and got.device.type == "cpu"
    assert abs(float(got) - float(want)) <= penalty_bound(params, anchors, fishers, lam), (float(got), float(want))
    assert_bitwise(got_g, want_g, "grads")


MODES = {"penalty": (False, False), "write": (True, False), "accumulate": (True, True)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("dtype", FLOATS, ids=_name)
def test_ewc_fused_matches_reference(dtype, sizes, mode):
    params, anchors, fishers, grads = _ewc_case(SIZES[sizes], dtype, dtype, dtype)
    _check_ewc(params, anchors, fishers, grads, 0.7, *MODES[mode])


@pytest.mark.parametrize("p,a,f", list(itertools.product(FLOATS, FLOATS, FLOATS)),
                         ids=["-".join(map(_name, c)) for c in itertools.product(FLOATS, FLOATS, FLOATS)])
def test_ewc_fused_every_dtype_combination(p, a, f):
    params, anchors, fishers, grads = _ewc_case([0, 1, 7, 33000, 5], p, a, f, seed=3)
    _check_ewc(params, anchors, fishers, grads, 2.5, True, True)


def test_ewc_fused_mixed_dtypes_in_one_call():
    combos = list(itertools.product(FLOATS, FLOATS, STATES))
    params, anchors, fishers, grads = [], [], [], []
    for i, (p, a, f) in enumerate(combos * 2):
        pp, aa, ff, gg = _ewc_case([(i * 389) % 2000], p, a, f, seed=i)
        params += pp
        anchors += aa
        fishers += ff
        grads += gg
    for write_grad, accumulate in MODES.values():
        _check_ewc(params, anchors, fishers, grads, 1.3, write_grad, accumulate)


def test_ewc_fused_result_dtype_follows_params():
    params, anchors, fishers, _ = _ewc_case([3, 4], torch.float32, torch.float32, torch.float32)
    assert OPS.ewc_fused(params, anchors, fishers, [], 1.0, False, False).dtype == torch.float32
    params[1] = params[1].double()
    assert OPS.ewc_fused(params, anchors, fishers, [], 1.0, False, False).dtype == torch.float64
    empty = [torch.empty(0)]
    out = OPS.ewc_fused(empty, empty, empty, [], 1.0, False, False)
    assert out.dtype == torch.float32 and float(out) == 0.0


def test_ewc_fused_deterministic_across_thread_counts():
    params, anchors, fishers, grads = _ewc_case([300_001, 7, 0, 65_536, 123_457], torch.float32, torch.bfloat16,
                                                torch.float32, seed=7)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            g = clone(grads)
            results.append((OPS.ewc_fused(params, anchors, fishers, g, 0.3, True, True), g))
    finally:
        torch.set_num_threads(threads)
    for out, g in results[1:]:
        assert torch.equal(out, results[0][0])
        assert_bitwise(g, results[0][1], "grads")


def test_safety_checks_raise():
    a = [torch.zeros(3)]
    with pytest.raises(RuntimeError, match="grads"):
        OPS.fisher_accumulate_(a, [torch.zeros(3), torch.zeros(3)], 1.0, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS.fisher_accumulate_([torch.zeros(3, 2).t()], [torch.zeros(2, 3)], 1.0, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        OPS.fisher_accumulate_([torch.zeros(3, dtype=torch.float16)], [torch.zeros(3)], 1.0, 1.0)
    with pytest.raises(RuntimeError, match="grads"):
        OPS.ewc_fused(a, a, a, [torch.zeros(3, dtype=torch.float64)], 1.0, True, True)


# ---- instruction sets (FORGETKERN_CPU_ISA) -----------------------------------------------------------------
# Every ISA this CPU supports must give the bits of the torch backend (NaN: any NaN) and the bits of the
# baseline kernels (NaN payloads and the penalty included).

ISA_VAR = "FORGETKERN_CPU_ISA"
ISAS = ("baseline", "avx2", "avx512")


def _best_isa() -> str:
    if OPS is None:
        return "baseline"
    saved = os.environ.pop(ISA_VAR, None)
    try:
        return OPS.cpu_isa()
    finally:
        if saved is not None:
            os.environ[ISA_VAR] = saved


BEST_ISA = _best_isa()
SUPPORTED_ISAS = ISAS[:ISAS.index(BEST_ISA) + 1]


def isa_params():
    return [pytest.param(name, id=name, marks=[] if name in SUPPORTED_ISAS else [
        pytest.mark.skip(reason=f"this CPU supports up to {BEST_ISA}")]) for name in ISAS]


@pytest.fixture
def use_isa(monkeypatch):
    """use_isa(name): the CPU kernels run with that ISA until the test ends."""
    def use(name):
        monkeypatch.setenv(ISA_VAR, name)
        assert OPS.cpu_isa() == name
    return use


_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def assert_bits(got, want, what, *, any_nan=False):
    """Equal bit patterns; with any_nan, a NaN matches any NaN (torch's own NaN payloads depend on its path)."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, what
        same = g.view(_INT_VIEW[g.dtype]) == w.view(_INT_VIEW[w.dtype])
        if any_nan:
            same |= torch.isnan(g) & torch.isnan(w)
        if not bool(same.all()):
            bad = (~same).nonzero()[:3].flatten().tolist()
            raise AssertionError(f"{what}[{i}] ({g.dtype}) differs at {bad}: got {g.flatten()[bad].tolist()} "
                                 f"want {w.flatten()[bad].tolist()}")


ISA_SIZES = [0, 1, 7, 65537]


@contextlib.contextmanager
def torch_on_one_thread():
    """For test data and the torch reference: on a busy 2-core machine each of torch's parallel regions can wait
    for a scheduler slice (milliseconds), hundreds of them per test. The cpp kernels run on all threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _with_nonfinite(grads):
    """Non-finite elements in the vector body and in the tail of every non-empty tensor but the 1-element one."""
    for g in grads:
        n = g.numel()
        if n >= 7:
            g[2], g[n - 1] = float("nan"), float("inf")
            g[n // 2] = -float("inf")
    return grads


def _special_grads(dtype, seed):
    grads = _with_nonfinite(rand(ISA_SIZES, dtype, seed, scale=3.0))
    if dtype in (torch.float16, torch.bfloat16):  # subnormals, the largest finite values, signalling NaNs
        bits = torch.tensor([0x0001, 0x83FF, 0x7BFF, 0xFBFF, 0x7C01, 0xFD55, 0x7F7F, 0x0080], dtype=torch.int32)
        grads[3][100:108] = bits.to(torch.int16).view(dtype)
    return grads


def _fisher_run(backend, fishers, grads):
    fishers = clone(fishers)
    with forgetkern.use_backend(backend), torch_on_one_thread() if backend == "torch" else contextlib.nullcontext():
        found = forgetkern.fisher_accumulate_(fishers, grads, decay=0.9, scale=0.1)
    return float(found), fishers


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("state", STATES, ids=_name)
def test_isa_fisher_accumulate_bit_identical(use_isa, isa, state):
    for grad in FLOATS:
        with torch_on_one_thread():
            fishers = rand(ISA_SIZES, state, 0, positive=True)
            grads = _special_grads(grad, 1)
        want_found, want = _fisher_run("torch", fishers, grads)
        use_isa("baseline")
        base_found, base = _fisher_run("cpp", fishers, grads)
        use_isa(isa)
        found, got = _fisher_run("cpp", fishers, grads)
        assert found == base_found == want_found == 1.0
        assert_bits(got, want, f"{isa} {_name(state)}/{_name(grad)} vs torch: fishers", any_nan=True)
        assert_bits(got, base, f"{isa} {_name(state)}/{_name(grad)} vs baseline: fishers")


def _ewc_run(backend, params, anchors, fishers, grads, write_grad, accumulate):
    # accumulate: the public op; penalty only / write (the autograd forward / backward): the dispatching op
    grads = clone(grads) if write_grad else []
    with forgetkern.use_backend(backend), torch_on_one_thread() if backend == "torch" else contextlib.nullcontext():
        if accumulate:
            out = forgetkern.ewc_penalty_and_grad_(params, anchors, fishers, lam=0.7, grads=grads)
        else:
            out = torch.ops.forgetkern.ewc_fused(params, anchors, fishers, grads, 0.7, write_grad, False)
    return out, grads


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("p_dtype", FLOATS, ids=_name)
def test_isa_ewc_bit_identical(use_isa, isa, mode, p_dtype):
    write_grad, accumulate = MODES[mode]
    params, anchors, fishers, grads = [], [], [], []
    with torch_on_one_thread():
        for i, (a_dtype, f_dtype) in enumerate(itertools.product(FLOATS, FLOATS)):
            p, a, f, g = _ewc_case(ISA_SIZES, p_dtype, a_dtype, f_dtype, seed=10 * i)
            params, anchors, fishers, grads = params + p, anchors + a, fishers + f, grads + _with_nonfinite(g)
        bound = penalty_bound(params, anchors, fishers, 0.7)
    want, want_g = _ewc_run("torch", params, anchors, fishers, grads, write_grad, accumulate)
    use_isa("baseline")
    base, base_g = _ewc_run("cpp", params, anchors, fishers, grads, write_grad, accumulate)
    use_isa(isa)
    got, got_g = _ewc_run("cpp", params, anchors, fishers, grads, write_grad, accumulate)
    assert got.dtype == want.dtype
    assert abs(float(got) - float(want)) <= bound, (float(got), float(want))
    assert_bits([got], [base], f"{isa} vs baseline: penalty")
    assert_bits(got_g, want_g, f"{isa} vs torch: grads", any_nan=True)
    assert_bits(got_g, base_g, f"{isa} vs baseline: grads")


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=_name)
def test_isa_penalty_summation_order(use_isa, isa, dtype):
    # theta = 1, theta* = 0: the terms are F. Per 32 elements F holds +big at 0, -big at 16 and 1 elsewhere,
    # big = 2^(mantissa bits + 2), so big + 1 rounds back to big. In the kernels' order (16 interleaved lanes
    # per tile of 1024, then lanes pairwise) lane 0 alternates +big, -big and the other lanes add exact ones:
    # the penalty is exactly lam/2 * (number of ones). A sum in any other interleaving loses ones.
    use_isa(isa)
    n = 65536
    big = 2.0 ** (26 if dtype == torch.float32 else 55)
    f = torch.ones(n, dtype=dtype)
    f[0::32], f[16::32] = big, -big
    ones = n - 2 * (n // 32)
    out = OPS.ewc_fused([torch.ones(n, dtype=dtype)], [torch.zeros(n, dtype=dtype)], [f], [], 2.0, False, False)
    assert float(out) == ones


@pytest.mark.parametrize("isa", isa_params())
def test_isa_every_half_converts_exactly(use_isa, isa):
    # F = every fp16 bit pattern, theta = 1, theta* = 0, lam = 1, write mode: grads (float32) = float(F).
    half = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    ones, zeros = torch.ones(half.shape), torch.zeros(half.shape)
    out = {}
    for name in ("baseline", isa):
        use_isa(name)
        out[name] = [torch.empty(half.shape)]
        OPS.ewc_fused([ones], [zeros], [half], out[name], 1.0, True, False)
    want = half.float()
    assert_bits(out[isa], [want], f"{isa} vs torch: float(half)", any_nan=True)
    assert_bits(out[isa], out["baseline"], f"{isa} vs baseline: float(half)")


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=_name)
def test_float_to_16bit_rounding_matches_torch(use_isa, isa, dtype):
    # ewc with param 0, anchor -x (float32), F 1, lam 1, write mode: grad = round_to_dtype(x), so the kernel's
    # float -> 16-bit rounding is compared with torch's over many float bit patterns (ties, subnormals,
    # overflow, inf, nan). NaN: fp16 0x7E00 with the NaN's sign, bf16 0x7FC0.
    use_isa(isa)
    gen = torch.Generator().manual_seed(0)
    bits = torch.cat([torch.arange(0, 2**32, 4099, dtype=torch.int64),
                      torch.randint(0, 2**32, (1 << 20,), generator=gen, dtype=torch.int64)])
    x = (bits - (bits >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)
    x = torch.cat([x, torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                                    1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, float("inf"), -float("inf")])])
    grads = [torch.empty(x.shape, dtype=dtype)]
    anchor = -x  # a NaN keeps its payload through 0 - anchor, with the anchor's sign
    OPS.ewc_fused([torch.zeros(x.shape, dtype=dtype)], [anchor], [torch.ones_like(x)], grads, 1.0, True, False)
    want = x.to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(grads[0]), nan)
    assert torch.equal(grads[0][~nan].view(torch.int16), want[~nan].view(torch.int16))
    got_nan = grads[0][nan].view(torch.int16).int() & 0xFFFF
    if dtype == torch.float16:
        assert torch.equal(got_nan, 0x7E00 | (anchor[nan].view(torch.int32) < 0).int() << 15)
    else:
        assert bool((got_nan == 0x7FC0).all())


def test_cpu_isa_is_reported(monkeypatch):
    monkeypatch.delenv(ISA_VAR, raising=False)
    assert OPS.cpu_isa() == BEST_ISA
    monkeypatch.setenv(ISA_VAR, "BaseLine")  # case-insensitive
    assert OPS.cpu_isa() == "baseline"
    from forgetkern.cli import env_report

    assert "CPU ISA        baseline (FORGETKERN_CPU_ISA=BaseLine" in env_report()


@pytest.mark.parametrize("value", ["sse9", "avx-512", "native"])
def test_unknown_cpu_isa_raises(monkeypatch, value):
    monkeypatch.setenv(ISA_VAR, value)
    match = rf"{ISA_VAR}='{value}' is not an instruction set .* one of: baseline, avx2, avx512"
    with pytest.raises(RuntimeError, match=match):
        OPS.cpu_isa()
    with pytest.raises(RuntimeError, match=match):
        OPS.fisher_accumulate_([torch.zeros(3)], [torch.zeros(3)], 1.0, 1.0)
    with pytest.raises(RuntimeError, match=match):
        OPS.ewc_fused([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [], 1.0, False, False)


@pytest.mark.parametrize("isa", [i for i in ISAS if i not in SUPPORTED_ISAS] or [
    pytest.param("avx512", marks=pytest.mark.skip(reason="this CPU supports every ISA"))])
def test_unsupported_cpu_isa_raises(monkeypatch, isa):
    monkeypatch.setenv(ISA_VAR, isa)
    with pytest.raises(RuntimeError, match=rf"{ISA_VAR}='{isa}' is not supported by this CPU, which supports "
                                           rf"up to {BEST_ISA}; set it to one of: baseline"):
        OPS.fisher_accumulate_([torch.zeros(3)], [torch.zeros(3)], 1.0, 1.0)
