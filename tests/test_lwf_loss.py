"""forgetkern.lwf_loss (fused LM head + CE + T^2 KL, chunked) against a naive fp64 autograd oracle."""

import pytest
import torch

import forgetkern
from forgetkern.ops.lwf_loss import _lwf_op
from tests._helpers import devices, to_dev


def _naive(hs, ht, W, y, b, alpha, T, ce_weight):
    zs = hs @ W.T + (0 if b is None else b)
    zt = (ht @ W.T + (0 if b is None else b)).detach()  # the teacher is a fixed target
    v = y != -100
    ce = torch.nn.functional.cross_entropy(zs[v], y[v])
    kl = (torch.softmax(zt[v] / T, -1) * (torch.log_softmax(zt[v] / T, -1) - torch.log_softmax(zs[v] / T, -1))
          ).sum(-1).mean() * T * T
    return ce_weight * ce + alpha * kl, ce, kl


def _inputs(N=37, H=16, V=50, dtype=torch.float64, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    ht = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    return to_dev((hs, ht, W, b, y), device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("chunk", [1, 8, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_naive_fp64(chunk, bias, device):
    hs, ht, W, b, y = _inputs(bias=bias, device=device)
    out = forgetkern.lwf_loss(hs, ht, W, y, alpha=0.7, temperature=2.5, ce_weight=0.9, bias=b, chunk_size=chunk)
    ref, ce, kl = _naive(hs, ht, W, y, b, 0.7, 2.5, 0.9)
    wrt = (hs, W) + ((b,) if bias else ())
    got_g = torch.autograd.grad(out.loss, wrt)
    want_g = torch.autograd.grad(ref, wrt)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.ce, ce.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.kl, kl.detach(), rtol=1e-12, atol=1e-13)
    for a, w in zip(got_g, want_g):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-14)


def test_teacher_equal_student_has_zero_kl_and_plain_ce_gradient():
    hs, _, W, b, y = _inputs()
    out = forgetkern.lwf_loss(hs, hs.detach(), W, y, alpha=3.0, temperature=2.0, bias=b)
    assert abs(float(out.kl)) < 1e-13
    ce = torch.nn.functional.cross_entropy((hs @ W.T + b)[y != -100], y[y != -100])
    torch.testing.assert_close(torch.autograd.grad(out.loss, hs)[0], torch.autograd.grad(ce, hs)[0])


@pytest.mark.parametrize("device", devices())
def test_float32_and_bf16_hidden_states_earned_tolerance(device):
    hs64, ht64, W64, _, y = _inputs(bias=False, device=device)
    ref, _, _ = _naive(hs64, ht64, W64, y, None, 1.0, 2.0, 1.0)
    g_ref = torch.autograd.grad(ref, hs64)[0]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        hs = hs64.detach().to(dtype).requires_grad_()
        out = forgetkern.lwf_loss(hs, ht64.to(dtype), W64.detach().to(dtype), y, alpha=1.0, temperature=2.0)
        assert out.loss.dtype == torch.float32
        # bf16 inputs are rounded (2^-8 relative): the loss moves by about that much
        torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=tol, atol=tol)
        g = torch.autograd.grad(out.loss, hs)[0]
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), g_ref, rtol=tol * 10, atol=tol)


def test_frozen_head_gets_no_gradient_and_backward_scales():
    hs, ht, W, _, y = _inputs(bias=False)
    W = W.detach()
    out = forgetkern.lwf_loss(hs, ht, W, y)
    (g1,) = torch.autograd.grad(out.loss, hs, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * out.loss, hs)
    torch.testing.assert_close(g3, 3.0 * g1)


def test_no_counted_position_is_zero():
    hs, ht, W, _, y = _inputs(bias=False)
    out = forgetkern.lwf_loss(hs, ht, W, torch.full_like(y, -100))
    assert float(out.loss.detach()) == 0.0
    assert torch.count_nonzero(torch.autograd.grad(out.loss, hs)[0]) == 0


def test_batched_shapes_equal_flat():
    hs, ht, W, _, y = _inputs(N=24, bias=False)
    flat = forgetkern.lwf_loss(hs, ht, W, y).loss
    shaped = forgetkern.lwf_loss(hs.view(4, 6, -1), ht.view(4, 6, -1), W, y.view(4, 6)).loss
    torch.testing.assert_close(flat, shaped)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    hs, ht, W, b, y = _inputs(N=9, H=8, V=12, dtype=torch.float32, device=device)
    torch.library.opcheck(_lwf_op, (hs, ht, W, y, b, 1.0, 2.0, 1.0, 4, True))
    torch.library.opcheck(_lwf_op, (hs, ht, W.detach(), y, None, 0.5, 1.0, 1.0, 4, False))


def test_errors():
    hs, ht, W, _, y = _inputs(bias=False)
    with pytest.raises(ValueError, match="teacher_hidden"):
        forgetkern.lwf_loss(hs, ht[:-1], W, y)
    with pytest.raises(ValueError, match="weight must be"):
        forgetkern.lwf_loss(hs, ht, W.T, y)
    with pytest.raises(ValueError, match="labels must be an int64"):
        forgetkern.lwf_loss(hs, ht, W, y.float())
    with pytest.raises(ValueError, match=r"labels must be -100 or in \[0, 50\)"):
        forgetkern.lwf_loss(hs, ht, W, torch.full_like(y, 50))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        forgetkern.lwf_loss(hs, ht, W, y, temperature=0.0)
    with pytest.raises(ValueError, match="alpha and ce_weight"):
        forgetkern.lwf_loss(hs, ht, W, y, alpha=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        forgetkern.lwf_loss(hs, ht, W, y, chunk_size=0)
    with pytest.raises(TypeError, match="student_hidden must be a floating-point"):
        forgetkern.lwf_loss(y, ht, W, y)
