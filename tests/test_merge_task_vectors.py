"""merge_task_vectors: every backend against a float64 evaluation of the reference math, bit equality of the
kernels with the reference in the same precision, DARE mask reproducibility, odd shapes, bad inputs, opcheck.
Every backend on every device it runs on (tests/_helpers.py backend_devices: the cuda backend, and torch / triton
on CUDA tensors, with a GPU; skipped with the reason without one); the expected values come from the torch
backend on CPU."""

from __future__ import annotations

import pytest
import torch

import forgetkern
from forgetkern.ops.merge_task_vectors import magnitude_thresholds, merge_task_vectors, task_keys
from forgetkern.reference import merge_task_vectors as ref
from forgetkern.reference.lora_linear import keep_mask_int64
from tests._helpers import EPS, backend_devices, to_dev

METHODS = [("task_arithmetic", {}), ("ties", {"density": 0.3}), ("dare_linear", {"p": 0.6}),
           ("dare_ties", {"p": 0.5}), ("magnitude_prune", {"density": 0.5}),
           ("ties", {"density": 0.4, "sign": "frequency"}), ("ties", {"density": 0.4, "normalize": "weight",
                                                                      "sign_weighted": True}),
           ("task_arithmetic", {"normalize": "weight"}), ("dare_linear", {"p": 0.3, "rescale": False})]
SHAPES = [(37, 19), (1,), (0, 5), (65537,), (3, 4, 5)]
# the Triton interpreter runs each program in Python: the big tensor (64 programs) only for the compiled backends
SMALL = [(37, 19), (1,), (0, 5), (1025,), (3, 4, 5)]
WEIGHTS = [0.7, 1.3, -0.4]


def _backends():
    """``(backend, device)`` pairs of the backends that implement the op (each skipped with its reason when it
    cannot run here)."""
    from forgetkern import _backend

    return backend_devices(_backend.SUPPORTED_BY_OP["merge_task_vectors"], op="merge_task_vectors")


def _interpreted(backend, device):
    """The Triton interpreter (CPU tensors): each program runs in Python, and 16-bit stores truncate."""
    return backend == "triton" and device == "cpu"


def _merge(backend, device, base, tvs, **kw):
    """merge_task_vectors on ``backend`` with the inputs moved to ``device``; the outputs back on CPU."""
    with forgetkern.use_backend(backend):
        out = merge_task_vectors(to_dev(base, device), to_dev(tvs, device), **kw)
    assert all(o.device.type == torch.device(device).type for o in out)
    return [o.cpu() for o in out]


def _inputs(dtype, shapes=SHAPES, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    tvs = [[(torch.randn(s, generator=g, dtype=torch.float64) * 0.1).to(dtype) for s in shapes] for _ in range(n)]
    return base, tvs


def _mag(base, tvs, weights):
    """Magnitude of the terms summed per element: |b| + sum_k |w_k tau_k| (for the error bound)."""
    return [b.double().abs() + sum(abs(w) * tv[t].double().abs() for w, tv in zip(weights, tvs)) * 2
            for t, b in enumerate(base)]


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method,kw", METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
def test_backend_vs_fp64(backend, device, dtype, method, kw):
    base, tvs = _inputs(dtype, SMALL if _interpreted(backend, device) else SHAPES)
    # thresholds from the stored values (exact in every compute type: tau = x, no subtraction)
    got = _merge(backend, device, base, tvs, method=method, weights=WEIGHTS, seed=5, **kw)
    with forgetkern.use_backend("torch"):
        want = merge_task_vectors([b.double() for b in base], [[x.double() for x in tv] for tv in tvs],
                                  method=method, weights=WEIGHTS, seed=5, **kw)
        same = merge_task_vectors(base, tvs, method=method, weights=WEIGHTS, seed=5, **kw)
    for t, (g, w, s, m) in enumerate(zip(got, want, same, _mag(base, tvs, WEIGHTS))):
        assert g.dtype == dtype and g.shape == base[t].shape
        # storage rounding of the result (1/2 ulp of the output dtype) + float32 math (a few ulps of the terms)
        bound = EPS[dtype] * w.abs() + 8 * EPS[torch.float32 if dtype != torch.float64 else dtype] * m * 4
        err = (g.double() - w).abs()
        assert bool((err <= bound + 1e-300).all()), (t, float((err - bound).max()))
        # the kernels do the reference's IEEE operations in its order (the interpreter stores bf16 / fp16 by
        # truncation, not rounding: bit equality there for float32 / float64 only)
        if not _interpreted(backend, device) or dtype in (torch.float32, torch.float64):
            assert torch.equal(g, s), f"{backend} on {device} is not bit-identical to the reference (tensor {t})"


@pytest.mark.parametrize("backend,device", _backends())
def test_subtract_base_and_mixed_dtypes(backend, device):
    """Fine-tuned weights in (tau = x - b on the fly) equal task vectors in; bf16 inputs with an fp32 base."""
    base, tvs = _inputs(torch.float32, SMALL if _interpreted(backend, device) else SHAPES)
    fts = [[b + x for b, x in zip(base, tv)] for tv in tvs]
    taus = [[f - b for f, b in zip(ft, base)] for ft in fts]
    for method, kw in METHODS[:5]:
        a = _merge(backend, device, base, fts, method=method, weights=WEIGHTS, subtract_base=True, **kw)
        with forgetkern.use_backend("torch"):
            b = merge_task_vectors(base, taus, method=method, weights=WEIGHTS, **kw)
        for x, y in zip(a, b):
            assert torch.equal(x, y), method
    bf = [[x.bfloat16() for x in tv] for tv in tvs]
    got = _merge(backend, device, base, bf, method="ties", density=0.3, weights=WEIGHTS)
    with forgetkern.use_backend("torch"):
        want = merge_task_vectors(base, [[x.float() for x in tv] for tv in bf], method="ties", density=0.3,
                                  weights=WEIGHTS)
    for x, y in zip(got, want):
        assert x.dtype == torch.float32 and torch.equal(x, y)


def test_formulas_by_hand():
    """The methods on a 4-element example computed by hand (PEFT semantics)."""
    base = [torch.zeros(4, dtype=torch.float64)]
    t1 = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    t2 = torch.tensor([3.0, 1.0, -0.25, 0.0], dtype=torch.float64)
    tvs = [[t1], [t2]]
    ta = merge_task_vectors(base, tvs, weights=[1.0, 0.5])[0]
    assert ta.tolist() == [2.5, -1.5, 0.375, 0.0]
    # ties density 0.5: keep the top-2 |.| of each: t1 -> [1, -2, 0, 0], t2 -> [3, 1, 0, 0]; votes: 4, -1;
    # element 0: both agree (+): mean(1*1, 0.5*3) = 1.25; element 1: sign -, only t1: -2
    ties = merge_task_vectors(base, tvs, method="ties", density=0.5, weights=[1.0, 0.5])[0]
    assert ties.tolist() == [1.25, -2.0, 0.0, 0.0]
    mp = merge_task_vectors(base, tvs, method="magnitude_prune", density=0.5, weights=[1.0, 0.5])[0]
    assert mp.tolist() == [2.5, -1.5, 0.0, 0.0]
    lam = merge_task_vectors([torch.ones(4, dtype=torch.float64)], tvs, method="ties", density=0.5,
                             weights=[1.0, 0.5], lam=2.0)[0]
    assert lam.tolist() == [3.5, -3.0, 1.0, 1.0]


def test_magnitude_thresholds_match_kthvalue_and_peft_count():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(101, 7, generator=g)
    for d in (0.0, 0.01, 0.2, 0.999, 1.0):
        thr = magnitude_thresholds([x], d)[0]
        k = int(d * x.numel())
        kept = int((x.abs() >= thr).sum())
        assert kept == (x.numel() if d >= 1 else k)


@pytest.mark.parametrize("backend,device", _backends())
def test_dare_mask_is_the_lora_hash_and_reproducible(backend, device):
    """The DARE mask is the LoRA dropout hash of (key, element index): kept elements equal tau / (1 - p), the
    others 0; the same seed gives the same merge, another seed another mask; a tile with its offset gives
    the rows of the whole."""
    p = 0.7
    tau = torch.randn(40, 33, generator=torch.Generator().manual_seed(2)) + 3.0  # no zeros
    base = [torch.zeros_like(tau)]
    a = _merge(backend, device, base, [[tau]], method="dare_linear", p=p, seed=11, tensor_ids=[42])[0]
    b = _merge(backend, device, base, [[tau]], method="dare_linear", p=p, seed=11, tensor_ids=[42])[0]
    c = _merge(backend, device, base, [[tau]], method="dare_linear", p=p, seed=12, tensor_ids=[42])[0]
    tile = _merge(backend, device, [base[0][10:20]], [[tau[10:20]]], method="dare_linear", p=p, seed=11,
                  tensor_ids=[42], offsets=[10 * 33])[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(tile, a[10:20])
    key = task_keys(11, [42], 1)[0]
    keep = keep_mask_int64(key, p, 1, tau.numel()).reshape(tau.shape)  # row 0 = (i >> 32), col = i
    assert torch.equal(a != 0, keep)
    assert torch.equal(a[keep], tau[keep] * torch.tensor(1 / (1 - p), dtype=torch.float32))
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 0.05


@pytest.mark.parametrize("backend,device", _backends())
def test_many_tensors_with_empties(backend, device):
    """300 tensors (every 9th empty): more than one multi-tensor launch holds on CUDA."""
    g = torch.Generator().manual_seed(3)
    sizes = [int(n) for n in torch.randint(0, 50, (40 if _interpreted(backend, device) else 300,), generator=g)]
    sizes[::9] = [0] * len(sizes[::9])
    base = [torch.randn(n, generator=g) for n in sizes]
    tvs = [[torch.randn(n, generator=g) for n in sizes] for _ in range(2)]
    for method, kw in (("dare_ties", {"p": 0.5}), ("ties", {"density": 0.5})):
        with forgetkern.use_backend("torch"):
            want = merge_task_vectors(base, tvs, method=method, seed=1, **kw)
        got = _merge(backend, device, base, tvs, method=method, seed=1, **kw)
        assert all(torch.equal(x, y) for x, y in zip(got, want)), method


@pytest.mark.parametrize("backend,device", _backends())
def test_unaligned_views(backend, device):
    """Inputs that start one element into their storage (no 128-bit access possible: the scalar path on CUDA),
    mixed with aligned ones in one call, for 16-bit, 32-bit and 64-bit dtypes."""
    g = torch.Generator().manual_seed(4)
    n = 1000 if _interpreted(backend, device) else 4099
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        base = [torch.randn(n + 1, generator=g).to(dtype)[1:], torch.randn(n, generator=g).to(dtype)]
        tvs = [[(torch.randn(n + 1, generator=g) * 0.1).to(dtype)[1:], (torch.randn(n, generator=g) * 0.1).to(dtype)]
               for _ in range(3)]
        for method, kw in (("ties", {"density": 0.3}), ("dare_linear", {"p": 0.4})):
            devb, devt = to_dev(base, device), to_dev(tvs, device)
            if device != "cpu":  # keep the one-element offset on the device
                devb = [torch.cat([b.new_zeros(1), b])[1:] if i == 0 else b for i, b in enumerate(devb)]
                devt = [[torch.cat([x.new_zeros(1), x])[1:] if i == 0 else x for i, x in enumerate(tv)] for tv in devt]
            with forgetkern.use_backend(backend):
                got = [o.cpu() for o in merge_task_vectors(devb, devt, method=method, weights=WEIGHTS, seed=3, **kw)]
            with forgetkern.use_backend("torch"):
                want = merge_task_vectors(base, tvs, method=method, weights=WEIGHTS, seed=3, **kw)
            for x, y in zip(got, want):
                if _interpreted(backend, device) and dtype == torch.bfloat16:
                    assert torch.allclose(x.float(), y.float(), rtol=2 ** -7, atol=0), (dtype, method)
                else:
                    assert torch.equal(x, y), (dtype, method)


def test_bad_inputs():
    base, tvs = _inputs(torch.float32, shapes=[(3, 4)], n=2)
    with pytest.raises(ValueError, match="method must be one of"):
        merge_task_vectors(base, tvs, method="nope")
    with pytest.raises(ValueError, match="needs density"):
        merge_task_vectors(base, tvs, method="ties")
    with pytest.raises(ValueError, match="needs p="):
        merge_task_vectors(base, tvs, method="dare_linear")
    with pytest.raises(ValueError, match="disagree"):
        merge_task_vectors(base, tvs, method="dare_linear", p=0.5, density=0.4)
    with pytest.raises(ValueError, match="p must be < 1"):
        merge_task_vectors(base, tvs, method="dare_ties", p=1.0)
    with pytest.raises(ValueError, match="density must be in"):
        merge_task_vectors(base, tvs, method="ties", density=1.5)
    with pytest.raises(ValueError, match="does not prune"):
        merge_task_vectors(base, tvs, density=0.5)
    with pytest.raises(ValueError, match="weights must be a list of 2"):
        merge_task_vectors(base, tvs, weights=[1.0])
    with pytest.raises(ValueError, match=r"task_vectors\[1\]\[0\] has shape"):
        merge_task_vectors(base, [tvs[0], [torch.zeros(4, 3)]])
    with pytest.raises(TypeError, match="share one dtype"):
        merge_task_vectors(base, [tvs[0], [tvs[1][0].double()]])
    with pytest.raises(TypeError, match="list of N lists"):
        merge_task_vectors(base, tvs[0][0])
    with pytest.raises(ValueError, match="has 2 tensors but base has 1"):
        merge_task_vectors(base, [tvs[0] * 2, tvs[1]])
    with pytest.raises(ValueError, match="sign must be"):
        merge_task_vectors(base, tvs, method="ties", density=0.5, sign="majority")
    with pytest.raises(TypeError, match="dtype torch.int64"):
        merge_task_vectors([torch.zeros(3, dtype=torch.int64)], [[torch.zeros(3, dtype=torch.int64)]])
    with pytest.raises(ValueError, match="thresholds must be"):
        merge_task_vectors(base, tvs, method="ties", density=0.5, thresholds=torch.zeros(5))


@pytest.mark.parametrize("backend,device", [p for p in _backends() if p.values[0] != "triton"])
def test_opcheck(backend, device):
    base, tvs = _inputs(torch.float32, shapes=[(5, 6), (7,)], n=2)
    base, tvs = to_dev(base, device), to_dev(tvs, device)
    flat = [tvs[k][t] for t in range(2) for k in range(2)]
    thr = magnitude_thresholds(flat, 0.5)
    with forgetkern.use_backend(backend):
        torch.library.opcheck(torch.ops.forgetkern.merge_task_vectors.default,
                              (base, flat, [1.0, 0.5], thr, [], [0, 0], ref.PRUNE_MAGNITUDE, 0.0, True,
                               ref.CONSENSUS_TOTAL, False, ref.NORM_COUNT, 1.0, False))


def test_cpp_thresholds_equal_kthvalue():
    """The C++ selection (std::nth_element) gives torch.kthvalue's thresholds, with and without subtract_base,
    for float32 / bfloat16 / float64 inputs and the edge densities."""
    from forgetkern import _backend, _ext

    if _backend.availability("cpu", "merge_task_vectors")["cpp"] is not None:
        pytest.skip(_backend.availability("cpu", "merge_task_vectors")["cpp"])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        base, tvs = _inputs(dtype, shapes=[(37, 19), (1,), (1025,)], n=2)
        flat = [tvs[k][t] for t in range(3) for k in range(2)]
        c = torch.float64 if dtype == torch.float64 else torch.float32
        for density in (0.0, 0.01, 0.3, 1.0):
            for sub in (False, True):
                got = _ext.cpu_ops().merge_magnitude_thresholds(base, flat, 2, density, sub)
                taus = [(x.to(c) - base[i // 2].to(c)) if sub else x for i, x in enumerate(flat)]
                want = magnitude_thresholds(taus, density)
                assert got.dtype == c and torch.equal(got, want.to(c)), (dtype, density, sub)


@pytest.mark.parametrize("backend,device", [p for p in _backends() if p.values[0] == "cuda"])
def test_cuda_task_limit(backend, device):
    """The CUDA kernel takes at most 64 tasks per call (its pointer table travels in the kernel arguments); more
    is an error that says what to do."""
    base = [torch.zeros(8, device=device)]
    tvs = [[torch.ones(8, device=device)] for _ in range(65)]
    with forgetkern.use_backend(backend), pytest.raises(RuntimeError, match="at most 64 task vectors"):
        merge_task_vectors(base, tvs)
    with forgetkern.use_backend(backend):
        got = merge_task_vectors(base, tvs[:64])[0]
    assert torch.equal(got.cpu(), torch.full((8,), 64.0))
