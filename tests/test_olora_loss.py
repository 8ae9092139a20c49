"""O-LoRA orthogonality loss (olora_loss): every backend against an exact float64 einsum oracle; autograd; bad inputs.

Tolerances are worst-case rounding bounds (Higham's gamma_n), not guesses. With ``M = |A_past| |A|^T`` (the
magnitude of every entry of ``P = A_past A^T``), a float32 kernel errs on ``P`` by at most ``K eps M`` (K = in);
the L1 loss by at most ``(K + n + 2) eps sum M`` and the fro2 loss by ``(2K + n + 4) eps sum M^2`` (n: terms
summed). The L1 gradient ``sign(P)^T A_past`` is exact except where ``|P| <= K eps M`` (the sign may flip
there: a change of ``2 |A_past[a, :]|``), plus ``(p + 2) eps`` of the sum and one rounding of the stored value.
"""

import pytest
import torch

import forgetkern
from forgetkern import _backend
from forgetkern.ops.olora_loss import _olora_loss_backward_op, _olora_loss_op
from tests._helpers import EPS, backend_devices, to_dev

# (backend, device): CPU tensors for torch / triton (interpreted), CUDA tensors for cuda (and, with a GPU, torch
# and triton on CUDA too); a pair that cannot run here is skipped with the reason
BACKENDS = backend_devices(_backend.SUPPORTED_BY_OP["olora_loss"], op="olora_loss")
FLOAT32_ONLY = ("triton", "cuda")  # backends whose kernels compute in float32 (float64 runs on torch)


def _layers(shapes, dtype, seed=0):
    """shapes: (p, r, in) per layer -> past, cur."""
    gen = torch.Generator().manual_seed(seed)
    past = [(torch.randn(p, k, generator=gen, dtype=torch.float64) * 0.5).to(dtype) for p, r, k in shapes]
    cur = [(torch.randn(r, k, generator=gen, dtype=torch.float64) * 0.5).to(dtype) for p, r, k in shapes]
    return past, cur


def _oracle(past, cur, norm):
    """(loss, loss bound, [(grad, grad bound)]) in float64 from the stored values, per the module docstring."""
    loss, bound, grads = 0.0, 0.0, []
    eps = EPS[torch.float32]
    for a_p, a in zip(past, cur):
        a_p, a = a_p.double(), a.double()
        k = a.shape[1]
        prod = torch.einsum("pk,rk->pr", a_p, a)
        mag = torch.einsum("pk,rk->pr", a_p.abs(), a.abs())
        n = prod.numel()
        if norm == "l1":
            loss += float(prod.abs().sum())
            bound += (k + n + 2) * eps * float(mag.sum())
            g = torch.einsum("pr,pk->rk", prod.sign(), a_p)
            amb = (prod.abs() <= (k + 2) * eps * mag).double()
            gb = (a_p.shape[0] + 2) * eps * torch.einsum("pr,pk->rk", torch.ones_like(prod), a_p.abs()) \
                + 2 * torch.einsum("pr,pk->rk", amb, a_p.abs())
        else:
            loss += float(prod.square().sum())
            bound += (2 * k + n + 4) * eps * float(mag.square().sum())
            g = 2 * torch.einsum("pr,pk->rk", prod, a_p)
            gb = 2 * (2 * k + a_p.shape[0] + 2) * eps * torch.einsum("pr,pk->rk", mag, a_p.abs())
        grads.append((g, gb))
    return loss, bound, grads


def _run_and_check(backend, device, shapes, dtype, norm, seed=0, scale=1.0):
    past, cur = _layers(shapes, dtype, seed)
    past_d = to_dev(past, device)
    leaves = [c.clone().to(device).requires_grad_() for c in cur]
    with forgetkern.use_backend(backend):
        loss = forgetkern.olora_loss(past_d, leaves, norm=norm)
        (loss * scale).backward()
    want, bound, grads = _oracle(past, cur, norm)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dim() == 0 and loss.dtype == acc and loss.device.type == torch.device(device).type
    assert abs(loss.item() - want) <= bound + 1e-300, (loss.item(), want, bound)
    for i, (leaf, (g, gb)) in enumerate(zip(leaves, grads)):
        got = leaf.grad.double().cpu()
        want_g = g * scale
        tol = gb * scale + EPS[dtype] * want_g.abs() + 1e-300
        bad = (got - want_g).abs() > tol
        assert leaf.grad.dtype == dtype
        assert not bad.any(), (i, int(bad.sum()), got[bad][:3].tolist(), want_g[bad][:3].tolist())
    return loss, leaves


MIXED = [(32, 16, 40), (8, 5, 33), (48, 16, 70), (32, 16, 40)]  # repeated shape: grouped; p > BLOCK_P
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("norm", ["l1", "fro2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_matches_oracle_per_dtype(backend, device, norm, dtype):
    if dtype == torch.float64 and backend in FLOAT32_ONLY:  # the kernels compute in float32
        past, cur = to_dev(_layers(MIXED, dtype), device)
        with forgetkern.use_backend(backend), pytest.raises(forgetkern.BackendError, match="implemented: torch"):
            forgetkern.olora_loss(past, cur)
        return
    _run_and_check(backend, device, MIXED, dtype, norm, scale=1.5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mixed_dtypes_and_many_layers(backend, device):
    """Layers of different dtype pairs in one call (one launch sequence per pair) and more layers than one
    kernel-argument table holds (kOloraMaxLayers = 64): still one fixed-order sum."""
    shapes = [(2 + k % 3, 1 + k % 5, 4 + k % 7) for k in range(70)]
    past, cur = _layers(shapes, torch.float32, seed=4)
    past = [p.to(torch.bfloat16) if i % 3 == 0 else p for i, p in enumerate(past)]
    cur = [c.to(torch.float16) if i % 4 == 1 else c for i, c in enumerate(cur)]
    leaves = [c.clone().to(device).requires_grad_() for c in cur]
    with forgetkern.use_backend(backend):
        loss = forgetkern.olora_loss(to_dev(past, device), leaves, norm="fro2")
        loss.backward()
    want, bound, grads = _oracle(past, cur, "fro2")
    assert abs(loss.item() - want) <= bound + 1e-300, (loss.item(), want, bound)
    for leaf, c, (g, gb) in zip(leaves, cur, grads):
        assert leaf.grad.dtype == c.dtype
        assert ((leaf.grad.double().cpu() - g).abs() <= gb + EPS[c.dtype] * g.abs() + 1e-300).all()


SHAPES = {
    "r1-p1": [(1, 1, 7)],
    "no-past": [(0, 4, 9), (3, 4, 9)],           # first task: layers with p = 0 add nothing, zero gradient
    "wide-r": [(40, 17, 130), (5, 33, 64)],      # r beyond one BLOCK_R tile, in beyond one BLOCK_K slab
    "many": [(2 + k % 5, 1 + k % 4, 3 + k) for k in range(10)],
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shapes", list(SHAPES), ids=str)
def test_matches_oracle_per_shape(backend, device, shapes):
    for norm in ("l1", "fro2"):
        _run_and_check(backend, device, SHAPES[shapes], torch.float32, norm, seed=1)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_past_gives_zero_and_zero_grad(backend, device):
    a = torch.randn(4, 9, device=device, requires_grad=True)
    with forgetkern.use_backend(backend):
        loss = forgetkern.olora_loss([torch.zeros(0, 9, device=device)], [a])
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(a.grad, torch.zeros_like(a))
        assert forgetkern.olora_loss([], []).item() == 0.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_orthogonal_factors_have_zero_loss(backend, device):
    q = torch.linalg.qr(torch.randn(50, 24, dtype=torch.float64))[0].t().float().to(device)  # 24 orthonormal rows
    with forgetkern.use_backend(backend):
        loss = forgetkern.olora_loss([q[:8]], [q[8:]], norm="fro2")
    assert loss.item() < 1e-10


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    past, cur = to_dev(_layers([(40, 17, 70)], torch.float32, 3), device)
    outs = []
    for _ in range(2):
        leaves = [c.clone().requires_grad_() for c in cur]
        with forgetkern.use_backend(backend):
            loss = forgetkern.olora_loss(past, leaves)
            loss.backward()
        outs.append([loss.detach()] + [x.grad for x in leaves])
    assert all(torch.equal(x, y) for x, y in zip(*outs))


def test_gradcheck_and_double_backward_float64():
    past, cur = _layers([(6, 3, 7), (4, 2, 5)], torch.float64, 5)
    leaves = [c.clone().requires_grad_() for c in cur]
    for norm in ("l1", "fro2"):
        assert torch.autograd.gradcheck(lambda *a: forgetkern.olora_loss(past, list(a), norm=norm), leaves)
    assert torch.autograd.gradgradcheck(lambda *a: forgetkern.olora_loss(past, list(a), norm="fro2"), leaves)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    past, cur = to_dev(_layers([(6, 3, 7), (20, 16, 33)], torch.float32, 6), device)
    leaves = [c.clone().requires_grad_() for c in cur]
    # the aot_dispatch checks trace the op's registration, the same for every backend: once, on torch
    utils = None if backend == "torch" else ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {} if utils is None else {"test_utils": utils}
    with forgetkern.use_backend(backend):
        torch.library.opcheck(_olora_loss_op, (past, leaves, "l1"), **kw)
        torch.library.opcheck(_olora_loss_backward_op, (past, cur, "fro2", torch.tensor(2.0, device=device)), **kw)


def test_bad_inputs():
    a, p = torch.randn(4, 9), torch.randn(3, 9)
    with pytest.raises(ValueError, match="norm must be one of"):
        forgetkern.olora_loss([p], [a], norm="l2")
    with pytest.raises(ValueError, match="past_A has 2 tensors but cur_A has 1"):
        forgetkern.olora_loss([p, p], [a])
    with pytest.raises(ValueError, match=r"past_A\[0\] has shape \(3, 8\).*in_features differ"):
        forgetkern.olora_loss([torch.randn(3, 8)], [a])
    with pytest.raises(ValueError, match=r"past_A\[0\] requires grad"):
        forgetkern.olora_loss([p.requires_grad_()], [a])
    with pytest.raises(TypeError, match="single Tensor"):
        forgetkern.olora_loss(torch.randn(3, 9), [a])
    with pytest.raises(TypeError, match=r"cur_A\[0\] has dtype torch.int64"):
        forgetkern.olora_loss([torch.randn(3, 9)], [torch.ones(4, 9, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"cur_A\[0\] must be 2-D"):
        forgetkern.olora_loss([torch.randn(3, 9)], [torch.randn(9)])
