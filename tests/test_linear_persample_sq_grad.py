"""linear_persample_sq_grad_ / lora_persample_sq_grad_: every backend vs torch.func per-sample gradients."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.func import functional_call, grad, vmap

import forgetkern  # noqa: F401
from forgetkern.ops.linear_persample_sq_grad import (bias_persample_sq_grad_, linear_persample_sq_grad_,
                                                     lora_persample_sq_grad_)
from forgetkern.reference import linear_persample_sq_grad as ref
from tests._helpers import backend_devices, to_dev

NO_CPP = "no C++ CPU kernel for this op: the chunked PyTorch path (GEMMs in MKL/oneDNN) is the CPU path"


def backends():
    """(backend, device) pairs of this op: every concrete backend but ``cpp`` (skipped with the reason)."""
    return [pytest.param("cpp", "cpu", marks=pytest.mark.skip(reason=NO_CPP), id="cpp") if p.id == "cpp" else p
            for p in backend_devices()]

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _problem(n, t, d_in, d_out, dtype, seed=0, padded=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d_in, generator=gen).to(dtype)
    w = torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5
    c = torch.randn(n, t, d_out, generator=gen)
    mask = None
    if padded:  # right padding of varying length; sample 0 full, one sample with a single token
        lengths = torch.tensor([t] + [max(1, t - 2 * i) for i in range(1, n)])
        mask = torch.arange(t)[None, :] < lengths[:, None]
    return x, w, c, mask


def _vmap_oracle(x, c, mask, granularity):
    """Sum of squared per-sample (or per-token) gradients of W for l_n = sum_t m_nt <c_nt, x_nt W^T>, by
    torch.func.vmap in float64 on the (already rounded) inputs. dL/dy = m * c exactly, so c is grad_out."""
    x64, c64 = x.double(), c.double()
    m = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
    lin = torch.nn.Linear(x.shape[-1], c.shape[-1], bias=False).double()
    params = {"weight": torch.randn(c.shape[-1], x.shape[-1], dtype=torch.float64)}

    def sample_loss(p, xn, cn, mn):
        return ((functional_call(lin, p, (xn,)) * cn).sum(-1) * mn).sum()

    if granularity == "token":  # every token its own sample
        x64, c64, m = x64.reshape(-1, 1, x.shape[-1]), c64.reshape(-1, 1, c.shape[-1]), m.reshape(-1, 1)
    per = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))(params, x64, c64, m.double())["weight"]
    return (per * per).sum(0)


def _mag(x, g, mask):
    """Magnitude of the summed terms: sum_n (sum_t |g||x|)^2 (for rounding bounds)."""
    m = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
    a = torch.einsum("nto,nti->noi", g.double().abs() * m[..., None], x.double().abs())
    return (a * a).sum(0)


def _run(backend, device, fisher, x, g, **kw):
    """The op on ``device`` copies of the inputs; the result written back into the CPU ``fisher``."""
    f_dev, x, g = to_dev((fisher, x, g), device)
    kw = {k: to_dev(v, device) for k, v in kw.items()}
    with forgetkern.use_backend(backend):
        found = linear_persample_sq_grad_(f_dev, x, g, **kw)
    if f_dev is not fisher:
        fisher.copy_(f_dev.cpu())
    return found.cpu()


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("dtype", list(DT), ids=str)
@pytest.mark.parametrize("granularity", ["sample", "token"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_matches_vmap(backend, device, dtype, granularity, padded):
    x, _, c, mask = _problem(3, 9, 20, 12, DT[dtype], padded=padded)
    c = c.to(DT[dtype])
    want = _vmap_oracle(x, c, mask, granularity)
    fisher = torch.full((12, 20), 0.5)
    found = _run(backend, device, fisher, x, c, scale=0.25, mask=mask, granularity=granularity)
    assert found.dtype == torch.float32 and found.dim() == 0 and found.item() == 0.0
    mag = _mag(x, c, mask) if granularity == "sample" else want
    err = (fisher.double() - (0.5 + 0.25 * want)).abs()
    assert (err <= 2e-6 * (0.25 * mag + 0.5)).all(), float(err.max())


def _oracle_from_g(x, g, mask):
    m = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
    per = torch.einsum("nto,nti->noi", g.double() * m[..., None], x.double())
    return (per * per).sum(0)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("state", [torch.bfloat16, torch.float32])
def test_state_dtypes_and_odd_tiles(backend, device, state):
    """Several output/input tiles, T not a multiple of the token block, bf16 state rounded once."""
    x, w, c, mask = _problem(5, 21, 70, 40, torch.bfloat16, seed=3)
    g = torch.randn(5, 21, 40, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    want = _oracle_from_g(x, g.double(), mask)
    fisher = torch.ones(40, 70, dtype=state)
    _run(backend, device, fisher, x, g, mask=mask, scale=0.1)
    exp = 1.0 + 0.1 * want
    rtol = 2.0 ** -7 if state == torch.bfloat16 else 1e-5
    torch.testing.assert_close(fisher.double(), exp, rtol=rtol, atol=0)


@pytest.mark.parametrize("backend,device", backends())
def test_two_dim_inputs_sample_equals_token(backend, device):
    gen = torch.Generator().manual_seed(5)
    x, g = torch.randn(6, 11, generator=gen), torch.randn(6, 7, generator=gen)
    a, b = torch.zeros(7, 11), torch.zeros(7, 11)
    _run(backend, device, a, x, g)
    _run(backend, device, b, x, g, granularity="token")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.double(), (g.double() ** 2).t() @ x.double() ** 2, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend,device", backends())
def test_fp16_extremes_do_not_overflow(backend, device):
    x = torch.full((2, 3, 4), 60000.0, dtype=torch.float16)
    g = torch.full((2, 3, 5), -65504.0, dtype=torch.float16)
    fisher = torch.zeros(5, 4)
    found = _run(backend, device, fisher, x, g)
    assert found.item() == 0.0 and torch.isfinite(fisher).all()
    per = 3 * 60000.0 * 65504.0
    torch.testing.assert_close(fisher.double(), torch.full((5, 4), 2 * per * per, dtype=torch.float64),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("granularity", ["sample", "token"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_contributions_dropped_and_flagged(backend, device, granularity, bad):
    gen = torch.Generator().manual_seed(6)
    x, g = torch.randn(3, 4, 6, generator=gen), torch.randn(3, 4, 5, generator=gen)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    g_bad = g.clone()
    g_bad[1, 2, 3] = bad       # poisons row 3 of sample 1's contribution
    g_bad[2, 3, :] = bad       # a masked token: never read, never counted
    x_bad = x.clone()
    x_bad[2, 3, :] = float("nan")
    fisher = torch.zeros(5, 6)
    found = _run(backend, device, fisher, x_bad, g_bad, mask=mask, granularity=granularity)
    assert found.item() == 1.0
    keep = torch.ones(3, 5, 6, dtype=torch.bool)
    keep[1, 3, :] = False
    m = mask[..., None].double()
    if granularity == "sample":
        per = torch.einsum("nto,nti->noi", g.double() * m, x.double()) ** 2
    else:
        per = torch.einsum("nto,nti->noi", g.double() ** 2 * m, x.double() ** 2)
    want = (per * keep).sum(0)
    assert torch.isfinite(fisher).all()
    torch.testing.assert_close(fisher.double(), want, rtol=1e-5, atol=1e-6)


def test_reference_chunking_is_invisible():
    """Tiny chunk budgets (token blocks, several samples per chunk) give the same numbers."""
    x, w, c, mask = _problem(6, 13, 9, 7, torch.bfloat16, seed=7)
    g = torch.randn(6, 13, 7, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    for token in (False, True):
        outs = []
        for cb in (None, 64, 7 * 9 * 4 * 3, 10 ** 6):
            f = torch.zeros(7, 9)
            ref.linear_persample_sq_grad_(f, x, g, mask, 1.0, token, chunk_bytes=cb)
            outs.append(f)
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=0)


def test_bias_matches_vmap():
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    f = torch.zeros(5, dtype=torch.float64)
    bias_persample_sq_grad_(f, g, mask=mask)
    torch.testing.assert_close(f, ((g * mask[..., None]).sum(1) ** 2).sum(0))
    f.zero_()
    bias_persample_sq_grad_(f, g, mask=mask, granularity="token")
    torch.testing.assert_close(f, (g ** 2 * mask[..., None]).sum((0, 1)))


@pytest.mark.parametrize("backend,device", backends())
def test_opcheck(backend, device):
    gen = torch.Generator().manual_seed(10)
    args = to_dev((torch.zeros(3, 4), torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 3, generator=gen),
                   torch.ones(2, 5, dtype=torch.bool), 0.5, False), device)
    with forgetkern.use_backend(backend):
        torch.library.opcheck(torch.ops.forgetkern.linear_persample_sq_grad_.default, args)


@pytest.mark.parametrize("make,match", [
    (lambda: (torch.zeros(3, 4), torch.zeros(2, 5, 4), torch.zeros(2, 6, 3)), r"\[N, T\] leading"),
    (lambda: (torch.zeros(4, 3), torch.zeros(2, 5, 4), torch.zeros(2, 5, 3)), r"fisher has shape \(4, 3\)"),
    (lambda: (torch.zeros(3, 4, dtype=torch.float16), torch.zeros(2, 4), torch.zeros(2, 3)), "float16 state"),
    (lambda: (torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(2, 3).half()), "grad_out has torch.float16"),
    (lambda: (torch.zeros(4, 3).t(), torch.zeros(2, 4), torch.zeros(2, 3)), "fisher is not contiguous"),
    (lambda: (torch.zeros(3, 4), torch.zeros(2, 1, 1, 4), torch.zeros(2, 3)), r"x must be \[N, T, features\]"),
])
def test_bad_inputs_name_the_argument(make, match):
    f, x, g = make()
    with pytest.raises((TypeError, ValueError), match=match):
        linear_persample_sq_grad_(f, x, g)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\)"):
        linear_persample_sq_grad_(torch.zeros(3, 4), torch.zeros(2, 5, 4), torch.zeros(2, 5, 3),
                                  mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="granularity must be one of"):
        linear_persample_sq_grad_(torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(2, 3), granularity="batch")


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("dtype", ["fp32", "bf16"], ids=str)
@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_lora_factors_match_vmap(backend, device, dtype, granularity):
    """dA_n, dB_n of y = x W^T + s (x A^T) B^T against torch.func per-sample (per-token) gradients."""
    gen = torch.Generator().manual_seed(11)
    n, t, d_in, d_out, r, s = 3, 8, 24, 20, 4, 2.0
    x = torch.randn(n, t, d_in, generator=gen).to(DT[dtype])
    c = torch.randn(n, t, d_out, generator=gen).to(DT[dtype])
    a = (torch.randn(r, d_in, generator=gen) / 5).to(DT[dtype])
    b = torch.randn(d_out, r, generator=gen).to(DT[dtype])
    mask = torch.arange(t)[None, :] < torch.tensor([t, 5, 1])[:, None]
    # the op sees U = x A^T rounded to the input dtype, as the LoRA forward computes it
    u = (x @ a.t()).double()

    def sample_loss(p, xn, un, cn, mn):
        # value s (x A^T) B^T; d/dB through the rounded U, d/dA through x (the last two terms cancel in value)
        b64 = b.double().t()
        y = s * (un @ p["b"].t()) + s * ((xn @ p["a"].t()) @ b64) - s * ((xn @ a.double().t()) @ b64)
        return ((y * cn).sum(-1) * mn).sum()

    params = {"a": a.double(), "b": b.double()}
    args = [x.double(), u, c.double(), mask.double()]
    if granularity == "token":
        args = [z.reshape(n * t, 1, -1) for z in args[:3]] + [mask.reshape(-1, 1).double()]
    per = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0, 0))(params, *args)
    want_a, want_b = (per["a"] ** 2).sum(0), (per["b"] ** 2).sum(0)
    fa, fb, x, c, a, b, mask = to_dev((torch.zeros(r, d_in), torch.zeros(d_out, r), x, c, a, b, mask), device)
    with forgetkern.use_backend(backend):
        found = lora_persample_sq_grad_(fa, fb, x, c, a, b, scaling=s, mask=mask, granularity=granularity)
    assert found.item() == 0.0
    fa, fb = fa.cpu(), fb.cpu()
    rtol = 1e-5 if dtype == "fp32" else 2.0 ** -6   # bf16: V = g B is rounded to bf16 like the LoRA backward
    torch.testing.assert_close(fb.double(), want_b, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(fa.double(), want_a, rtol=rtol, atol=1e-6 * float(want_a.max()))


@pytest.mark.parametrize("backend,device", [p for p in backends() if p.values[0] == "triton"])
@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_triton_split_over_samples_and_aligned_path(backend, device, granularity):
    """Split-N workspace + fixed-order finish kernel, on shapes that take the vectorised (VEC=8) path."""
    from forgetkern.triton import linear_persample_sq_grad as tri

    gen = torch.Generator().manual_seed(12)
    x = torch.randn(5, 10, 48, generator=gen).to(torch.bfloat16)
    g = torch.randn(5, 10, 40, generator=gen).to(torch.bfloat16)
    mask = torch.rand(5, 10, generator=gen) > 0.2
    assert tri._aligned(x, g)
    want = torch.ones(40, 48)
    ref.linear_persample_sq_grad_(want, x, g, mask, 0.5, granularity == "token")
    x, g, mask = to_dev((x, g, mask), device)
    for splits in (1, 2, 5):
        f = torch.ones(40, 48, device=device)
        found = tri.linear_persample_sq_grad_(f, x, g, mask, 0.5, granularity == "token", splits=splits)
        assert found.item() == 0.0
        torch.testing.assert_close(f.cpu(), want, rtol=2e-6, atol=0)


_MEM_PROBE = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
from forgetkern.ops.linear_persample_sq_grad import linear_persample_sq_grad_

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

def run(mode, f, x, g, mask):
    if mode == "fused":
        linear_persample_sq_grad_(f, x, g, mask=mask)
    else:  # what per-sample-gradient libraries do: materialise [N, out, in]
        per = torch.einsum("nto,nti->noi", g.float() * mask[..., None], x.float())
        f.add_((per * per).sum(0))

t, d = 64, 512
out = []
for case in sys.argv[1:]:  # "mode:n:dtype"; the inputs are freed (mmap'ed, back to the OS) between cases
    mode, n, dt = case.split(":")
    n, dt = int(n), getattr(torch, dt)
    x, g = torch.randn(n, t, d).to(dt), torch.randn(n, t, d).to(dt)
    mask = torch.rand(n, t) > 0.1
    f = torch.zeros(d, d)
    run(mode, f, x[:1], g[:1], mask[:1])  # warm up (library workspaces)
    base = rss()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak-RSS counter
    run(mode, f, x, g, mask)
    out.append((peak() - base) / (d * d * 4))
    del x, g, mask, f
print(json.dumps(out))
"""


def _peak_extra(cases):
    """Peak extra RSS of each ``(mode, n, dtype)`` case, in units of the fp32 weight, measured one after the
    other in ONE child process (the peak counter is reset before each)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", _MEM_PROBE, *(f"{m}:{n}:{dt}" for m, n, dt in cases)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return dict(zip(cases, json.loads(res.stdout.strip().splitlines()[-1])))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_peak_memory_fused_is_bounded_naive_grows_with_n():
    """Peak extra memory (RSS high-water mark, large allocations mmap'ed) in units of the fp32 weight size."""
    cases = [("naive", n, "float32") for n in (4, 16)] + [("fused", n, dt) for n in (4, 16)
                                                          for dt in ("float32", "bfloat16")]
    ratios = _peak_extra(cases)
    for key, ratio in ratios.items():
        if key[0] == "fused":
            assert ratio <= 2.0, (key, ratio)
    assert ratios[("naive", 4, "float32")] >= 4.0 and ratios[("naive", 16, "float32")] >= 16.0, ratios


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_overflowing_sum_keeps_the_old_value_and_flags(backend, device, granularity):
    # Every contribution is finite (1.5e38 each), but their sum over three samples overflows float32: those
    # elements keep their old value and raise the flag; the others are updated.
    x = torch.ones(3, 1, 3)
    g = torch.full((3, 1, 2), 1.5e38 ** 0.5)   # per sample: g x = 1.22e19, squared 1.5e38
    g[:, :, 1] = 1.0
    fisher = torch.ones(2, 3)
    found = _run(backend, device, fisher, x, g, granularity=granularity)
    assert found.item() == 1.0
    torch.testing.assert_close(fisher[0], torch.ones(3), rtol=0, atol=0)       # row 0: the sum overflowed
    torch.testing.assert_close(fisher[1], torch.full((3,), 4.0), rtol=0, atol=0)  # row 1: 1 + 3 * 1


def test_negative_scale_is_refused():
    with pytest.raises(ValueError, match="scale must be >= 0"):
        linear_persample_sq_grad_(torch.zeros(2, 3), torch.ones(1, 1, 3), torch.ones(1, 1, 2), scale=-1.0)


@pytest.mark.parametrize("change,match", [
    ({"lora_a": torch.zeros(4, 5)}, r"lora_a has shape \(4, 5\), expected \[r, in\] with in = 6"),
    ({"lora_b": torch.zeros(3, 4)}, r"lora_b has shape \(3, 4\), expected \[out, r\] = \(5, 4\)"),
    ({"lora_a": torch.zeros(4, 6, dtype=torch.int64)}, r"lora_a has dtype torch.int64; expected a float"),
    ({"lora_b": torch.zeros(5, 4, dtype=torch.int32)}, r"lora_b has dtype torch.int32; expected a float"),
    ({"lora_a": torch.zeros(4, 6, 1)}, r"lora_a must be 2-D"),
    ({"xa": torch.zeros(2, 3, 7)}, r"xa must be a \[N, T, r\] tensor with r = 4"),
    ({"scale": -2.0}, "scale must be >= 0"),
])
def test_lora_bad_factors_name_the_argument(change, match):
    kw = dict(x=torch.randn(2, 3, 6), grad_out=torch.randn(2, 3, 5), lora_a=torch.randn(4, 6),
              lora_b=torch.randn(5, 4), scaling=2.0)
    kw.update(change)
    fa, fb = torch.zeros(4, 6), torch.zeros(5, 4)
    with pytest.raises((TypeError, ValueError), match=match):
        lora_persample_sq_grad_(fa, fb, **kw)
    assert not fa.any() and not fb.any()
