"""Property-based suite over the public ops and their backends (hypothesis; profiles in tests/conftest.py).

Each property compares a backend with a float64 oracle (or the torch reference) under earned tolerances, over
random shapes with 0/1 sizes, memory layouts (offset, transposed, strided views), dtypes, special values
(non-finite, overflowing), aliasing between arguments, and, for FisherEstimator, random padding. What is
asserted is what README "What forgetkern guarantees" and the op docstrings promise: non-finite or overflowing
updates keep the old value and raise the returned flag; non-contiguous state and memory shared with a written
tensor are errors that name the argument and leave the state untouched.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import forgetkern
from forgetkern.ops.lora_linear import LoraAdapter
from forgetkern.reference import lora_linear as lref
from tests._helpers import EPS, assert_close_scaled
from tests._prop_strategies import (BF16, F16, F32, F64, LAYOUTS, NONFINITE, SPECIALS, acc_dtype, backend_params,
                                    earned_close, examples, inject, injections, materialize, overlapping, randn,
                                    shapes)

STATE = (F32, BF16, F64)
# in-place lists must be contiguous: draw the layouts that are (plain, at an offset) more often
LIST_LAYOUTS = st.sampled_from(("contiguous", "offset") * 3 + ("transposed", "strided"))
INPUT = (F32, F16, BF16, F64)


# ---- fisher_accumulate_ ----------------------------------------------------------------------------------------

@st.composite
def fisher_case(draw):
    n = draw(st.integers(0, 3))
    specs = []
    for _ in range(n):
        shape = draw(shapes(3, 6))
        state = draw(st.sampled_from(STATE))
        gdt = draw(st.sampled_from(INPUT))
        specs.append(dict(shape=shape, state=state, grad=gdt, seed=draw(st.integers(0, 2**16)),
                          g_special=draw(injections()),
                          f_special=draw(injections((3e38, 1.5e308) if state == F64 else (3e38,), 1)),
                          f_layout=draw(LIST_LAYOUTS), g_layout=draw(LIST_LAYOUTS)))
    decay = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]) | st.floats(0, 2))
    scale = draw(st.sampled_from([0.25, 1.0, 2.0]) | st.floats(0.25, 4))
    return specs, decay, scale


def _fisher_oracle(f_old, g, decay, scale):
    """(expected value, skipped mask, magnitude, ambiguous mask): fp64 math, overflow judged against the state
    dtype's range; ``ambiguous`` marks updates within 1% of that range, or squares within 1% of float32's."""
    f64, g64 = f_old.double(), g.double()
    new = decay * f64 + scale * g64 * g64
    top = torch.finfo(f_old.dtype).max
    over = new.abs() > top * 1.01
    amb = (new.abs() > top / 1.01) & ~over
    if acc_dtype(f_old.dtype) == F32:  # the square is formed in float32
        sq = g64 * g64
        f32max = torch.finfo(F32).max
        amb |= (sq > f32max / 1.01) & (sq < f32max * 1.01)
    bad = ~torch.isfinite(g64)
    skip = bad | over
    return torch.where(skip, f64, new), skip, (decay * f64).abs() + scale * g64 * g64, amb & ~bad


@pytest.mark.parametrize("backend", backend_params())
@examples(12)
@given(case=fisher_case())
def test_fisher_accumulate_matches_oracle(backend, case):
    specs, decay, scale = case
    fishers, grads = [], []
    for s in specs:
        f = inject(randn(s["shape"], s["state"], s["seed"], positive=True), s["f_special"])
        g = inject(randn(s["shape"], s["grad"], s["seed"] + 1, scale=3.0), s["g_special"])
        fishers.append(materialize(f, s["f_layout"]))
        grads.append(materialize(g, s["g_layout"]))
    before = [f.clone() for f in fishers]
    bad = [f"{name}[{i}]" for name, xs in (("fishers", fishers), ("grads", grads))
           for i, x in enumerate(xs) if not x.is_contiguous()]
    if bad:  # every tensor of the lists must be contiguous: an error naming the first one, nothing written
        with forgetkern.use_backend(backend), pytest.raises(ValueError, match=r"is not contiguous"):
            forgetkern.fisher_accumulate_(fishers, grads, decay=decay, scale=scale)
        assert all(torch.equal(f, b) for f, b in zip(fishers, before))
        return
    oracles = [_fisher_oracle(f, g, decay, scale) for f, g in zip(before, grads)]
    assume(not any(bool(o[3].any()) for o in oracles))
    with forgetkern.use_backend(backend):
        found = forgetkern.fisher_accumulate_(fishers, grads, decay=decay, scale=scale)
    assert found.dtype == F32 and found.dim() == 0
    assert found.item() == float(any(bool(o[1].any()) for o in oracles))
    for i, (f, b, (want, skip, mag, _)) in enumerate(zip(fishers, before, oracles)):
        assert f.dtype == b.dtype
        assert torch.equal(f[skip], b[skip]), f"fishers[{i}]: a skipped element changed"
        ulps = 3.0 if f.dtype == F32 else 2.0
        assert_close_scaled(f[~skip], want[~skip], (mag + want.abs())[~skip], f.dtype, ulps, f"fishers[{i}]")


@pytest.mark.parametrize("backend", backend_params())
def test_fisher_accumulate_scale_zero_ignores_finite_gradient(backend):
    """scale=0 ignores a finite gradient whose square alone overflows float32: the product is (scale*g)*g."""
    fishers, grads = [torch.full((3,), 2.0)], [torch.tensor([1e20, 1.0, 3.0])]
    with forgetkern.use_backend(backend):
        found = forgetkern.fisher_accumulate_(fishers, grads, decay=0.5, scale=0.0)
    assert torch.equal(fishers[0], torch.full((3,), 1.0)) and found.item() == 0.0


@st.composite
def two_views(draw, length=12):
    """Two 1-D views of one storage at random offsets (same length), or a view and a copy."""
    n = draw(st.integers(0, 5))
    a, b = draw(st.integers(0, length - n)), draw(st.integers(0, length - n))
    return n, a, b, draw(st.booleans())


@examples(20)
@given(v=two_views(), which=st.sampled_from(["fishers-fishers", "fishers-grads"]))
def test_fisher_accumulate_refuses_shared_memory(v, which):
    n, a, b, copy = v
    base = torch.arange(1.0, 13.0)
    x, y = base[a:a + n], base[b:b + n]
    y = y.clone() if copy else y
    if which == "fishers-fishers":
        fishers, grads = [x, y], [torch.ones(n), torch.ones(n)]
    else:
        fishers, grads = [x], [y]
    snapshot = base.clone()
    if overlapping(x, y):
        with pytest.raises(ValueError, match=r"share memory"):
            forgetkern.fisher_accumulate_(fishers, grads, decay=0.5)
        assert torch.equal(base, snapshot)
        return
    want = [f.double() * 0.5 + g.double() ** 2 for f, g in zip(fishers, grads)]
    forgetkern.fisher_accumulate_(fishers, grads, decay=0.5)
    for f, w in zip(fishers, want):
        assert torch.equal(f.double(), w)


# ---- ewc_penalty_and_grad_ / ewc_penalty -------------------------------------------------------------------------

@st.composite
def ewc_case(draw):
    specs = []
    for _ in range(draw(st.integers(0, 3))):
        specs.append(dict(shape=draw(shapes(3, 6)), p=draw(st.sampled_from(INPUT)),
                          a=draw(st.sampled_from(INPUT)), f=draw(st.sampled_from(INPUT)),
                          seed=draw(st.integers(0, 2**16)),
                          layouts=draw(st.lists(LIST_LAYOUTS, min_size=4, max_size=4))))
    lam = draw(st.sampled_from([0.0, 0.7, 2.0]) | st.floats(0, 5))
    return specs, lam


@pytest.mark.parametrize("backend", backend_params())
@examples(12)
@given(case=ewc_case())
def test_ewc_matches_oracle(backend, case):
    specs, lam = case
    P, A, Fs, G = [], [], [], []
    for s in specs:
        p = randn(s["shape"], s["p"], s["seed"])
        a = (p.double() + 0.1 * randn(s["shape"], F64, s["seed"] + 1)).to(s["a"])
        f = randn(s["shape"], s["f"], s["seed"] + 2, positive=True)
        g = randn(s["shape"], s["p"], s["seed"] + 3, scale=0.01)
        for lst, t, lay in zip((P, A, Fs, G), (p, a, f, g), s["layouts"]):
            lst.append(materialize(t, lay))
    before = [g.clone() for g in G]
    if any(not t.is_contiguous() for lst in (P, A, Fs, G) for t in lst):
        with forgetkern.use_backend(backend), pytest.raises(ValueError, match=r"is not contiguous"):
            forgetkern.ewc_penalty_and_grad_(P, A, Fs, lam=lam, grads=G)
        assert all(torch.equal(g, b) for g, b in zip(G, before))
        return
    pen, pen_tol = 0.0, 1e-300
    want_g, mags = [], []
    for p, a, f, g in zip(P, A, Fs, G):
        d = p.double() - a.double()
        term = f.double() * d * d
        pen += float(term.sum()) * lam / 2
        # d = theta - theta* is formed in the parameter's accumulation dtype (float32 unless float64): a wider
        # anchor is rounded to it first, an error of eps * |theta*|, not eps * |d|
        dmag = p.double().abs() + a.double().abs() + d.abs()
        tmag = f.double().abs() * d.abs() * dmag
        pen_tol += 8 * EPS[acc_dtype(p.dtype)] * (p.numel() ** 0.5 + 8) * float(tmag.sum()) * lam / 2
        pen_tol += 4 * torch.finfo(acc_dtype(p.dtype)).tiny * p.numel()  # a tiny lam underflows in float32
        step = lam * f.double() * d
        want_g.append(g.double() + step)
        mags.append(g.double().abs() + lam * f.double().abs() * dmag)
    acc = F64 if any(p.dtype == F64 for p in P) else F32
    leaves = [p.clone().requires_grad_() for p in P]
    with forgetkern.use_backend(backend):
        got = forgetkern.ewc_penalty_and_grad_(P, A, Fs, lam=lam, grads=G)
        diff = forgetkern.ewc_penalty(leaves, A, Fs, lam)
        if leaves:
            autograd = torch.autograd.grad(diff, leaves, allow_unused=True) if diff.requires_grad else None
    assert got.dim() == 0 and got.dtype == (acc if P else F32)
    assert abs(got.item() - pen) <= pen_tol and abs(diff.item() - pen) <= pen_tol
    for i, (g, w, m) in enumerate(zip(G, want_g, mags)):
        assert g.dtype == P[i].dtype
        assert_close_scaled(g, w, m, g.dtype, 3.0, f"grads[{i}]")
    if P and autograd is not None:
        for i, (dg, p, a, f) in enumerate(zip(autograd, P, A, Fs)):
            step = lam * f.double() * (p.double() - a.double())
            assert dg.dtype == p.dtype
            assert_close_scaled(dg, step, mags[i], p.dtype, 3.0, f"d penalty / d params[{i}]")


@examples(20)
@given(v=two_views(), target=st.sampled_from(["params", "anchors", "fishers", "grads"]))
def test_ewc_refuses_grads_sharing_memory(v, target):
    """grads are written: sharing memory with any argument is refused; params/anchors/fishers only read, so
    sharing among them is fine (anchors = params gives a zero penalty)."""
    n, a, b, copy = v
    base = torch.arange(1.0, 13.0)
    x, y = base[a:a + n], base[b:b + n]
    y = y.clone() if copy else y
    lists = {"params": [torch.ones(n)], "anchors": [torch.zeros(n)], "fishers": [torch.full((n,), 2.0)]}
    grads = [x]
    if target == "grads":  # two gradient buffers that may overlap
        grads = [x, y]
        lists = {k: v2 * 2 for k, v2 in lists.items()}
    else:
        lists[target] = [y]
    snapshot = base.clone()
    if overlapping(x, y):
        with pytest.raises(ValueError, match=r"grads\[\d\] and \w+\[\d\] share memory"):
            forgetkern.ewc_penalty_and_grad_(lists["params"], lists["anchors"], lists["fishers"], lam=1.0,
                                             grads=grads)
        assert torch.equal(base, snapshot)
        return
    want = [g.double() + f.double() * (p.double() - q.double())
            for g, p, q, f in zip(grads, lists["params"], lists["anchors"], lists["fishers"])]
    forgetkern.ewc_penalty_and_grad_(lists["params"], lists["anchors"], lists["fishers"], lam=1.0, grads=grads)
    for g, w in zip(grads, want):
        assert torch.equal(g.double(), w)


def test_ewc_anchors_aliasing_params_is_a_zero_penalty():
    p = torch.randn(7)
    g = torch.zeros(7)
    pen = forgetkern.ewc_penalty_and_grad_([p], [p], [torch.ones(7)], lam=3.0, grads=[g])
    assert pen.item() == 0.0 and torch.equal(g, torch.zeros(7))


# ---- linear_persample_sq_grad_ / bias_ / lora_ -----------------------------------------------------------------

@st.composite
def persample_case(draw, max_tok=4):
    n, t = draw(st.integers(0, 3)), draw(st.integers(0, max_tok))
    d_in, d_out = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    dtype = draw(st.sampled_from(INPUT))
    return dict(n=n, t=t, d_in=d_in, d_out=d_out, dtype=dtype,
                state=draw(st.sampled_from(STATE)), two_d=draw(st.booleans()) and t == 1,
                gran=draw(st.sampled_from(["sample", "token"])),
                mask=draw(st.sampled_from([None, "random", "none-kept"])),
                seed=draw(st.integers(0, 2**16)), scale=draw(st.sampled_from([0.0, 0.25, 1.0]) | st.floats(0, 3)),
                x_special=draw(injections(NONFINITE + (1e30,))), g_special=draw(injections(NONFINITE + (-1e30,))),
                x_layout=draw(st.sampled_from(LAYOUTS)), g_layout=draw(st.sampled_from(LAYOUTS)))


def _persample_inputs(c):
    x = inject(randn((c["n"], c["t"], c["d_in"]), c["dtype"], c["seed"]), c["x_special"])
    g = inject(randn((c["n"], c["t"], c["d_out"]), c["dtype"], c["seed"] + 1), c["g_special"])
    mask = None
    if c["mask"] is not None:
        gen = torch.Generator().manual_seed(c["seed"] + 2)
        mask = torch.rand((c["n"], c["t"]), generator=gen) < (0.6 if c["mask"] == "random" else -1.0)
    if c["two_d"]:
        x, g = x[:, 0], g[:, 0]
        mask = None if mask is None else mask[:, 0]
    return materialize(x, c["x_layout"]), materialize(g, c["g_layout"]), mask


def _persample_oracle(f0, x, g, mask, scale, token):
    """fp64 oracle: contributions of masked-out tokens are never read; a per-sample contribution element that is
    not finite in the accumulation dtype is dropped. Returns (expected, flag, magnitude)."""
    x3 = x.double() if x.dim() == 3 else x.double().unsqueeze(1)
    g3 = g.double() if g.dim() == 3 else g.double().unsqueeze(1)
    m = torch.ones(x3.shape[:2], dtype=torch.bool) if mask is None else mask.view(x3.shape[:2])
    x3 = torch.where(m[..., None], x3, 0.0)
    g3 = torch.where(m[..., None], g3, 0.0)
    if token or x3.shape[1] == 1:
        contrib = torch.einsum("nto,nti->noi", g3 * g3, x3 * x3)
        mag = contrib.abs()
    else:
        per = torch.einsum("nto,nti->noi", g3, x3)
        contrib = per * per
        a = torch.einsum("nto,nti->noi", g3.abs(), x3.abs())
        mag = a * a
    top = torch.finfo(acc_dtype(f0.dtype)).max
    drop = ~torch.isfinite(contrib) | (contrib > top)
    kept = torch.where(drop, 0.0, contrib).sum(0)
    return f0.double() + scale * kept, bool(drop.any()), scale * torch.where(drop, 0.0, mag).sum(0)


def _persample_tol(f, want, mag, f0):
    acc = acc_dtype(f.dtype)
    extra = EPS[f.dtype] if f.dtype == BF16 else 0.0
    return 64 * EPS[acc] * (mag + f0.double().abs()) + 2 * extra * want.abs() + 1e-300


@pytest.mark.parametrize("backend", backend_params(("torch", "triton")))
@examples(14)
@given(c=persample_case())
def test_linear_persample_sq_grad_matches_oracle(backend, c):
    x, g, mask = _persample_inputs(c)
    f0 = randn((c["d_out"], c["d_in"]), c["state"], c["seed"] + 3, positive=True)
    fisher = f0.clone()
    kw = dict(scale=c["scale"], mask=mask, granularity=c["gran"])
    if backend == "triton" and F64 in (c["dtype"], c["state"]):  # the Triton kernels have no float64
        with forgetkern.use_backend(backend), pytest.raises(forgetkern.BackendError, match="does not implement"):
            forgetkern.linear_persample_sq_grad_(fisher, x, g, **kw)
        return
    want, flag, mag = _persample_oracle(f0, x, g, mask, c["scale"], c["gran"] == "token")
    with forgetkern.use_backend(backend):
        found = forgetkern.linear_persample_sq_grad_(fisher, x, g, **kw)
    assert found.dtype == F32 and found.dim() == 0 and found.item() == float(flag)
    err = (fisher.double() - want).abs()
    tol = _persample_tol(fisher, want, mag, f0)
    assert (err <= tol).all(), f"max error {float(err.max()):.3e}, at {(err > tol).nonzero()[:3].tolist()}"


def test_linear_persample_sq_grad_has_no_cpp_kernel():
    with forgetkern.use_backend("cpp"), pytest.raises(forgetkern.BackendError, match="does not implement"):
        forgetkern.linear_persample_sq_grad_(torch.zeros(2, 3), torch.ones(1, 3), torch.ones(1, 2))


@examples(12)
@given(c=persample_case(), fisher_layout=st.sampled_from(LAYOUTS))
def test_bias_persample_sq_grad_matches_oracle(c, fisher_layout):
    _, g, mask = _persample_inputs(c)
    f0 = randn((c["d_out"],), c["state"], c["seed"] + 3, positive=True)
    fisher = materialize(f0, fisher_layout)
    if not fisher.is_contiguous():
        with pytest.raises(ValueError, match="fisher is not contiguous"):
            forgetkern.bias_persample_sq_grad_(fisher, g, scale=c["scale"], mask=mask, granularity=c["gran"])
        assert torch.equal(fisher, f0)
        return
    ones = torch.ones(g.shape[:-1] + (1,), dtype=g.dtype)
    want, flag, mag = _persample_oracle(f0.view(-1, 1), ones, g, mask, c["scale"], c["gran"] == "token")
    found = forgetkern.bias_persample_sq_grad_(fisher, g, scale=c["scale"], mask=mask, granularity=c["gran"])
    assert found.item() == float(flag)
    err = (fisher.double() - want.view(-1)).abs()
    assert (err <= _persample_tol(fisher, want.view(-1), mag.view(-1), f0)).all(), float(err.max())


@pytest.mark.parametrize("backend", backend_params(("torch", "triton")))
@examples(8)
@given(c=persample_case(), r=st.integers(1, 3), scaling=st.sampled_from([0.5, 2.0]), given_u=st.booleans())
def test_lora_persample_sq_grad_matches_oracle(backend, c, r, scaling, given_u):
    assume(c["dtype"] != F16 and not (backend == "triton" and F64 in (c["dtype"], c["state"])))
    c = dict(c, x_special=[], g_special=[])  # special values: covered by the Linear op it calls
    x, g, mask = _persample_inputs(c)
    a = randn((r, c["d_in"]), c["dtype"], c["seed"] + 4)
    b = randn((c["d_out"], r), c["dtype"], c["seed"] + 5)
    fa0 = randn((r, c["d_in"]), c["state"], c["seed"] + 6, positive=True)
    fb0 = randn((c["d_out"], r), c["state"], c["seed"] + 7, positive=True)
    fa, fb = fa0.clone(), fb0.clone()
    x3, g3 = (x, g) if x.dim() == 3 else (x.unsqueeze(1), g.unsqueeze(1))
    u = (x3 @ a.t()) if given_u else None
    with forgetkern.use_backend(backend):
        found = forgetkern.lora_persample_sq_grad_(fa, fb, x, g, a, b, scaling=scaling, scale=c["scale"],
                                                   mask=mask, granularity=c["gran"], xa=u)
    s2 = c["scale"] * scaling ** 2
    u64 = x3.double() @ a.double().t()
    v64 = g3.double() @ b.double()
    token = c["gran"] == "token"
    want_b, _, mag_b = _persample_oracle(fb0, u64, g3, mask, s2, token)
    want_a, _, mag_a = _persample_oracle(fa0, x3, v64, mask, s2, token)
    assert found.item() == 0.0
    # the intermediates U = x A^T, V = g B are rounded to x's dtype (as a Linear's input / grad_out would be)
    rel = 4 * EPS[c["dtype"]] if c["dtype"] != F64 else 0.0
    for name, f, w, m, f0 in (("fisher_a", fa, want_a, mag_a, fa0), ("fisher_b", fb, want_b, mag_b, fb0)):
        err = (f.double() - w).abs()
        tol = _persample_tol(f, w, m, f0) + rel * m
        assert (err <= tol).all(), f"{name}: max error {float(err.max()):.3e}"


@examples(20)
@given(which=st.sampled_from(["fa-fb", "fa-x", "fb-grad_out", "fb-lora_b", "fa-xa", "x-linear", "g-linear"]),
       offset=st.integers(0, 4))
def test_persample_fishers_sharing_memory_are_refused(which, offset):
    """A Fisher is written: the ops refuse one that shares memory with an input or with the other Fisher
    (they used to compute silently: fisher_a is fisher_b summed both factors' Fishers into one tensor)."""
    buf = torch.zeros(64)
    snapshot = buf.clone()
    r = d = 3
    x, g = torch.randn(2, 4, d), torch.randn(2, 4, d)
    a, b = torch.randn(r, d), torch.randn(d, r)
    fa, fb = torch.zeros(r, d), torch.zeros(d, r)
    view = buf[offset:offset + r * d].view(r, d)
    if which == "x-linear":
        x = buf[offset:offset + 3 * d].view(1, 3, d)
        with pytest.raises(ValueError, match="fisher and x share memory"):
            forgetkern.linear_persample_sq_grad_(view, x, torch.ones(1, 3, r))
    elif which == "g-linear":
        g = buf[offset:offset + 3 * r].view(1, 3, r)
        with pytest.raises(ValueError, match="fisher and grad_out share memory"):
            forgetkern.linear_persample_sq_grad_(view, torch.ones(1, 3, d), g)
    else:
        kw = {}
        if which == "fa-fb":
            fa, fb = view, buf[offset + 1:offset + 1 + d * r].view(d, r)
        elif which == "fa-x":
            fa, x = view, buf[offset:offset + 2 * 4 * d].view(2, 4, d)
        elif which == "fb-grad_out":
            fb, g = view, buf[offset:offset + 2 * 4 * d].view(2, 4, d)
        elif which == "fb-lora_b":
            fb, b = view, view
        else:
            fa, kw["xa"] = view, buf[offset:offset + 2 * 4 * r].view(2, 4, r)
        with pytest.raises(ValueError, match="share memory"):
            forgetkern.lora_persample_sq_grad_(fa, fb, x, g, a, b, scaling=1.0, **kw)
    assert torch.equal(buf, snapshot)


# ---- lora_linear / lora_linear_siblings ------------------------------------------------------------------------

@st.composite
def lora_case(draw, max_side=6):
    lead = draw(shapes(2, 3, min_dims=1))
    k_in = draw(st.integers(1, max_side))
    layers = []
    for _ in range(draw(st.integers(1, 2))):
        ads = [(draw(st.integers(1, 3)), draw(st.sampled_from([0.5, 2.0])), draw(st.sampled_from([0.0, 0.3])),
                draw(st.booleans())) for _ in range(draw(st.integers(0, 2)))]
        layers.append((draw(st.integers(1, max_side)), draw(st.booleans()), ads))
    return dict(lead=lead, k_in=k_in, layers=layers, dtype=draw(st.sampled_from(INPUT)),
                training=draw(st.booleans()), seed=draw(st.integers(0, 2**31)),
                x_layout=draw(st.sampled_from(LAYOUTS)), w_layout=draw(st.sampled_from(["contiguous", "transposed"])),
                x_is_weight=draw(st.booleans()), data_seed=draw(st.integers(0, 2**16)))


def _lora_naive(x, layers, training, seed, cv):
    """PEFT's formula with torch ops (``cv`` maps a leaf to the tensor to compute with)."""
    keys = lref.dropout_keys(seed, sum(len(ads) for _, _, ads in layers))
    ys, k = [], 0
    xx = cv(x)
    x2 = xx.reshape(-1, xx.shape[-1])
    for w, b, ads in layers:
        y = torch.nn.functional.linear(xx, cv(w), cv(b) if b is not None else None)
        for ad in ads:
            xd = x2
            if training and ad.dropout_p > 0:
                keep = lref.keep_mask(keys[k], ad.dropout_p, x2.shape[0], x2.shape[1])
                xd = xd * keep.to(xd.dtype) * lref.keep_scale(ad.dropout_p)
            lb = cv(ad.lora_bias) if ad.lora_bias is not None else None
            lora = torch.nn.functional.linear(xd @ cv(ad.lora_a).t(), cv(ad.lora_b), lb) * ad.scaling
            y = y + lora.reshape(y.shape)
            k += 1
        ys.append(y.to(xx.dtype))
    return ys


@pytest.mark.parametrize("backend", backend_params())
@examples(10)
@given(c=lora_case())
def test_lora_linear_matches_fp64_oracle(backend, c):
    dtype, k_in, s = c["dtype"], c["k_in"], c["data_seed"]
    n_out0 = c["layers"][0][0]
    x_is_weight = c["x_is_weight"] and len(c["lead"]) == 1 and c["lead"][0] == n_out0
    layers, leaves, frozen = [], [], []
    for li, (n_out, bias, ads) in enumerate(c["layers"]):
        w = materialize(randn((n_out, k_in), dtype, s + 10 * li, scale=k_in ** -0.5), c["w_layout"])
        b = randn((n_out,), dtype, s + 10 * li + 1).requires_grad_() if bias else None
        adl = []
        for ai, (r, sc, p, lb) in enumerate(ads):
            q = s + 100 * li + 10 * ai
            adl.append(LoraAdapter(randn((r, k_in), dtype, q + 2, scale=k_in ** -0.5).requires_grad_(),
                                   randn((n_out, r), dtype, q + 3, scale=r ** -0.5).requires_grad_(), sc, p,
                                   randn((n_out,), dtype, q + 4).requires_grad_() if lb else None))
        layers.append((w, b, adl))
        frozen.append(w)
        leaves += ([b] if b is not None else []) + [t for ad in adl for t in (ad.lora_a, ad.lora_b, ad.lora_bias)
                                                   if t is not None]
    if x_is_weight:  # x aliases the frozen weight (both only read): must be computed as if they were copies
        x = layers[0][0]
    else:
        x = materialize(randn(c["lead"] + (k_in,), dtype, s + 7), c["x_layout"]).requires_grad_()
        leaves = [x] + leaves
    run = forgetkern.lora_linear_siblings if len(layers) > 1 else None
    kw = dict(training=c["training"], seed=c["seed"])

    def call():
        if run is None:
            w, b, adl = layers[0]
            return [forgetkern.lora_linear(x, w, b, adl, **kw)]
        return run(x, [w for w, _, _ in layers], [b for _, b, _ in layers], [a for _, _, a in layers], **kw)

    if backend == "triton" and dtype == F64:
        with forgetkern.use_backend(backend), pytest.raises(forgetkern.BackendError, match="does not implement"):
            call()
        return
    up = {id(v): v.detach().double().requires_grad_(v.requires_grad) for v in leaves + frozen + [x]}
    oracle = _lora_naive(x, layers, c["training"], c["seed"], lambda v: up[id(v)])
    gen = torch.Generator().manual_seed(3)
    cots = [torch.randn(y.shape, generator=gen, dtype=F64) for y in oracle]

    def grads(ys, wrt, cot):
        wrt_g = [v for v in wrt if v.requires_grad]
        if not wrt_g:
            return []
        return list(torch.autograd.grad(ys, wrt_g, cot, allow_unused=True))

    want = [y.detach() for y in oracle] + grads(oracle, [up[id(v)] for v in leaves], cots)
    plain_out = _lora_naive(x, layers, c["training"], c["seed"], lambda v: v)
    plain = [y.detach() for y in plain_out] + grads(plain_out, leaves, [t.to(dtype) for t in cots])
    with forgetkern.use_backend(backend):
        got_out = call()
        got = [y.detach() for y in got_out] + grads(got_out, leaves, [t.to(dtype) for t in cots])
    assert len(got) == len(want) == len(plain)
    for i, (gt, pl, wt) in enumerate(zip(got, plain, want)):
        assert gt is not None and pl is not None and wt is not None, i
        earned_close(f"output/grad {i}", gt, pl, wt)


# ---- FisherEstimator: labels and padding ------------------------------------------------------------------------

VOCAB = 128


@pytest.fixture(scope="module")
def lora_llama():
    peft = pytest.importorskip("peft")
    from forgetkern.testing.models import tiny_llama

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1,
                          init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return peft.get_peft_model(tiny_llama(layers=1), cfg).eval()


def _pad(seq: torch.Tensor, total: int, side: str, *, labels: str):
    """``seq`` padded to ``total`` on ``side`` (pad id 0). ``labels``: ``"default"`` (none given: input_ids
    with padding ignored), or ``"causal"`` (padding AND the first real token ignored: what the unpadded
    sequence's causal loss counts; the first token is never predicted there)."""
    n, p = len(seq), total - len(seq)
    ids = torch.zeros(1, total, dtype=torch.long)
    attn = torch.zeros(1, total, dtype=torch.long)
    lo = p if side == "left" else 0
    ids[0, lo:lo + n], attn[0, lo:lo + n] = seq, 1
    batch = {"input_ids": ids, "attention_mask": attn}
    if labels == "causal":
        lab = ids.masked_fill(attn == 0, -100)
        lab[0, lo] = -100
        batch["labels"] = lab
    return batch


def _fisher(model, batches, backend="torch", granularity="sample"):
    from forgetkern.fisher import FisherEstimator

    with forgetkern.use_backend(backend, op="linear_persample_sq_grad_"):
        return FisherEstimator(model, normalize="sample", params="lora", granularity=granularity).estimate(batches, progress=False)


def _fisher_close(got, want, rtol=1e-4):
    assert set(got) == set(want)
    for k in want:
        scale = float(want[k].abs().max()) + 1e-30
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=rtol, atol=rtol * scale, msg=k)


@pytest.mark.parametrize("backend", backend_params(("torch", "triton")))
@examples(5)
@given(lengths=st.lists(st.integers(2, 7), min_size=1, max_size=3), pad=st.integers(0, 3),
       side=st.sampled_from(["left", "right"]), seed=st.integers(0, 2**16))
def test_fisher_padding_never_changes_the_unpadded_fisher(lora_llama, backend, lengths, pad, side, seed):
    """A batch of sequences of mixed lengths, padded on one side, gives the mean of the Fishers of the unpadded
    sequences, each run alone; with a single sample, "sample" and "batch" granularity agree. Labels: the
    causal ones (right padding: the default labels already are; left padding: also the first real token's label, which
    the default labels keep, as the model's loss does)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]
    total = max(lengths) + pad
    alone = [_fisher(lora_llama, [{"input_ids": s[None]}], backend) for s in seqs]
    want = {k: sum(f[k].double() for f in alone) / len(alone) for k in alone[0]}
    padded = [_pad(s, total, side, labels="causal" if side == "left" else "default") for s in seqs]
    batch = {k: torch.cat([p[k] for p in padded]) for k in padded[0]}
    _fisher_close(_fisher(lora_llama, [batch], backend), want)
    one = padded[:1]
    _fisher_close(_fisher(lora_llama, one, backend, granularity="batch"), alone[0])

