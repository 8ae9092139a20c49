"""EWC penalty + gradient: every backend against an exact float64 oracle; autograd form; bad inputs."""

import pytest
import torch

import forgetkern
from tests._helpers import EPS, assert_close_scaled, backend_devices, rand_list, size_sets, to_cpu, to_dev

SIZES = size_sets()
LAM = 0.7


def _oracle(params, anchors, fishers, grads, lam):
    """Exact float64 penalty (and sum of |terms| for its tolerance) and the new gradients with magnitudes."""
    pen, pen_mag, new_grads, mags = 0.0, 0.0, [], []
    for p, a, f, g in zip(params, anchors, fishers, grads):
        d = p.double() - a.double()
        term = f.double() * d * d
        pen += float(term.sum()) * lam / 2
        pen_mag += float(term.abs().sum()) * lam / 2
        step = lam * f.double() * d
        new_grads.append(g.double() + step)
        mags.append(g.double().abs() + step.abs())
    return pen, pen_mag, new_grads, mags


def _lists(shapes, p_dtype, state_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = rand_list(shapes, p_dtype, gen)
    anchors = [(p.double() + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(state_dtype)
               for p in params]
    fishers = rand_list(shapes, state_dtype, gen, positive=True)
    grads = rand_list(shapes, p_dtype, gen, scale=0.01)
    return params, anchors, fishers, grads


DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
          (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("sizes", list(SIZES), ids=str)
@pytest.mark.parametrize("p_dtype,state_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_penalty_and_grad_match_oracle(backend, device, sizes, p_dtype, state_dtype):
    params, anchors, fishers, grads = _lists(SIZES[sizes], p_dtype, state_dtype)
    want, want_mag, want_grads, mags = _oracle(params, anchors, fishers, grads, LAM)
    params, anchors, fishers, grads = to_dev((params, anchors, fishers, grads), device)
    with forgetkern.use_backend(backend):
        got = forgetkern.ewc_penalty_and_grad_(params, anchors, fishers, lam=LAM, grads=grads)
    got, grads = to_cpu((got, grads))
    acc = torch.float64 if p_dtype == torch.float64 else torch.float32
    assert got.dim() == 0 and got.dtype == acc
    n = sum(p.numel() for p in params)
    # a float32 sum of n positive terms: relative error well under n * eps; fixed-order reduction
    assert abs(got.item() - want) <= 8 * EPS[acc] * (n ** 0.5 + 8) * want_mag + 1e-300
    for i, (g, w, m) in enumerate(zip(grads, want_grads, mags)):
        assert g.dtype == p_dtype
        assert_close_scaled(g, w, m, p_dtype, 3.0, f"grads[{i}]")


@pytest.mark.parametrize("backend,device", backend_devices())
def test_penalty_is_deterministic(backend, device):
    params, anchors, fishers, _ = to_dev(_lists([65537, 1000, 3], torch.float32, torch.float32, seed=5), device)
    with forgetkern.use_backend(backend):
        a = forgetkern.ewc_penalty(params, anchors, fishers, LAM)
        b = forgetkern.ewc_penalty(params, anchors, fishers, LAM)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("p_dtype,state_dtype", DTYPES[:4], ids=lambda d: str(d).replace("torch.", ""))
def test_autograd_form_matches_fused_form(backend, device, p_dtype, state_dtype):
    params, anchors, fishers, _ = to_dev(_lists([(13, 7), 0, 301], p_dtype, state_dtype, seed=6), device)
    leaves = [p.clone().requires_grad_() for p in params]
    with forgetkern.use_backend(backend):
        pen = forgetkern.ewc_penalty(leaves, anchors, fishers, LAM)
        (3.0 * pen).backward()
        grads = [torch.zeros_like(p) for p in params]
        fused = forgetkern.ewc_penalty_and_grad_(params, anchors, fishers, lam=3.0 * LAM, grads=grads)
    torch.testing.assert_close(3.0 * pen.detach(), fused, rtol=1e-5, atol=0)
    for leaf, g in zip(leaves, grads):
        assert leaf.grad.dtype == p_dtype
        torch.testing.assert_close(leaf.grad, g, rtol=2 * EPS[p_dtype], atol=0)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_gradcheck_fp64(backend, device):
    params, anchors, fishers, _ = to_dev(_lists([(3, 4), 5, 1], torch.float64, torch.float64, seed=7), device)
    leaves = [p.clone().requires_grad_() for p in params]

    def fn(*ps):
        return forgetkern.ewc_penalty(list(ps), anchors, fishers, LAM)

    with forgetkern.use_backend(backend):
        assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_opcheck(backend, device):
    params, anchors, fishers, grads = to_dev(_lists([17, (4, 9)], torch.float32, torch.bfloat16, seed=8), device)
    with forgetkern.use_backend(backend):
        torch.library.opcheck(torch.ops.forgetkern.ewc_fused.default,
                              (params, anchors, fishers, grads, LAM, True, True))
        torch.library.opcheck(torch.ops.forgetkern.ewc_penalty.default, (params, anchors, fishers, LAM))
        leaves = [p.clone().requires_grad_() for p in params]
        torch.library.opcheck(torch.ops.forgetkern.ewc_penalty.default, (leaves, anchors, fishers, LAM))


def test_avalanche_convention():
    """Avalanche adds ewc_lambda * sum F d^2 (no 1/2): lam = 2 * ewc_lambda reproduces it, grad included."""
    params, anchors, fishers, _ = _lists([50, (6, 6)], torch.float64, torch.float64, seed=9)
    leaves = [p.clone().requires_grad_() for p in params]
    ewc_lambda = 0.4
    avalanche = sum((f * (p - a).pow(2)).sum() for p, a, f in zip(leaves, anchors, fishers)) * ewc_lambda
    avalanche.backward()
    grads = [torch.zeros_like(p) for p in params]
    ours = forgetkern.ewc_penalty_and_grad_(params, anchors, fishers, lam=2 * ewc_lambda, grads=grads)
    torch.testing.assert_close(ours, avalanche.detach())
    for leaf, g in zip(leaves, grads):
        torch.testing.assert_close(leaf.grad, g)


def _ok():
    return [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)]


@pytest.mark.parametrize("change,match", [
    (lambda p, a, f, g: (p, a + [torch.zeros(1)], f, g), "anchors has 2 tensors but params has 1"),
    (lambda p, a, f, g: (p, a, [torch.zeros(4)], g), r"fishers\[0\] has shape \(4,\)"),
    (lambda p, a, f, g: (p, a, f, [torch.zeros(3, dtype=torch.float16)]), r"grads\[0\] has dtype torch.float16 "
                                                                          r"but params\[0\] has torch.float32"),
    (lambda p, a, f, g: ([torch.zeros(3, dtype=torch.int64)], a, f, g), r"params\[0\] has dtype torch.int64"),
    (lambda p, a, f, g: (p, [torch.zeros(6)[::2]], f, g), r"anchors\[0\] is not contiguous"),
    (lambda p, a, f, g: (p, a, [torch.zeros(3, device="meta")], g), r"fishers\[0\] is on meta"),
    (lambda p, a, f, g: (p, [torch.zeros(3, requires_grad=True)], f, g), r"anchors\[0\] requires grad"),
    (lambda p, a, f, g: (p, a, f, g[0]), "grads must be a list or tuple of tensors, got a single Tensor"),
])
def test_bad_inputs_name_the_argument(change, match):
    p, a, f, g = change(*_ok())
    with pytest.raises((TypeError, ValueError), match=match):
        forgetkern.ewc_penalty_and_grad_(p, a, f, lam=1.0, grads=g)


def test_bad_lambda():
    p, a, f, g = _ok()
    with pytest.raises(ValueError, match="lam must be >= 0"):
        forgetkern.ewc_penalty_and_grad_(p, a, f, lam=-1.0, grads=g)
    with pytest.raises(ValueError, match="lam must be finite"):
        forgetkern.ewc_penalty(p, a, f, float("inf"))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_double_backward_is_exact(backend, device):
    """create_graph=True: the gradient lam*F*d has its own graph (d/dtheta = lam*F), e.g. for HVPs."""
    params, anchors, fishers, _ = to_dev(_lists([(3, 4), 5], torch.float64, torch.float64, seed=11), device)
    leaves = [p.clone().requires_grad_() for p in params]
    with forgetkern.use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda *ps: forgetkern.ewc_penalty(list(ps), anchors, fishers, LAM),
                                            leaves)
        pen = forgetkern.ewc_penalty(leaves, anchors, fishers, LAM)
        grads = torch.autograd.grad(pen, leaves, create_graph=True)
    assert all(g.requires_grad for g in grads)
    vs = [torch.randn_like(p) for p in params]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), leaves)
    for h, f, v in zip(hvp, fishers, vs):
        torch.testing.assert_close(h, LAM * f * v, rtol=1e-12, atol=0)


@pytest.mark.parametrize("alias", ["params", "anchors", "fishers"])
def test_grads_aliasing_an_input_is_refused(alias):
    p, a, f, _ = _ok()
    g = {"params": p, "anchors": a, "fishers": f}[alias]
    with pytest.raises(ValueError, match=rf"grads\[0\] and {alias}\[0\] share memory"):
        forgetkern.ewc_penalty_and_grad_(p, a, f, lam=1.0, grads=g)
