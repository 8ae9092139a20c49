"""lora_linear: every backend against an fp64 oracle, every gradient, dropout, siblings, bad inputs, AOT.

Tolerances are earned, flash-attention style: a backend's max error against the fp64 oracle (computed from the
same rounded inputs and the same dropout mask) must stay within twice the error of plain PyTorch in that dtype
(PEFT's formula evaluated with torch ops and autograd), plus one ulp of the result's magnitude (the Triton
interpreter rounds bf16 by truncation). Triton runs under TRITON_INTERPRET=1 on small shapes.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import forgetkern
from forgetkern.ops.lora_linear import LoraAdapter, lora_linear, lora_linear_siblings
from forgetkern.reference import lora_linear as ref
from tests._helpers import EPS, HAS_CUDA, backend_devices, to_cpu, to_dev

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _backends():
    return backend_devices(op="lora_linear")


# (leading dims, in, out, [(rank, scaling, dropout_p, lora_bias)], bias, training)
CASES = {
    "plain": ((2, 19), 45, 29, [(5, 2.0, 0.0, False)], True, True),
    "multi-dropout": ((37,), 45, 29, [(5, 0.5, 0.3, True), (20, 2.0, 0.0, False)], False, True),
    "eval-no-dropout": ((3, 4, 3), 33, 40, [(8, 1.0, 0.5, True)], True, False),
    "empty-batch": ((0, 5), 12, 6, [(3, 0.5, 0.3, True)], True, True),
    "no-adapters": ((7,), 20, 9, [], True, True),
}


def _make(lead, k_in, n_out, ads, bias, dtype, seed=0, n_layers=1, ad_dtype=None):
    """Inputs generated in fp64, rounded to ``dtype`` (adapters: ``ad_dtype``, default ``dtype``); leaves
    requiring grad (weights frozen)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0, grad=True, dt=dtype):
        v = (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dt)
        return v.requires_grad_(grad)

    def ta(*shape, scale=1.0):
        return t(*shape, scale=scale, dt=ad_dtype or dtype)

    x = t(*lead, k_in)
    layers = []
    for li in range(n_layers):
        n = n_out + 3 * li
        w = t(n, k_in, scale=k_in ** -0.5, grad=False)
        b = t(n) if bias else None
        adapters = [LoraAdapter(ta(r, k_in, scale=k_in ** -0.5), ta(n, r, scale=r ** -0.5), s, p,
                                ta(n) if lb else None) for r, s, p, lb in ads]
        layers.append((w, b, adapters))
    return x, layers


def _leaves(x, layers):
    out = [x]
    for w, b, ads in layers:
        out += [b] if b is not None else []
        for a in ads:
            out += [a.lora_a, a.lora_b] + ([a.lora_bias] if a.lora_bias is not None else [])
    return out


def _naive(x, layers, training, seed, up=None):
    """PEFT's formula with torch ops (``up``: evaluate in fp64 on upcast copies of the leaves), with PEFT's casts:
    x to the adapter's dtype for the branch, the sum in the promoted dtype, the result in x's dtype."""
    keys = ref.dropout_keys(seed, sum(len(ads) for _, _, ads in layers))
    ys, k = [], 0
    cv = (lambda v: up[id(v)]) if up is not None else (lambda v: v)
    xx = cv(x)
    x2 = xx.reshape(-1, xx.shape[-1])
    for w, b, ads in layers:
        y = torch.nn.functional.linear(xx, cv(w), cv(b) if b is not None else None)
        for a in ads:
            xd = x2.to(cv(a.lora_a).dtype)
            if training and a.dropout_p > 0:
                keep = ref.keep_mask(keys[k], a.dropout_p, x2.shape[0], x2.shape[1], x2.device).to(x2.dtype)
                xd = xd * keep.to(xd.dtype) * ref.keep_scale(a.dropout_p)
            lb = cv(a.lora_bias) if a.lora_bias is not None else None
            lora = torch.nn.functional.linear(xd @ cv(a.lora_a).t(), cv(a.lora_b), lb) * a.scaling
            y = y + lora.reshape(y.shape)
            k += 1
        ys.append(y.to(xx.dtype))
    return ys


def _grads(ys, leaves, cot):
    return list(torch.autograd.grad(ys, leaves, cot))


def _run_case(backend, device, dtype, lead, k_in, n_out, ads, bias, training, n_layers=1, seed=11, ad_dtype=None):
    x, layers = _make(lead, k_in, n_out, ads, bias, dtype, n_layers=n_layers, ad_dtype=ad_dtype)
    leaves = _leaves(x, layers)
    up = {id(v): v.detach().double().requires_grad_(v.requires_grad) for v in leaves + [w for w, _, _ in layers]}
    oracle = _naive(x, layers, training, seed, up)
    gen = torch.Generator().manual_seed(3)
    cots = [torch.randn(y.shape, generator=gen, dtype=F64) for y in oracle]
    want = [y.detach() for y in oracle] + _grads(oracle, [up[id(v)] for v in leaves], cots)
    # the same leaves on ``device`` (the very same objects on CPU); plain torch runs there too, so the tolerance
    # is earned against that device's own low-precision arithmetic
    x, layers = to_dev((x, layers), device)
    leaves, cots = _leaves(x, layers), [c.to(device) for c in cots]
    plain_out = _naive(x, layers, training, seed)
    plain = to_cpu([y.detach() for y in plain_out] + _grads(plain_out, leaves, [c.to(dtype) for c in cots]))
    with forgetkern.use_backend(backend):
        if n_layers == 1:
            w, b, adl = layers[0]
            got_out = [lora_linear(x, w, b, adl, training=training, seed=seed)]
        else:
            got_out = lora_linear_siblings(x, [w for w, _, _ in layers], [b for _, b, _ in layers],
                                           [a for _, _, a in layers], training=training, seed=seed)
        got = to_cpu([y.detach() for y in got_out] + _grads(got_out, leaves, [c.to(dtype) for c in cots]))
    names = [f"y{i}" for i in range(n_layers)] + ["dx"] + [f"d{i}" for i in range(len(leaves) - 1)]
    for name, gt, pl, wt in zip(names, got, plain, want):
        assert gt.dtype == pl.dtype and gt.shape == wt.shape, name
        if wt.numel() == 0:
            continue
        err = (gt.double() - wt).abs().max().item()
        base = (pl.double() - wt).abs().max().item()
        tol = 2 * base + EPS[pl.dtype] * wt.abs().max().item() + 1e-300
        assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e} (plain torch {base:.3e})"


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_fp64_oracle(backend, device, dtype, case):
    _run_case(backend, device, dtype, *CASES[case])


@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] in ("torch", "cpp")])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("case", ["plain", "multi-dropout", "eval-no-dropout", "empty-batch"])
def test_float32_adapters_on_half_x_match_fp64_oracle(backend, device, dtype, case):
    """PEFT's autocast_adapter_dtype layout: 16-bit x / base, float32 adapters, PEFT's casts (see _naive)."""
    _run_case(backend, device, dtype, *CASES[case], ad_dtype=F32)


def test_float32_adapters_siblings_and_errors():
    _run_case("torch", "cpu", BF16, (3, 7), 24, 16, [(4, 2.0, 0.0, True)], True, False, n_layers=3, ad_dtype=F32)
    x, [(w, b, ads)] = _make((5,), 12, 6, [(3, 1.0, 0.0, False), (2, 1.0, 0.0, False)], False, BF16,
                             ad_dtype=F32)
    with pytest.raises(TypeError, match=r"mix dtypes"):
        lora_linear(x, w, b, [ads[0], ads[1]._replace(lora_a=ads[1].lora_a.to(BF16),
                                                       lora_b=ads[1].lora_b.to(BF16))], training=False)
    with pytest.raises(TypeError, match=r"lora_b has dtype torch.bfloat16 but lora_a has torch.float32"):
        lora_linear(x, w, b, [ads[0]._replace(lora_b=ads[0].lora_b.to(BF16))], training=False)
    with pytest.raises(TypeError, match="float32 adapters on a float16/bfloat16 x"):  # float32 x: one dtype
        lora_linear(x.float(), w.float(), b, [ads[0]._replace(lora_a=ads[0].lora_a.double(),
                                                              lora_b=ads[0].lora_b.double())], training=False)
    if "triton" in [p.values[0] for p in _backends()]:
        x, w, b, ads = to_dev((x, w, b, ads), "cuda" if HAS_CUDA else "cpu")
        with forgetkern.use_backend("triton"), pytest.raises(TypeError, match="eager mode only"):
            lora_linear(x, w, b, ads[:1], training=False)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "dropout"])
def test_siblings_match_fp64_oracle(backend, device, dtype, training):
    ads = [(5, 0.5, 0.2, True), (18, 1.5, 0.0, False)]
    _run_case(backend, device, dtype, (2, 17), 40, 24, ads, True, training, n_layers=3)


def test_gradcheck_fp64_with_dropout():
    x, layers = _make((4, 3), 7, 6, [(3, 0.7, 0.4, True), (2, 1.3, 0.0, False)], True, F64)
    w, b, ads = layers[0]
    leaves = _leaves(x, layers)

    def f(*vals):
        xv, bv, a0, b0, lb0, a1, b1 = vals
        adl = [LoraAdapter(a0, b0, 0.7, 0.4, lb0), LoraAdapter(a1, b1, 1.3, 0.0)]
        return lora_linear(xv, w, bv, adl, training=True, seed=5)

    with forgetkern.use_backend("torch"):
        assert torch.autograd.gradcheck(f, tuple(leaves))


def test_keep_rate_and_independence():
    n = 1 << 20
    for p in (0.05, 0.5, 0.9):
        keep = ref.keep_mask(ref.dropout_keys(1, 1)[0], p, 1024, n // 1024)
        rate, sd = keep.double().mean().item(), ((1 - p) * p / n) ** 0.5
        assert abs(rate - (1 - p)) < 6 * sd, (p, rate)
        # neighbouring elements (in a row, in a column) are uncorrelated
        for a, c in ((keep[:, 1:], keep[:, :-1]), (keep[1:], keep[:-1])):
            both = (a & c).double().mean().item()
            assert abs(both - (1 - p) ** 2) < 6 * sd, (p, both)
    k = ref.dropout_keys(7, 2)
    m0, m1 = ref.keep_mask(k[0], 0.5, 64, 64), ref.keep_mask(k[1], 0.5, 64, 64)
    assert 0.4 < (m0 == m1).double().mean().item() < 0.6  # adapters of one call get independent masks
    assert ref.keep_mask(k[0], 0.0, 8, 8).all() and not ref.keep_mask(k[0], 1.0, 8, 8).any()


@pytest.mark.parametrize("backend,device", _backends())
def test_seed_reproducibility(backend, device):
    x, layers = to_dev(_make((9,), 20, 12, [(4, 1.0, 0.5, False)], False, F32), device)
    w, b, ads = layers[0]
    with forgetkern.use_backend(backend):
        y1 = lora_linear(x, w, b, ads, training=True, seed=3)
        y2 = lora_linear(x, w, b, ads, training=True, seed=3)
        y3 = lora_linear(x, w, b, ads, training=True, seed=4)
        torch.manual_seed(0)
        z1 = lora_linear(x, w, b, ads, training=True)
        z2 = lora_linear(x, w, b, ads, training=True)
        torch.manual_seed(0)
        z3 = lora_linear(x, w, b, ads, training=True)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert torch.equal(z1, z3) and not torch.equal(z1, z2)


def test_header_hash_matches_reference(tmp_path):
    """The C++/CUDA header computes bit for bit the mask of the reference (and so of Triton)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "h.cpp"
    src.write_text(textwrap.dedent("""
        #include <cstdio>
        #include "forgetkern/lora_linear.h"
        using namespace forgetkern;
        int main() {
          const unsigned keys[3] = {0u, 12345u, 4294967280u};
          const double ps[3] = {0.1, 0.5, 0.77};
          for (int t = 0; t < 3; ++t) {
            std::printf("%d %.9g\\n", lora_keep_threshold(ps[t]), lora_keep_scale(ps[t]));
            for (unsigned r = 0; r < 13; ++r) {
              const unsigned rh = lora_row_hash(keys[t], r + 65530u);
              for (unsigned c = 0; c < 29; ++c) std::putchar(lora_keep(rh, c, lora_keep_threshold(ps[t])) ? '1' : '0');
              std::putchar('\\n');
            }
          }
        }"""))
    exe = tmp_path / "h"
    subprocess.run([cxx, "-std=c++17", "-I", os.path.join(ROOT, "csrc", "include"), str(src), "-o", str(exe)],
                   check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    for t, (key, p) in enumerate(((0, 0.1), (12345, 0.5), (4294967280, 0.77))):
        block = lines[t * 15:(t + 1) * 15]
        assert int(block[0]) == ref.keep_threshold(p)
        assert float(block[1]) == pytest.approx(ref.keep_scale(p), rel=1e-7)
        mask = ref.keep_mask(key, p, 13, 29, row0=65530)
        assert ["".join("1" if v else "0" for v in row) for row in mask.tolist()] == block[2:]


def test_forward_allocates_one_output_and_saves_rank_r():
    """Torch path: one output-sized buffer (addmm, then addmm_ into it); saved: x and xa only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x, layers = _make((64,), 48, 40, [(4, 2.0, 0.0, False)], True, F32)
    w, b, ads = layers[0]

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == (64, 40) and not func._schema.is_mutable:
                self.n += 1
            return out

    ad = ads[0]
    with torch.no_grad(), Count() as c:
        (y,), xa = ref.lora_linear_fwd(x, [w], [b], [0], [ad.lora_a], [ad.lora_b], [0], [2.0], [0.0], [0])
    assert c.n == 1 and xa.shape == (64, 4)  # the output itself, nothing else of its size
    saved = []
    with forgetkern.use_backend("torch"), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, w, b, ads, training=False)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].shape == (64, 48)  # x
    assert any(t.shape == (64, 4) for t in saved)      # xa


def test_frozen_weight_gets_no_grad():
    x, layers = _make((5,), 8, 6, [(2, 1.0, 0.0, False)], True, F32)
    w, b, ads = layers[0]
    w = w.detach().requires_grad_()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        lora_linear(x, w, b, ads, training=False).sum().backward()
    assert w.grad is None and x.grad is not None and b.grad is not None


def test_bad_inputs():
    x, layers = _make((5,), 8, 6, [(2, 1.0, 0.0, False)], True, F32)
    w, b, (ad,) = layers[0]
    bad = [
        (dict(adapters=[ad._replace(lora_b=torch.randn(6, 3))]), ValueError, r"adapters\[0\]\.lora_b.*rank"),
        (dict(adapters=[ad._replace(lora_a=torch.randn(2, 9))]), ValueError, r"adapters\[0\]\.lora_a.*\(2, 8\)"),
        (dict(weight=torch.randn(6, 9)), ValueError, r"weight has shape"),
        (dict(bias=torch.randn(7)), ValueError, r"bias has shape"),
        (dict(adapters=[ad._replace(lora_b=torch.randn(7, 2))]), ValueError, r"lora_b"),
        (dict(weight=w.double()), TypeError, r"weight has dtype torch.float64 but x has torch.float32"),
        (dict(adapters=[ad._replace(lora_a=ad.lora_a.half())]), TypeError, r"adapters\[0\]\.lora_a has dtype"),
        (dict(adapters=[ad._replace(dropout_p=1.5)]), ValueError, r"dropout_p must be in \[0, 1\]"),
        (dict(adapters=[ad._replace(scaling=None)]), TypeError, r"scaling must be a finite"),
        (dict(adapters=[(ad.lora_a, ad.lora_b)]), TypeError, r"adapters\[0\] must be a LoraAdapter"),
        (dict(adapters=ad), TypeError, r"adapters must be a sequence"),
        (dict(x=x.int()), TypeError, r"x has dtype"),
        (dict(seed=1.5), TypeError, r"seed must be an int"),
    ]
    for change, exc, pattern in bad:
        kw = dict(x=x, weight=w, bias=b, adapters=[ad], seed=None)
        kw.update(change)
        with pytest.raises(exc, match=pattern):
            lora_linear(kw["x"], kw["weight"], kw["bias"], kw["adapters"], training=True, seed=kw["seed"])
    with pytest.raises(ValueError, match="equal lengths"):
        lora_linear_siblings(x, [w, w], [b], [[ad], [ad]], training=False)


# the cuda backend's opcheck only where it can run (a CPU-only run keeps its three cases)
@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] != "cuda" or HAS_CUDA])
def test_opcheck(backend, device):
    with torch.device(device):
        x = torch.randn(6, 16)
        w, b = torch.randn(5, 16), torch.randn(5)
        a, bb = torch.randn(3, 16, requires_grad=True), torch.randn(5, 3, requires_grad=True)
        g = torch.randn(6, 5)
    args = (x, [w], [b], [0], [a, a], [bb, bb], [0, 0], [0.5, 2.0], [0.25, 0.0], [123, 77])
    with forgetkern.use_backend(backend):
        torch.library.opcheck(torch.ops.forgetkern.lora_linear_fwd.default, args)
        xa = torch.ops.forgetkern.lora_linear_fwd(*args)[1].detach()
        bargs = ([g], x, [w], [a.detach()] * 2, [bb.detach()] * 2, xa, [0, 0], [0.5, 2.0],
                 [0.25, 0.0], [123, 77], True, True, True)
        torch.library.opcheck(torch.ops.forgetkern.lora_linear_bwd.default, bargs)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", [b for b in _backends() if b.values[0] in ("torch", "cpp")])
def test_torch_compile_fullgraph(backend, device):
    x, layers = to_dev(_make((7,), 16, 12, [(4, 0.5, 0.2, True)], True, F32), device)
    w, b, ads = layers[0]
    f = torch.compile(lambda xv: lora_linear(xv, w, b, ads, training=True, seed=9), fullgraph=True,
                      backend="aot_eager")
    with forgetkern.use_backend(backend):
        y = f(x)
        y.sum().backward()
        g1 = x.grad.clone()
        x.grad = None
        y2 = lora_linear(x, w, b, ads, training=True, seed=9)
        y2.sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(g1, x.grad)
    assert ads[0].lora_a.grad is not None and ads[0].lora_bias.grad is not None


def test_launches_are_aot_specs():
    """Every kernel launch of the Triton launchers (fp16/bf16/fp32, sm_80/sm_90; aligned, unaligned and offset
    inputs; ranks 8/16/5+20, dropout, siblings) is exactly a specialisation that AOT_SPECS lists: same
    signature, constexprs (the JIT's value-1 ones included), divisibility hints and num_warps/num_stages."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from forgetkern.testing import aot
        from forgetkern.triton import lora_linear as L
        from forgetkern.reference.lora_linear import dropout_keys
        specs = {aot.spec_key(s.kernel, s.signature, s.constexprs, s.options, s.attrs) for s in L.AOT_SPECS}

        def case(dt, m, k, ns, ranks, ps, bias, offset=0):
            g = torch.Generator().manual_seed(0)
            t = lambda *s: torch.randn(*s, generator=g).to(dt)
            x = t(m * k + offset)[offset:].view(m, k)
            ws, layer = [t(n, k) for n in ns], [i % len(ns) for i in range(len(ranks))]
            a, b = [t(r, k) for r in ranks], [t(ns[layer[i]], r) for i, r in enumerate(ranks)]
            keys, sc = dropout_keys(3, len(ranks)), [0.5] * len(ranks)
            ys, xa = L.lora_linear_fwd(x, ws, [t(n) for n in ns] if bias else [], list(range(len(ns))) if bias
                                       else [], a, b, layer, sc, ps, keys)
            L.lora_linear_bwd([t(m, n) for n in ns], x, ws, a, b, xa, layer, sc, ps, keys, True, True, True)

        n = 0
        for arch in ("sm80", "sm90"):
            L._arch = lambda x: "fp32" if x.dtype == torch.float32 else arch
            with aot.recorded_launches(int(arch[2:])) as launches:
                for dt in (torch.float16, torch.bfloat16, torch.float32):
                    case(dt, 256, 64, [96], [16], [0.0], True)
                    case(dt, 4096, 128, [64, 80], [8, 16], [0.1, 0.0], False)
                    case(dt, 37, 45, [29], [5, 20], [0.3, 0.0], True)
                    case(dt, 64, 64, [64], [16], [0.2], True, offset=1)
            missing = [k for k in launches if k not in specs]
            assert not missing, (arch, missing[0])
            n += len(launches)
        print(n)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.strip().splitlines()[-1]) >= 150
