"""FisherEstimator on models patched by forgetkern.patch (the LoRA Fisher rides on the fused op's backward),
the LoraFisher option of lora_linear itself, and gradient checkpointing."""

import copy

import pytest
import torch

import forgetkern
from forgetkern import LoraAdapter, LoraFisher, lora_linear
from forgetkern.fisher import FisherEstimator
from forgetkern.fisher._capture import LoraTap
from forgetkern.reference.lora_linear import dropout_keys, dropped
from forgetkern.testing.models import tiny_llama
from tests.test_fisher import _assert_fisher_close, _batches, _per_sample_oracle

peft = pytest.importorskip("peft")


def _model(**cfg):
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False)
    kw.update(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw)).eval()


def _fused_calls(report) -> int:
    return sum(v for k, v in report.call_stats().items() if k.startswith("fused"))


def _peft_calls(report) -> int:
    return sum(v for k, v in report.call_stats().items() if k.startswith("PEFT"))


@pytest.mark.parametrize("granularity", ["sample", "token"])
@pytest.mark.parametrize("fuse_siblings", [True, False])
def test_patched_model_matches_unpatched(granularity, fuse_siblings):
    model = _model(lora_bias=True)
    batches = _batches()
    want = FisherEstimator(model, normalize="sample", params="lora", granularity=granularity).estimate(batches, progress=False)
    patched = copy.deepcopy(model)
    report = forgetkern.patch(patched, fuse_siblings=fuse_siblings)
    est = FisherEstimator(patched, normalize="sample", params="lora", granularity=granularity)
    assert est.layers and all(isinstance(layer, LoraTap) for layer in est.layers) and not est.fallback
    got = est.estimate(batches, progress=False)
    assert _fused_calls(report) > 0 and _peft_calls(report) == 0  # every call took the fused op
    assert any(".lora_B.default.bias" in k for k in got)
    _assert_fisher_close(got, {k: v.double() for k, v in want.items()}, rtol=1e-5)
    if granularity == "sample":
        _assert_fisher_close(got, _per_sample_oracle(patched, batches, list(got)))
    # the sinks are gone afterwards: training runs as before
    assert all(not m._forgetkern_state.fisher for m in patched.modules() if hasattr(m, "_forgetkern_state"))


def test_patched_base_weight_requested_goes_through_peft_path():
    """The fused op never computes a base weight gradient: asking for one keeps that layer on PEFT's path."""
    model = _model(target_modules=["q_proj", "v_proj"])
    forgetkern.patch(model)
    names = [n for n, _ in model.named_parameters() if "layers.0.self_attn.q_proj" in n]
    est = FisherEstimator(model, normalize="sample", params=names)
    assert not any(isinstance(layer, LoraTap) for layer in est.layers)
    batches = _batches(n_batches=1)
    _assert_fisher_close(est.estimate(batches, progress=False), _per_sample_oracle(model, batches, names))


def test_patched_call_on_peft_path_is_refused():
    """A call that cannot take the fused op would miss the Fisher: a clear error, never a silent zero."""
    model = _model(target_modules=["q_proj"])
    forgetkern.patch(model)
    for m in model.modules():
        if hasattr(m, "_forgetkern_state"):
            m.lora_A["default"].to(torch.float64)  # mixed dtypes: this call goes to PEFT's forward
    with pytest.raises(RuntimeError, match="unpatch"):
        FisherEstimator(model, normalize="sample", params="lora").estimate(_batches(n_batches=1), progress=False)
    assert all(not m._forgetkern_state.fisher for m in model.modules() if hasattr(m, "_forgetkern_state"))


@pytest.mark.parametrize("patched", [False, True])
def test_activation_checkpointing(patched):
    """Checkpointed decoder layers run twice per step (forward, then recomputed in the backward) but each
    module receives one output gradient: the same Fisher as without checkpointing."""
    import functools

    from torch.utils.checkpoint import checkpoint

    model = _model(target_modules=["q_proj", "v_proj", "down_proj"])
    batches = _batches()
    want = FisherEstimator(model, normalize="sample", params="lora").estimate(batches, progress=False)
    ckpt = copy.deepcopy(model)
    if patched:
        forgetkern.patch(ckpt)
    for layer in ckpt.base_model.model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    calls = []  # a pre-hook on the (patched) module itself keeps it fused: only inner-module hooks divert
    h = ckpt.base_model.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda *a: calls.append(1))

    def batch_fn(model, batch):  # no KV cache: the recomputation would append to it a second time
        logits = model(**batch, use_cache=False).logits
        return logits[:, :-1], batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)

    got = FisherEstimator(ckpt, normalize="sample", params="lora", batch_fn=batch_fn).estimate(batches, progress=False)
    h.remove()
    assert len(calls) == 2 * len(batches)  # every module really ran twice per batch
    _assert_fisher_close(got, {k: v.double() for k, v in want.items()}, rtol=1e-5)


def _layer(seed=0, m=(3, 5), k=12, n=10, r=4, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*m, k, generator=gen, dtype=dtype)
    w = torch.randn(n, k, generator=gen, dtype=dtype)
    a = torch.randn(r, k, generator=gen, dtype=dtype, requires_grad=True)
    b = torch.randn(n, r, generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(n, generator=gen, dtype=dtype, requires_grad=True)
    g = torch.randn(*m, n, generator=gen, dtype=dtype)
    return x, w, a, b, bias, g


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_fisher_option_is_per_sample_square(p):
    """The sink gets sum_n (d l_n / d theta)^2 of the adapter's own factors (dropout mask included)."""
    x, w, a, b, bias, g = _layer()
    s, seed = 1.5, 1234
    sink = LoraFisher(torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(bias), samples=3)
    y = lora_linear(x, w, None, [LoraAdapter(a, b, s, p, bias, sink)], training=True, seed=seed)
    y.backward(g)
    assert sink.grads == 1 and float(sink.found) == 0.0
    xd = dropped(x.reshape(-1, x.shape[-1]), dropout_keys(seed, 1)[0], p).view_as(x) if p else x
    for i, (t, f) in enumerate(((a, sink.fisher_a), (b, sink.fisher_b), (bias, sink.fisher_bias))):
        want = torch.zeros_like(t)
        for n in range(3):
            yn = (xd[n] @ a.t()) @ b.t() * s + s * bias
            want += torch.autograd.grad(yn, t, g[n])[0] ** 2
        torch.testing.assert_close(f, want, rtol=1e-12, atol=1e-12, msg=str(i))


def test_lora_linear_fisher_option_errors():
    x, w, a, b, bias, g = _layer()
    with pytest.raises(ValueError, match=r"adapters\[0\].fisher.fisher_b must be a Tensor of shape"):
        lora_linear(x, w, None, [LoraAdapter(a, b, 1.0, fisher=LoraFisher(fisher_b=torch.zeros(3)))],
                    training=False)
    with pytest.raises(TypeError, match="fisher must be a LoraFisher"):
        lora_linear(x, w, None, [LoraAdapter(a, b, 1.0, fisher=object())], training=False)
    with pytest.raises(ValueError, match="all None"):
        LoraFisher()
    sink = LoraFisher(torch.zeros_like(a), samples=7)  # x has 3 samples
    y = lora_linear(x, w, None, [LoraAdapter(a, b, 1.0, fisher=sink)], training=False)
    with pytest.raises(RuntimeError, match="number of samples 7"):
        y.backward(g)
    sink = LoraFisher(torch.zeros_like(a), samples=3)
    y1 = lora_linear(x, w, None, [LoraAdapter(a, b, 1.0, fisher=sink)], training=False)
    y2 = lora_linear(x, w, None, [LoraAdapter(a, b, 1.0, fisher=sink)], training=False)
    with pytest.raises(RuntimeError, match="second output gradient"):
        (y1 + y2).backward(g)


def test_patched_bf16_model_with_float32_adapters():
    """PEFT's layout for half models: the fused mixed-precision op feeds the sinks float32 gradients."""
    model = _model(target_modules=["q_proj", "v_proj", "up_proj"]).to(torch.bfloat16)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    batches = _batches(n_batches=1)
    want = FisherEstimator(model, normalize="sample", params="lora").estimate(batches, progress=False)
    patched = copy.deepcopy(model)
    report = forgetkern.patch(patched)
    got = FisherEstimator(patched, normalize="sample", params="lora").estimate(batches, progress=False)
    assert _fused_calls(report) > 0 and _peft_calls(report) == 0
    # same bf16 forward up to the rounding of the fused sum: a few bf16 ulps on the Fisher
    _assert_fisher_close(got, {k: v.double() for k, v in want.items()}, rtol=2e-2)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp", "triton")
                                     if forgetkern._backend.availability("cpu", "lora_linear")[b] is None])
def test_lora_linear_fisher_option_on_every_backend(backend):
    """The sink rides on the eager path (torch, cpp) and on the custom-op path (triton) alike (float32)."""
    x, w, a, b, bias, g = (t.float().detach().requires_grad_(t.requires_grad) for t in _layer(seed=3))
    want_a, want_b = torch.zeros_like(a), torch.zeros_like(b)
    forgetkern.lora_persample_sq_grad_(want_a, want_b, x, g, a, b, scaling=0.5)
    sink = LoraFisher(torch.zeros_like(a), torch.zeros_like(b), samples=3)
    with forgetkern.use_backend(backend, op="lora_linear"):
        lora_linear(x, w, None, [LoraAdapter(a, b, 0.5, fisher=sink)], training=False).backward(g)
    assert sink.grads == 1
    torch.testing.assert_close(sink.fisher_a, want_a, rtol=1e-5, atol=1e-6 * float(want_a.abs().max()))
    torch.testing.assert_close(sink.fisher_b, want_b, rtol=1e-5, atol=1e-6 * float(want_b.abs().max()))
