"""fisher_accumulate_: every backend against an exact float64 oracle, per dtype, odd sizes, bad inputs."""

import pytest
import torch

import forgetkern
from tests._helpers import EPS, assert_close_scaled, backend_devices, rand_list, size_sets, to_cpu, to_dev

SIZES = size_sets()


def _oracle(fishers, grads, decay, scale):
    """Exact float64 result of decay*F + scale*g^2, and the magnitude of the summed terms."""
    want, mag = [], []
    for f, g in zip(fishers, grads):
        a, b = f.double() * decay, g.double() ** 2 * scale
        want.append(a + b)
        mag.append(a.abs() + b.abs())
    return want, mag


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("sizes", list(SIZES), ids=str)
@pytest.mark.parametrize("state_dtype,grad_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float64, torch.float64),
], ids=lambda d: str(d).replace("torch.", ""))
def test_matches_oracle(backend, device, sizes, state_dtype, grad_dtype):
    gen = torch.Generator().manual_seed(1)
    shapes = SIZES[sizes]
    fishers = rand_list(shapes, state_dtype, gen, positive=True)
    grads = rand_list(shapes, grad_dtype, gen, scale=3.0)
    want, mag = _oracle(fishers, grads, 0.9, 0.25)
    fishers, grads = to_dev((fishers, grads), device)
    with forgetkern.use_backend(backend):
        found = forgetkern.fisher_accumulate_(fishers, grads, decay=0.9, scale=0.25)
    found, fishers = to_cpu((found, fishers))
    assert found.dtype == torch.float32 and found.dim() == 0 and found.item() == 0.0
    # one rounding of the fp32 (or fp64) math plus one rounding on store; 1 ulp more for truncating stores
    ulps = 3.0 if state_dtype == torch.float32 else 2.0
    for i, (f, w, m) in enumerate(zip(fishers, want, mag)):
        assert f.dtype == state_dtype
        assert_close_scaled(f, w, m + w.abs(), state_dtype, ulps, f"fishers[{i}]")


@pytest.mark.parametrize("backend,device", backend_devices())
def test_mixed_dtypes_in_one_call(backend, device):
    gen = torch.Generator().manual_seed(2)
    fishers = [torch.rand(100, generator=gen).to(d) for d in (torch.float32, torch.bfloat16, torch.float32)]
    grads = [torch.randn(100, generator=gen).to(d) for d in (torch.float16, torch.float32, torch.bfloat16)]
    want, mag = _oracle(fishers, grads, 1.0, 1.0)
    fishers, grads = to_dev((fishers, grads), device)
    with forgetkern.use_backend(backend):
        forgetkern.fisher_accumulate_(fishers, grads)
    fishers = to_cpu(fishers)
    for i, (f, w, m) in enumerate(zip(fishers, want, mag)):
        assert_close_scaled(f, w, m, f.dtype, 3.0, f"fishers[{i}]")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_fp16_gradients_never_overflow(backend, device, state_dtype):
    grads = [torch.full((33,), 60000.0, dtype=torch.float16), torch.full((5,), -65504.0, dtype=torch.float16)]
    fishers = [torch.zeros(33, dtype=state_dtype), torch.ones(5, dtype=state_dtype)]
    fishers, grads = to_dev((fishers, grads), device)
    with forgetkern.use_backend(backend):
        found = forgetkern.fisher_accumulate_(fishers, grads)
    found, fishers = to_cpu((found, fishers))
    assert found.item() == 0.0
    assert torch.isfinite(fishers[0]).all() and torch.isfinite(fishers[1]).all()
    torch.testing.assert_close(fishers[0].double(), torch.full((33,), 3.6e9, dtype=torch.float64),
                               rtol=EPS[state_dtype], atol=0)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_gradients_are_skipped_and_flagged(backend, device, bad):
    fishers = [torch.full((70000,), 4.0), torch.full((3,), 5.0)]
    grads = [torch.ones(70000), torch.ones(3)]
    grads[0][[0, 40000, 69999]] = bad
    fishers, grads = to_dev((fishers, grads), device)
    with forgetkern.use_backend(backend):
        found = forgetkern.fisher_accumulate_(fishers, grads, decay=0.5, scale=1.0)
    found, fishers = to_cpu((found, fishers))
    assert found.item() == 1.0
    expect = torch.full((70000,), 3.0)   # 0.5 * 4 + 1 for good elements ...
    expect[[0, 40000, 69999]] = 4.0      # ... the skipped ones keep their old value, not even decayed
    torch.testing.assert_close(fishers[0], expect, rtol=0, atol=0)
    torch.testing.assert_close(fishers[1], torch.full((3,), 3.5), rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_opcheck(backend, device):
    gen = torch.Generator().manual_seed(3)
    fishers = to_dev(rand_list([17, (4, 9)], torch.float32, gen, positive=True), device)
    grads = to_dev(rand_list([17, (4, 9)], torch.float32, gen), device)
    with forgetkern.use_backend(backend):
        torch.library.opcheck(torch.ops.forgetkern.fisher_accumulate_.default, (fishers, grads, 0.9, 0.1))


def test_empty_list_returns_zero_flag():
    found = forgetkern.fisher_accumulate_([], [])
    assert found.item() == 0.0 and found.dtype == torch.float32


@pytest.mark.parametrize("make,match", [
    (lambda: ([torch.zeros(3)], [torch.zeros(3), torch.zeros(3)]), "grads has 2 tensors but fishers has 1"),
    (lambda: ([torch.zeros(3)], [torch.zeros(4)]), r"grads\[0\] has shape \(4,\)"),
    (lambda: ([torch.zeros(3, dtype=torch.float16)], [torch.zeros(3)]), r"fishers\[0\] has dtype torch.float16"),
    (lambda: ([torch.zeros(3)], [torch.zeros(3, dtype=torch.int32)]), r"grads\[0\] has dtype torch.int32"),
    (lambda: ([torch.zeros(3, 4)], [torch.zeros(4, 3).t()]), r"grads\[0\] is not contiguous"),
    (lambda: ([torch.zeros(3)], [torch.zeros(3, device="meta")]), r"grads\[0\] is on meta"),
    (lambda: (torch.zeros(3), [torch.zeros(3)]), "fishers must be a list or tuple of tensors"),
    (lambda: ([torch.zeros(3)], [3.0]), r"grads\[0\] must be a Tensor"),
])
def test_bad_inputs_name_the_argument(make, match):
    fishers, grads = make()
    with pytest.raises((TypeError, ValueError), match=match):
        forgetkern.fisher_accumulate_(fishers, grads)


def test_bad_scalars():
    with pytest.raises(ValueError, match="decay must be finite"):
        forgetkern.fisher_accumulate_([torch.zeros(1)], [torch.zeros(1)], decay=float("nan"))
    with pytest.raises(TypeError, match="scale must be a Python float"):
        forgetkern.fisher_accumulate_([torch.zeros(1)], [torch.zeros(1)], scale=torch.tensor(1.0))


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_overflowing_update_is_dropped_and_flagged(backend, device, state_dtype):
    # A finite fp32 gradient whose square overflows (1e20^2 = inf), and a sum that overflows only on the add:
    # neither may enter the Fisher; both keep their old value and raise the flag.
    fishers = [torch.full((9,), 2.0, dtype=state_dtype)]
    grads = [torch.ones(9)]
    grads[0][2] = 1e20
    grads[0][5] = 1.5e19  # g^2 = 2.25e38 fits float32; scale * g^2 = 4.5e38 does not
    fishers, grads = to_dev((fishers, grads), device)
    with forgetkern.use_backend(backend):
        found = forgetkern.fisher_accumulate_(fishers, grads, decay=1.0, scale=2.0)
    found, fishers = to_cpu((found, fishers))
    assert found.item() == 1.0
    expect = torch.full((9,), 4.0, dtype=state_dtype)
    expect[[2, 5]] = 2.0
    torch.testing.assert_close(fishers[0], expect, rtol=0, atol=0)
    penalty = forgetkern.ewc_penalty([torch.zeros(9)], [torch.zeros(9)], [fishers[0].float()], 1.0)
    assert torch.isfinite(penalty)


@pytest.mark.parametrize("kw,match", [
    ({"decay": -0.5}, "decay must be >= 0"), ({"scale": -1.0}, "scale must be >= 0"),
    ({"decay": float("inf")}, "decay must be finite"),
])
def test_negative_or_infinite_factors_are_refused(kw, match):
    f = torch.ones(3)
    with pytest.raises(ValueError, match=match):
        forgetkern.fisher_accumulate_([f], [torch.ones(3)], **kw)
    assert torch.equal(f, torch.ones(3))  # nothing written


def test_fisher_that_requires_grad_is_refused():
    with pytest.raises(ValueError, match=r"fishers\[0\] requires grad"):
        forgetkern.fisher_accumulate_([torch.zeros(3, requires_grad=True)], [torch.ones(3)])


@pytest.mark.parametrize("make,match", [
    (lambda f: ([f, f], [torch.ones(8), torch.ones(8)]), r"fishers\[0\] and fishers\[1\] share memory"),
    (lambda f: ([f[:6], f[2:]], [torch.ones(6), torch.ones(6)]), r"fishers\[0\] and fishers\[1\] share memory"),
    (lambda f: ([f], [f]), r"fishers\[0\] and grads\[0\] share memory"),
    (lambda f: ([f[:4]], [f[4:].clone()]), None),   # disjoint views of one storage are fine
])
def test_overlapping_state_is_refused(make, match):
    f = torch.ones(8)
    fishers, grads = make(f)
    if match is None:
        forgetkern.fisher_accumulate_(fishers, grads)
        return
    with pytest.raises(ValueError, match=match):
        forgetkern.fisher_accumulate_(fishers, grads)
    assert torch.equal(f, torch.ones(8))
