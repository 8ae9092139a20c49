"""lora_linear's eager path (a plain autograd.Function, torch and cpp backends) against the torch.library custom
ops, and the int32, row-blocked CPU dropout mask against the hash's int64 definition."""

import random

import pytest
import torch

import forgetkern
from forgetkern.ops import lora_linear as ops
from forgetkern.reference import lora_linear as ref
from tests._helpers import backends
from tests.test_lora_linear import BF16, F16, F32, _leaves, _make, _run_case

_EAGER = ops.eager
EAGER_BACKENDS = [b for b in backends() if b.values[0] in ("torch", "cpp")]
CASE = ((3, 37), 45, 29, [(5, 0.5, 0.3, True), (20, 2.0, 0.0, False), (4, 1.0, 0.1, False)], True, True)


def test_keep_mask_matches_int64_definition():
    rnd = random.Random(0)
    for _ in range(40):
        key, p = rnd.getrandbits(32), rnd.choice([0.0, 0.05, 0.1, 0.5, 0.999, 1.0, rnd.random()])
        rows, cols = rnd.randint(1, 300), rnd.randint(1, 700)
        row0 = rnd.choice([0, rnd.getrandbits(31), 2 ** 32 - 5, rnd.getrandbits(40)])
        assert torch.equal(ref.keep_mask(key, p, rows, cols, row0=row0),
                           ref.keep_mask_int64(key, p, rows, cols, row0=row0)), (key, p, rows, cols, row0)


@pytest.mark.parametrize("chunk", [1, 100, 1 << 16])
def test_blocked_mask_apply_is_exact(monkeypatch, chunk):
    monkeypatch.setattr(ref, "_CHUNK", chunk)
    x = torch.randn(67, 45)
    mk = ref._Masker(1234, 0.3, x)
    blocks = ref._blocks(x)
    assert blocks[0][0] == 0 and blocks[-1][1] == 67 and (len(blocks) > 1) == (chunk < 67 * 45)
    got = torch.cat([mk.apply(x[r0:r1], mk.block(r0, r1)) for r0, r1 in blocks])
    assert torch.equal(got, x * ref.keep_mask_int64(1234, 0.3, 67, 45).to(x.dtype) * ref.keep_scale(0.3))


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("n_layers", [1, 2])
def test_blocked_dropout_matches_oracle(monkeypatch, backend, dtype, n_layers):
    monkeypatch.setattr(ref, "_CHUNK", 200)  # several row blocks per call
    lead, k_in, n_out, ads, bias, training = CASE
    _run_case(backend, "cpu", dtype, lead, k_in, n_out, ads, bias, training, n_layers=n_layers)


def _run(x, layers, eager: bool, monkeypatch, backend):
    monkeypatch.setattr(ops, "eager", _EAGER if eager else (lambda ts: False))
    for v in _leaves(x, layers):
        v.grad = None
    with forgetkern.use_backend(backend):
        ys = ops.lora_linear_siblings(x, [w for w, _, _ in layers], [b for _, b, _ in layers],
                                      [a for _, _, a in layers], training=True, seed=5)
    names = {type(y.grad_fn.next_functions[0][0]).__name__ for y in ys}  # under the [..., out] view
    sum((y * (i + 1.5)).sum() for i, y in enumerate(ys)).backward()
    return [y.detach() for y in ys] + [v.grad.clone() for v in _leaves(x, layers)], names


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_eager_path_matches_custom_op(monkeypatch, backend):
    lead, k_in, n_out, ads, bias, _ = CASE
    x, layers = _make(lead, k_in, n_out, ads, bias, F32, n_layers=3)
    want, via_op = _run(x, layers, False, monkeypatch, backend)
    got, via_fn = _run(x, layers, True, monkeypatch, backend)
    assert via_fn == {"EagerFnBackward"} and "EagerFnBackward" not in via_op
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_eager_path_not_taken_when_tracing():
    x, layers = _make((6,), 16, 12, [(4, 0.5, 0.2, True)], True, F32)
    w, b, ads = layers[0]
    gm = torch.fx.experimental.proxy_tensor.make_fx(
        lambda xv: ops.lora_linear(xv, w, b, ads, training=True, seed=3))(x.detach())
    assert "lora_linear_fwd" in str(gm.graph)


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_transposed_weight_view_is_not_copied(backend):
    """GPT-2 Conv1D keeps W as [in, out]: the eager torch / cpp path uses the W^T view as it is."""
    x, layers = _make((9,), 16, 12, [(4, 0.5, 0.2, True)], True, F32)
    w, b, ads = layers[0]
    w_io = w.detach().t().contiguous()  # [in, out] storage
    saved = []
    with forgetkern.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        y = ops.lora_linear(x, w_io.t(), b, ads, training=True, seed=1)
    assert any(t.data_ptr() == w_io.data_ptr() for t in saved)
    gx = torch.autograd.grad(y.sum(), x)[0]
    with forgetkern.use_backend(backend):
        y2 = ops.lora_linear(x, w.detach(), b, ads, training=True, seed=1)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, torch.autograd.grad(y2.sum(), x)[0])
