"""Low-rank projection (project_out_): every backend against a float64 oracle, invariants, opcheck, bad inputs.

Tolerance (earned): with ``C = U^T X`` summed over m terms and ``X - U C`` over k more, a float32 kernel errs on
each entry by at most ``(m + k + 2) eps (|X| + |U| |U|^T |X|)`` (elementwise magnitudes), plus one rounding of
the stored result in ``X``'s dtype. The oracle is float64 from the stored inputs.
"""

import pytest
import torch

import forgetkern
from forgetkern import _backend
from forgetkern.ops.project_out import _project_out_op
from forgetkern.ops.project_out import CUDA_MAX_K
from tests._helpers import EPS, backend_devices, to_cpu, to_dev

# (backend, device): CPU tensors for torch / triton (interpreted), CUDA tensors for cuda (and, with a GPU, torch
# and triton on CUDA too); a pair that cannot run here is skipped with the reason
BACKENDS = backend_devices(_backend.SUPPORTED_BY_OP["project_out_"], op="project_out_")
FLOAT32_ONLY = ("triton", "cuda")  # backends whose kernels compute in float32 (float64 runs on torch)


def _basis(m, k, gen, dtype=torch.float32):
    if k == 0:
        return torch.zeros(m, 0, dtype=dtype)
    return torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0].to(dtype)


def _case(shapes, side, x_dtype, u_dtype, seed=0):
    """shapes: (m, n, k): X is (m x n) for left, (n x m) for right; U (m x k)."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn((m, n) if side == "left" else (n, m), generator=gen, dtype=torch.float64).to(x_dtype)
          for m, n, k in shapes]
    us = [_basis(m, k, gen, u_dtype) for m, n, k in shapes]
    return xs, us


def _oracle(x, u, side):
    x, u = x.double(), u.double()
    if side == "left":
        return x - u @ (u.t() @ x), x.abs() + u.abs() @ (u.abs().t() @ x.abs())
    return x - (x @ u) @ u.t(), x.abs() + (x.abs() @ u.abs()) @ u.abs().t()


def _run_and_check(backend, device, shapes, side, x_dtype, u_dtype=torch.float32, seed=0):
    xs, us = _case(shapes, side, x_dtype, u_dtype, seed)
    want = [_oracle(x, u, side) for x, u in zip(xs, us)]
    xd, ud = to_dev((xs, us), device)
    with forgetkern.use_backend(backend):
        forgetkern.project_out_(xd, ud, side=side)
    xs = to_cpu(xd)
    acc = torch.float64 if torch.float64 in (x_dtype, u_dtype) else torch.float32
    for i, ((m, n, k), x, (w, mag)) in enumerate(zip(shapes, xs, want)):
        assert x.dtype == x_dtype
        tol = (m + k + 2) * EPS[acc] * mag + EPS[x_dtype] * w.abs() + 1e-300
        bad = (x.double() - w).abs() > tol
        assert not bad.any(), (i, int(bad.sum()), x.double()[bad][:3].tolist(), w[bad][:3].tolist())
    return xs, us


MIXED = [(70, 16, 9), (33, 5, 40), (70, 16, 9), (128, 16, 64)]  # repeated shape (grouped), k > BLOCK_KB
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32), (torch.float64, torch.float64)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("x_dtype,u_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_matches_oracle_per_dtype(backend, device, side, x_dtype, u_dtype):
    if backend in FLOAT32_ONLY and x_dtype == torch.float64:  # the kernel computes in float32
        xs, us = to_dev(_case(MIXED, side, x_dtype, u_dtype), device)
        with forgetkern.use_backend(backend), pytest.raises(forgetkern.BackendError, match="implemented: torch"):
            forgetkern.project_out_(xs, us, side=side)
        return
    _run_and_check(backend, device, MIXED, side, x_dtype, u_dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_large_basis(backend, device):
    """k > CUDA_MAX_K: the CUDA kernel stages at most CUDA_MAX_K basis columns, such bases run elsewhere (on
    request of the cuda backend: a BackendError naming the backends that take them; on auto: they run)."""
    shapes = [(CUDA_MAX_K + 30, 5, CUDA_MAX_K + 2), (20, 3, 4)]
    if backend == "cuda":
        xs, us = to_dev(_case(shapes, "left", torch.float32, torch.float32), device)
        with forgetkern.use_backend(backend), pytest.raises(forgetkern.BackendError,
                                                            match="implemented: torch, triton"):
            forgetkern.project_out_(xs, us, side="left")
        backend = "auto"
    _run_and_check(backend, device, shapes, "right", torch.float32)


SHAPES = {
    "k0-and-empty": [(9, 4, 0), (0, 3, 0), (9, 0, 3), (12, 5, 3)],
    "wide-n": [(40, 33, 7), (65, 17, 64)],           # n beyond one BLOCK_N tile, L beyond one BLOCK_L slab
    "many": [(5 + k, 1 + k % 4, k % 5) for k in range(12)],
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shapes", list(SHAPES), ids=str)
def test_matches_oracle_per_shape(backend, device, shapes):
    for side in ("left", "right"):
        _run_and_check(backend, device, SHAPES[shapes], side, torch.float32, seed=1)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_invariants(backend, device):
    """The result is orthogonal to the basis (to 1e-6 in float32) and projecting again changes nothing."""
    gen = torch.Generator().manual_seed(2)
    for side in ("left", "right"):
        xs, us = to_dev(_case([(96, 16, 24), (40, 8, 39)], side, torch.float32, torch.float32, seed=2), device)
        with forgetkern.use_backend(backend):
            forgetkern.project_out_(xs, us, side=side)
            for x, u in zip(xs, us):
                residual = (u.t() @ x) if side == "left" else (x @ u)
                assert float(residual.abs().max()) <= 1e-6 * float(x.abs().max()) * 10 + 1e-6
            again = [x.clone() for x in xs]
            forgetkern.project_out_(again, us, side=side)
        for x, y in zip(xs, again):
            torch.testing.assert_close(y, x, atol=2e-6 * float(x.abs().max()), rtol=0)
    del gen


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    xs, us = to_dev(_case([(20, 4, 3), (17, 16, 5)], "left", torch.float32, torch.float32, seed=3), device)
    # the aot_dispatch checks trace the op's registration, the same for every backend: once, on torch
    utils = None if backend == "torch" else ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {} if utils is None else {"test_utils": utils}
    with forgetkern.use_backend(backend):
        torch.library.opcheck(_project_out_op, (xs, us, "left"), **kw)


def test_bad_inputs():
    x, u = torch.randn(10, 4), _basis(10, 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="side must be 'left'"):
        forgetkern.project_out_([x], [u], side="up")
    with pytest.raises(ValueError, match=r"bases\[0\] has shape \(10, 3\) but tensors\[0\] has shape \(4, 10\)"):
        forgetkern.project_out_([x.t().contiguous().t().t()], [u], side="left")
    with pytest.raises(ValueError, match="tensors has 2 entries but bases has 1"):
        forgetkern.project_out_([x, x.clone()], [u], side="left")
    with pytest.raises(ValueError, match=r"tensors\[0\] is not contiguous"):
        forgetkern.project_out_([torch.randn(4, 10).t()], [u], side="left")
    with pytest.raises(ValueError, match="share memory"):
        forgetkern.project_out_([x, x], [u, u], side="left")
    with pytest.raises(ValueError, match="leaf that requires grad"):
        forgetkern.project_out_([x.clone().requires_grad_()], [u], side="left")
    with pytest.raises(TypeError, match=r"bases\[0\] has dtype torch.int64"):
        forgetkern.project_out_([x], [torch.ones(10, 3, dtype=torch.long)], side="left")
    with torch.no_grad():  # parameters are projected under no_grad
        p = torch.nn.Parameter(torch.randn(10, 4))
        forgetkern.project_out_([p], [u], side="left")
    assert float((u.t() @ p.detach()).abs().max()) < 1e-5
