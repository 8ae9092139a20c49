"""EWC penalty of LoRA updates (ewc_delta_w): every backend against an exact float64 oracle; autograd; bad inputs.

Tolerances are the worst-case rounding bounds of the computation (Higham's gamma_n) for the magnitudes involved,
not guesses: with ``M = |B| |A|`` (the magnitude of every ``B A`` entry), a float32 kernel errs on

* ``B A`` by at most ``r eps M``,
* ``dA = c B^T (F * B A)`` by at most ``(r + out + 2) eps c |B|^T (F M)`` (``gB`` likewise with ``in``),
* the penalty by at most ``(2 r + 4 + n) eps lam/2 sum s^2 F M^2`` (n: number of terms summed),

plus one rounding of the stored gradient (``eps(dtype) * (|g_old| + |step|)``). The oracle is float64 from the
stored (rounded) inputs.
"""

import pytest
import torch

import forgetkern
from forgetkern import _backend
from tests._helpers import EPS, backend_devices, to_cpu, to_dev

LAM = 0.7


def _backends():
    return backend_devices(_backend.SUPPORTED_BY_OP["ewc_delta_w"], op="ewc_delta_w")


BACKENDS = _backends()


def _layers(shapes, dtype, f_dtype, seed=0, grad_scale=0.01):
    """shapes: (out, in, r) per layer -> A, B, F, grads_a, grads_b, scaling."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return torch.randn(s, generator=gen, dtype=torch.float64) * scale

    lora_a = [rnd(r, i, scale=0.5).to(dtype) for o, i, r in shapes]
    lora_b = [rnd(o, r, scale=0.5).to(dtype) for o, i, r in shapes]
    fishers = [rnd(o, i).abs().to(f_dtype) for o, i, r in shapes]
    grads_a = [rnd(r, i, scale=grad_scale).to(dtype) for o, i, r in shapes]
    grads_b = [rnd(o, r, scale=grad_scale).to(dtype) for o, i, r in shapes]
    scaling = [0.5 + 0.25 * k for k in range(len(shapes))]
    return lora_a, lora_b, fishers, grads_a, grads_b, scaling


def _oracle(lora_a, lora_b, fishers, scaling, lam):
    pen, pen_mag, out = 0.0, 0.0, []
    for a, b, f, s in zip(lora_a, lora_b, fishers, scaling):
        a, b, f = a.double(), b.double(), f.double()
        d, m = b @ a, b.abs() @ a.abs()
        c = s * s * lam
        pen += float((f * d * d).sum()) * s * s * lam / 2
        pen_mag += float((f * m * m).sum()) * s * s * lam / 2
        out.append((c * b.t() @ (f * d), c * b.abs().t() @ (f * m), c * (f * d) @ a.t(), c * (f * m) @ a.abs().t()))
    return pen, pen_mag, out


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_grad(got, old, step, mag, k, r, dtype, what):
    eps = EPS[_acc(dtype)]
    want = old.double() + step
    bound = EPS[dtype] * (old.double().abs() + step.abs()) + (r + k + 2) * eps * mag + 1e-300
    err = (got.double() - want).abs()
    bad = err > bound
    assert got.dtype == dtype and got.shape == old.shape
    if bad.any():
        idx = bad.nonzero()[:3].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} off, first at {idx}: got "
                             f"{got.double()[bad][:3].tolist()} want {want[bad][:3].tolist()}")


def _run_and_check(backend, device, shapes, dtype, f_dtype, seed=0):
    lora_a, lora_b, fishers, grads_a, grads_b, scaling = _layers(shapes, dtype, f_dtype, seed)
    old_a, old_b = [g.clone() for g in grads_a], [g.clone() for g in grads_b]
    pen, pen_mag, want = _oracle(lora_a, lora_b, fishers, scaling, LAM)
    lora_a, lora_b, fishers, grads_a, grads_b = to_dev((lora_a, lora_b, fishers, grads_a, grads_b), device)
    with forgetkern.use_backend(backend):
        got = forgetkern.ewc_delta_w_and_grad_(lora_a, lora_b, fishers, scaling=scaling, lam=LAM,
                                               grads_a=grads_a, grads_b=grads_b)
    got, grads_a, grads_b = to_cpu((got, grads_a, grads_b))
    assert got.dim() == 0 and got.dtype == _acc(dtype)
    n = sum(o * i for o, i, _ in shapes)
    rmax = max([r for *_, r in shapes] + [0])
    assert abs(got.item() - pen) <= (2 * rmax + 4 + n) * EPS[_acc(dtype)] * pen_mag + 1e-300, (got.item(), pen)
    for i, ((o, inn, r), (ga, ma, gb, mb)) in enumerate(zip(shapes, want)):
        _check_grad(grads_a[i], old_a[i], ga, ma, o, r, dtype, f"grads_a[{i}]")
        _check_grad(grads_b[i], old_b[i], gb, mb, inn, r, dtype, f"grads_b[{i}]")
    return got


MIXED = [(24, 40, 8), (17, 33, 5), (9, 70, 16)]  # three layers of different shapes, non-power-of-two ranks
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
          (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,f_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_matches_oracle_per_dtype(backend, device, dtype, f_dtype):
    if dtype == torch.float64 and backend == "triton":  # the Triton kernel computes in float32
        lora_a, lora_b, fishers, *_, scaling = to_dev(_layers(MIXED, dtype, f_dtype), device)
        with forgetkern.use_backend(backend), pytest.raises(forgetkern.BackendError, match="implemented: torch"):
            forgetkern.ewc_delta_w(lora_a, lora_b, fishers, scaling=scaling, lam=LAM)
        return
    _run_and_check(backend, device, MIXED, dtype, f_dtype)


SHAPES = {
    "r1": [(5, 7, 1)],
    "empty-dims": [(0, 5, 3), (4, 0, 3), (6, 5, 0), (0, 0, 0), (3, 4, 2)],
    "blocks": [(150, 140, 20), (3, 300, 33)],        # several row blocks and column tiles; r padded
    "chunks": [(300, 260, 64), (257, 129, 17)],      # several row chunks per column tile (Triton); r = 64
    "many": [(3 + k, 5 + 2 * k, 1 + k % 4) for k in range(12)],
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shapes", list(SHAPES), ids=str)
def test_matches_oracle_per_shape(backend, device, shapes):
    _run_and_check(backend, device, SHAPES[shapes], torch.float32, torch.float32, seed=1)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_lists_and_zero_rank(backend, device):
    with forgetkern.use_backend(backend):
        out = forgetkern.ewc_delta_w_and_grad_([], [], [], scaling=1.0, lam=1.0, grads_a=[], grads_b=[])
        assert out.item() == 0.0 and out.dtype == torch.float32
        a, b, f = to_dev((torch.zeros(0, 4), torch.zeros(3, 0), torch.ones(3, 4)), device)
        ga, gb = to_dev((torch.zeros(0, 4), torch.zeros(3, 0)), device)
        out = forgetkern.ewc_delta_w_and_grad_([a], [b], [f], scaling=2.0, lam=1.0, grads_a=[ga], grads_b=[gb])
        assert out.item() == 0.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    lora_a, lora_b, fishers, grads_a, grads_b, scaling = to_dev(_layers(MIXED, torch.float32, torch.float32, seed=2),
                                                                device)
    views_a = [a.t().contiguous().t() for a in lora_a]                # transposed storage
    views_b = [torch.stack([b, b], -1)[..., 0] for b in lora_b]        # every other element
    views_f = [f.t().contiguous().t() for f in fishers]
    assert not any(x.is_contiguous() for x in views_a + views_b + views_f if x.numel() > 1)
    g1a, g1b = [g.clone() for g in grads_a], [g.clone() for g in grads_b]
    with forgetkern.use_backend(backend):
        want = forgetkern.ewc_delta_w_and_grad_(lora_a, lora_b, fishers, scaling=scaling, lam=LAM, grads_a=grads_a,
                                                grads_b=grads_b)
        got = forgetkern.ewc_delta_w_and_grad_(views_a, views_b, views_f, scaling=scaling, lam=LAM, grads_a=g1a,
                                               grads_b=g1b)
    assert torch.equal(got, want)
    assert all(torch.equal(x, y) for x, y in zip(g1a + g1b, grads_a + grads_b))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    """Bitwise the same run to run and for any number of threads."""
    lora_a, lora_b, fishers, grads_a, grads_b, scaling = to_dev(_layers(SHAPES["blocks"], torch.float32,
                                                                        torch.bfloat16, 3), device)
    outs, threads = [], torch.get_num_threads()
    try:
        for nt in (threads, 1, threads):
            torch.set_num_threads(nt)
            ga, gb = [g.clone() for g in grads_a], [g.clone() for g in grads_b]
            with forgetkern.use_backend(backend):
                p = forgetkern.ewc_delta_w_and_grad_(lora_a, lora_b, fishers, scaling=scaling, lam=LAM, grads_a=ga,
                                                     grads_b=gb)
            outs.append([p] + ga + gb)
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(outs[0], other))


def _materialised_penalty(lora_a, lora_b, fishers, scaling, lam):
    """The usual torch code: dW = s B A, penalty lam/2 sum F dW^2 (autograd differentiates it)."""
    total = 0.0
    for a, b, f, s in zip(lora_a, lora_b, fishers, scaling):
        dw = s * (b @ a)
        total = total + (f * dw * dw).sum()
    return total * (lam / 2)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autograd_matches_torch_autograd_of_the_materialised_penalty(backend, device, dtype):
    lora_a, lora_b, fishers, *_, scaling = _layers(MIXED, dtype, torch.float32, seed=4)
    la = [a.clone().requires_grad_() for a in lora_a]
    lb = [b.clone().requires_grad_() for b in lora_b]
    la_d, lb_d, f_d = to_dev((la, lb, fishers), device)
    with forgetkern.use_backend(backend):
        pen = forgetkern.ewc_delta_w(la_d, lb_d, f_d, scaling=scaling, lam=LAM)
        (3.0 * pen).backward()
    pen = pen.cpu()
    for x, xd in zip(la + lb, la_d + lb_d):
        x.grad = xd.grad.cpu()
    # the materialised reference in float64 from the same stored values
    ra = [a.double().requires_grad_() for a in lora_a]
    rb = [b.double().requires_grad_() for b in lora_b]
    want = _materialised_penalty(ra, rb, [f.double() for f in fishers], scaling, LAM)
    (3.0 * want).backward()
    rtol = 64 * EPS[torch.float32] if dtype == torch.float32 else 2 * EPS[dtype]
    torch.testing.assert_close(pen.detach().double(), want.detach(), rtol=rtol, atol=0)
    for x, y in zip(la + lb, ra + rb):
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=rtol, atol=rtol * float(y.grad.abs().max()))
    # the in-place path gives the same gradients (3 * lam: the incoming gradient of 3)
    ga, gb = [torch.zeros_like(a) for a in lora_a], [torch.zeros_like(b) for b in lora_b]
    with forgetkern.use_backend(backend):
        ga_d, gb_d = to_dev((ga, gb), device)
        forgetkern.ewc_delta_w_and_grad_(*to_dev((lora_a, lora_b, fishers), device), scaling=scaling,
                                         lam=3.0 * LAM, grads_a=ga_d, grads_b=gb_d)
    ga, gb = to_cpu((ga_d, gb_d))
    for x, g in zip(la + lb, ga + gb):
        torch.testing.assert_close(x.grad, g, rtol=4 * EPS[dtype], atol=4 * EPS[dtype] * float(g.abs().max()))


@pytest.mark.parametrize("backend,device", [b for b in BACKENDS if b.values[0] in ("torch", "cpp", "cuda")])
def test_gradcheck_fp64(backend, device):
    lora_a, lora_b, fishers, *_, scaling = to_dev(_layers([(4, 5, 2), (3, 2, 1)], torch.float64, torch.float64,
                                                          seed=5), device)
    leaves = [x.clone().requires_grad_() for x in lora_a + lora_b]

    def fn(*xs):
        return forgetkern.ewc_delta_w(list(xs[:2]), list(xs[2:]), fishers, scaling=scaling, lam=LAM)

    with forgetkern.use_backend(backend):
        assert torch.autograd.gradcheck(fn, leaves)


def test_double_backward():
    lora_a, lora_b, fishers, *_, scaling = _layers([(4, 5, 2)], torch.float64, torch.float64, seed=6)
    leaves = [x.clone().requires_grad_() for x in lora_a + lora_b]
    assert torch.autograd.gradgradcheck(
        lambda a, b: forgetkern.ewc_delta_w([a], [b], fishers, scaling=scaling, lam=LAM), leaves)


@pytest.mark.parametrize("backend,device", [b for b in BACKENDS if b.values[0] in ("torch", "cpp", "cuda")])
def test_opcheck(backend, device):
    lora_a, lora_b, fishers, grads_a, grads_b, scaling = to_dev(_layers([(5, 6, 3), (2, 9, 1)], torch.float32,
                                                                        torch.bfloat16, seed=7), device)
    with forgetkern.use_backend(backend):
        torch.library.opcheck(torch.ops.forgetkern.ewc_delta_w_fused.default,
                              (lora_a, lora_b, fishers, scaling, LAM, grads_a, grads_b))
        leaves_a = [a.clone().requires_grad_() for a in lora_a]
        torch.library.opcheck(torch.ops.forgetkern.ewc_delta_w.default, (leaves_a, lora_b, fishers, scaling, LAM))


def _ok():
    return dict(lora_a=[torch.zeros(2, 3)], lora_b=[torch.zeros(4, 2)], fishers=[torch.zeros(4, 3)], scaling=1.0,
                lam=1.0, grads_a=[torch.zeros(2, 3)], grads_b=[torch.zeros(4, 2)])


@pytest.mark.parametrize("change,match", [
    (dict(lora_b=[torch.zeros(4, 3)]), r"lora_b\[0\] has shape \(4, 3\) \(out, r\) but lora_a\[0\] has shape "
                                       r"\(2, 3\) \(r, in\): the ranks differ"),
    (dict(fishers=[torch.zeros(3, 4)]), r"fishers\[0\] has shape \(3, 4\) but lora_b\[0\] @ lora_a\[0\] is "
                                        r"\(4, 3\)"),
    (dict(lora_b=[torch.zeros(4, 2)] * 2), "lora_b has 2 tensors but lora_a has 1"),
    (dict(grads_b=[]), "grads_b has 0 tensors but lora_a has 1"),
    (dict(scaling=[1.0, 2.0]), "scaling has 2 values but lora_a has 1 tensors"),
    (dict(scaling="2"), "scaling must be a Python float"),
    (dict(lam=-0.5), "lam must be >= 0"),
    (dict(lam=float("nan")), "lam must be finite"),
    (dict(lora_a=[torch.zeros(2, 3, dtype=torch.float64)]), r"lora_b\[0\] has dtype torch.float32 but "
                                                            r"lora_a\[0\] has torch.float64"),
    (dict(grads_a=[torch.zeros(2, 3, dtype=torch.float16)]), r"grads_a\[0\] has dtype torch.float16 but "
                                                             r"lora_a\[0\] has torch.float32"),
    (dict(grads_b=[torch.zeros(4, 3)]), r"grads_b\[0\] has shape \(4, 3\) but lora_b\[0\] has shape \(4, 2\)"),
    (dict(grads_a=[torch.zeros(3, 2).t()]), r"grads_a\[0\] is not contiguous"),
    (dict(fishers=[torch.zeros(4, 3, requires_grad=True)]), r"fishers\[0\] requires grad"),
    (dict(fishers=[torch.zeros(12)]), r"fishers\[0\] must be 2-D"),
    (dict(fishers=[torch.zeros(4, 3, dtype=torch.int32)]), r"fishers\[0\] has dtype torch.int32"),
    (dict(fishers=[torch.zeros(4, 3, device="meta")]), r"fishers\[0\] is on meta"),
    (dict(lora_a=torch.zeros(2, 3)), "lora_a must be a list or tuple of tensors, got a single Tensor"),
    (dict(grads_a=None), "grads_a and grads_b are required"),
])
def test_bad_inputs_name_the_argument(change, match):
    kw = {**_ok(), **change}
    with pytest.raises((TypeError, ValueError), match=match):
        forgetkern.ewc_delta_w_and_grad_(kw.pop("lora_a"), kw.pop("lora_b"), kw.pop("fishers"), **kw)


@pytest.mark.parametrize("alias", ["lora_a", "fishers"])
def test_grads_aliasing_an_input_is_refused(alias):
    kw = _ok()
    kw["fishers"] = [torch.zeros(2, 3)] if alias == "fishers" else kw["fishers"]
    kw["lora_b"] = [torch.zeros(2, 2)] if alias == "fishers" else kw["lora_b"]
    kw["grads_b"] = [torch.zeros(2, 2)] if alias == "fishers" else kw["grads_b"]
    kw["grads_a"] = kw[alias]
    with pytest.raises(ValueError, match=rf"grads_a\[0\] and {alias}\[0\] share memory"):
        forgetkern.ewc_delta_w_and_grad_(kw.pop("lora_a"), kw.pop("lora_b"), kw.pop("fishers"), **kw)


def test_differentiable_form_refuses_bad_input_too():
    with pytest.raises(ValueError, match="lam must be >= 0"):
        forgetkern.ewc_delta_w([torch.zeros(2, 3)], [torch.zeros(4, 2)], [torch.zeros(4, 3)], scaling=1.0, lam=-1.0)


def test_rank_above_the_triton_limit_is_refused_there_and_runs_elsewhere():
    lora_a, lora_b, fishers, *_, scaling = _layers([(6, 5, 65)], torch.float32, torch.float32, seed=8)
    want = forgetkern.ewc_delta_w(lora_a, lora_b, fishers, scaling=scaling, lam=LAM)
    if _backend.triton_available():
        with forgetkern.use_backend("triton"), pytest.raises(forgetkern.BackendError, match="implemented: torch"):
            forgetkern.ewc_delta_w(lora_a, lora_b, fishers, scaling=scaling, lam=LAM)
    if _backend.availability("cuda", "ewc_delta_w").get("cuda") is None and torch.cuda.is_available():
        with forgetkern.use_backend("cuda"), pytest.raises(forgetkern.BackendError, match="implemented: torch"):
            forgetkern.ewc_delta_w(*to_dev((lora_a, lora_b, fishers), "cuda"), scaling=scaling, lam=LAM)
    with forgetkern.use_backend("torch"):
        torch.testing.assert_close(forgetkern.ewc_delta_w(lora_a, lora_b, fishers, scaling=scaling, lam=LAM), want)
