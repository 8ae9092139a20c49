"""forgetkern.patch against the real PEFT lora.Linear, feature by feature, on tiny random Llama and GPT-2 models:
forward, loss and every gradient (lora A/B, trainable biases, input) compared with PEFT on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests._patch_helpers import (EPS, assert_like_peft, assert_same, calls, fp64_reference, ids, lora_model,
                                  peft, run, twins)

import forgetkern
from forgetkern.patching import PatchReport, is_patched, patch, unpatch
from forgetkern.patching import lora as fk_lora


def check_vs_peft(model, *, dtype=torch.float32, tokens=None, train=True, fused_min=1, setup=None, **kw):
    """Patched vs unpatched copies of ``model`` (``setup`` applied to both), earned tolerance vs fp64."""
    tokens = ids() if tokens is None else tokens
    pf, fk = twins(model)
    report = patch(fk)
    for m in (pf, fk, model):
        if setup is not None:
            setup(m)
    got, want = run(fk, tokens, train=train, **kw), run(pf, tokens, train=train, **kw)
    ref = fp64_reference(model, tokens, train=train, **kw)
    assert_like_peft(got, want, ref, dtype)
    assert calls(report, "fused") >= fused_min, report.call_stats()
    return report, got, want


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_and_all_gradients_match_peft(kind):
    report, got, want = check_vs_peft(lora_model(kind))
    assert not report.skipped and not any(k.startswith("PEFT") for k in report.call_stats())
    if kind == "gpt2":  # Conv1D bases: fan_in_fan_out, weight stored [in, out]
        assert report.patched and all("c_" in n for n in report.patched)
    n_lora = sum(1 for k in got if "lora_" in k)
    assert n_lora == 2 * len(report.patched)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_half_precision_earned_tolerance(kind, dtype):
    check_vs_peft(lora_model(kind, dtype=dtype), dtype=dtype)


def test_autocast_bf16():
    model = lora_model("llama")
    pf, fk = twins(model)
    report = patch(fk)
    tokens = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = run(fk, tokens), run(pf, tokens)
    assert got["logits"].dtype == want["logits"].dtype == torch.bfloat16
    assert_like_peft(got, want, fp64_reference(model, tokens), torch.bfloat16)
    assert calls(report, "fused") > 0 and calls(report, "PEFT") == 0


def _adapters_to(model, dtype):
    for m in model.modules():
        if isinstance(m, peft.tuners.lora.layer.Linear):
            m.lora_A.to(dtype), m.lora_B.to(dtype)
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_float32_adapters_on_half_model_fused(kind, dtype):
    """PEFT's default for half models keeps the adapters in float32 (autocast_adapter_dtype): fused, with PEFT's
    numerics (base in 16 bits, the LoRA branch in float32, one rounding of the sum), lora_bias included."""
    model = _adapters_to(lora_model(kind, dtype=dtype, lora_bias=True), torch.float32)
    report, got, want = check_vs_peft(model, dtype=dtype)
    assert calls(report, "PEFT") == 0
    assert got["logits"].dtype == dtype
    assert all(got[k].dtype == torch.float32 for k in got if "lora_" in k)


def test_float32_adapters_on_half_model_train_dropout():
    model = _adapters_to(lora_model("llama", dtype=torch.bfloat16, lora_dropout=0.1), torch.float32)
    pf, fk = twins(model)
    report = patch(fk)
    torch.manual_seed(3)
    got = run(fk, ids())
    assert calls(report, "fused") > 0 and calls(report, "PEFT") == 0
    assert torch.isfinite(got["loss"]) and all(torch.isfinite(v).all() for v in got.values())


def test_other_dtype_mixes_go_to_peft_exactly():
    model = _adapters_to(lora_model("llama"), torch.float64)  # float64 adapters on a float32 model
    pf, fk = twins(model)
    report = patch(fk)
    assert_same(run(fk, ids()), run(pf, ids()))
    assert calls(report, "PEFT: mixed dtypes") > 0 and calls(report, "fused") == 0


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_rslora_and_runtime_scale_changes(rslora):
    model = lora_model("llama", r=16, lora_alpha=8, use_rslora=rslora)
    pf, fk = twins(model)
    patch(fk)
    tokens = ids()
    layer = next(m for m in fk.modules() if isinstance(m, peft.tuners.lora.layer.Linear))
    expect = 8 / (16 ** 0.5 if rslora else 16)
    assert layer.scaling["default"] == pytest.approx(expect)
    steps = [lambda l: l.set_scale("default", 3.0), lambda l: l.scale_layer(0.5), lambda l: l.unscale_layer(4.0),
             lambda l: l.unscale_layer(None)]
    for step in steps:
        for m in (pf, fk, model):
            for mod in m.modules():
                if isinstance(mod, peft.tuners.lora.layer.Linear):
                    step(mod)
        assert_like_peft(run(fk, tokens), run(pf, tokens), fp64_reference(model, tokens), torch.float32)
    assert layer.scaling["default"] == pytest.approx(expect)


def test_dropout_eval_is_exact_and_train_runs_fused():
    model = lora_model("llama", lora_dropout=0.1)
    report, _, _ = check_vs_peft(model, train=False)
    assert calls(report, "fused") > 0
    fk = copy.deepcopy(model)
    rep = patch(fk)
    torch.manual_seed(5)
    a = run(fk, ids())
    torch.manual_seed(5)
    b = run(fk, ids())
    assert_same(a, b)  # the masks follow torch.manual_seed
    c = run(fk, ids())
    assert not torch.equal(a["loss"], c["loss"])
    assert calls(rep, "fused (siblings)") == 0  # dropout active: each layer draws its own mask


def _probe_layer(p: float, n_in: int = 32, dtype=torch.float32):
    """A lora.Linear with W = 0, b = 0, A = B = I, scaling 1: its output is drop(x) itself."""
    base = nn.Linear(n_in, n_in, bias=False)
    holder = nn.Sequential()
    holder.add_module("proj", base)
    cfg = peft.LoraConfig(r=n_in, lora_alpha=n_in, lora_dropout=p, target_modules=["proj"])
    m = peft.get_peft_model(holder, cfg)
    layer = m.base_model.model.proj
    with torch.no_grad():
        base.weight.zero_()
        layer.lora_A["default"].weight.copy_(torch.eye(n_in))
        layer.lora_B["default"].weight.copy_(torch.eye(n_in))
    return m.to(dtype).train(), layer


def test_dropout_keep_rate_and_backward_consistent_with_forward():
    p = 0.1
    m, layer = _probe_layer(p)
    patch(m)
    x = torch.ones(2048, 32, requires_grad=True)
    y = layer(x)  # = mask / (1 - p)
    vals = torch.unique(y.detach()).tolist()
    assert len(vals) == 2 and vals[0] == 0.0 and vals[1] == pytest.approx(1 / (1 - p))
    keep = (y != 0).double().mean().item()
    sigma = (p * (1 - p) / y.numel()) ** 0.5
    assert abs(keep - (1 - p)) < 5 * sigma, keep
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(dx, y.detach())  # backward regenerated exactly the forward's mask
    # PEFT's own keep rate on the same probe, for comparison
    m2, layer2 = _probe_layer(p)
    y2 = layer2(torch.ones(2048, 32))
    assert abs((y2 != 0).double().mean().item() - keep) < 10 * sigma


def test_dropout_gradient_of_adapter_consistent():
    m, layer = _probe_layer(0.25, n_in=16)
    patch(m)
    x = torch.randn(512, 16)
    torch.manual_seed(3)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    dropped = y.detach()  # = drop(x) since W = 0 and A = B = I
    d_a = layer.lora_A["default"].weight.grad
    d_b = layer.lora_B["default"].weight.grad
    xa = dropped  # A = I
    torch.testing.assert_close(d_b, g.t() @ xa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_a, g.t() @ dropped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", ["none", "all"])
def test_base_bias_and_trainable_bias(bias):
    model = lora_model("llama", base_kw=dict(attention_bias=True, mlp_bias=True), bias=bias)
    report, got, _ = check_vs_peft(model)
    if bias == "all":
        assert any(k.endswith("base_layer.bias") for k in got)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_bias(kind):
    kw = dict(base_kw=dict(attention_bias=True, mlp_bias=True)) if kind == "llama" else {}
    model = lora_model(kind, lora_bias=True, **kw)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
    _, got, _ = check_vs_peft(model)
    assert any("lora_B" in k and k.endswith("bias") for k in got)


def test_several_active_adapters_summed():
    model = lora_model("llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model.add_adapter("second", peft.LoraConfig(r=12, lora_alpha=6, target_modules=["q_proj", "down_proj"],
                                                    init_lora_weights=False, use_rslora=True))

    def both(m):
        m.base_model.set_adapter(["default", "second"])

    report, got, _ = check_vs_peft(model, setup=both)
    assert any(".second." in k for k in got) and any(".default." in k for k in got)


def test_disabled_adapters_and_merged_weights_give_peft_output():
    model = lora_model("llama")
    pf, fk = twins(model)
    report = patch(fk)
    tokens = ids()
    with fk.disable_adapter(), pf.disable_adapter():
        assert_same(run(fk, tokens), run(pf, tokens))
    assert calls(report, "PEFT: adapters disabled") > 0
    for m in (pf, fk):
        m.merge_adapter()
    a, b = run(fk, tokens, train=False), run(pf, tokens, train=False)
    assert_same({"logits": a["logits"]}, {"logits": b["logits"]})
    assert calls(report, "PEFT: adapter weights merged") > 0
    for m in (pf, fk):
        m.unmerge_adapter()
    before = calls(report, "fused")
    assert_like_peft(run(fk, tokens), run(pf, tokens), fp64_reference(model, tokens), torch.float32)
    assert calls(report, "fused") > before


def test_adapter_names_mixed_batch_delegates_to_peft():
    model = lora_model("llama")
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    pf, fk = twins(model)
    report = patch(fk)
    tokens = ids(batch=3)
    pf.eval(), fk.eval()
    names = ["default", "__base__", "other"]
    with torch.no_grad():
        a = fk(input_ids=tokens, adapter_names=names).logits
        b = pf(input_ids=tokens, adapter_names=names).logits
    assert torch.equal(a, b)
    assert calls(report, "PEFT: forward arguments") > 0


def test_unpatch_restores_bit_for_bit():
    model = lora_model("llama", lora_dropout=0.1)
    never = copy.deepcopy(model)
    dict_before = {n: dict(m.__dict__) for n, m in model.named_modules()}
    report = patch(model)
    assert is_patched(model)
    run(model, ids())
    assert unpatch(model) == len(report.patched)
    assert not is_patched(model)
    for n, m in model.named_modules():
        assert m.__dict__.keys() == dict_before[n].keys(), n
        assert m._forward_hooks.keys() == dict_before[n]["_forward_hooks"].keys(), n
    torch.manual_seed(11)
    a = run(model, ids())
    torch.manual_seed(11)
    b = run(never, ids())
    assert_same(a, b)


def test_patch_twice_is_noop_and_print_shows_patched():
    model = lora_model("llama")
    first = patch(model)
    second = patch(model)
    assert second.patched == [] and sorted(second.already_patched) == sorted(first.patched)
    assert second.fused_groups == first.fused_groups
    run(model, ids())
    assert calls(first, "fused") == len(first.patched)  # each layer ran once: no double wrapping
    text = str(model)
    layers = [m for m in model.modules() if fk_lora.STATE_ATTR in m.__dict__]
    assert len(layers) == len(first.patched) and all("forgetkern=patched(auto" in repr(m) for m in layers)
    assert "siblings=q_proj+k_proj+v_proj" in text and "siblings=gate_proj+up_proj" in text
    unpatch(model)
    assert "forgetkern" not in str(model)


def test_report_contents_and_unsupported_layers():
    model = lora_model("llama", target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"])
    model.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["down_proj"], use_dora=True))
    report = patch(model)
    assert isinstance(report, PatchReport)
    assert len(report.patched) == 6 and all(n.endswith(("q_proj", "v_proj", "up_proj")) for n in report.patched)
    reasons = report.skipped
    assert any("embed_tokens" in n and "not supported" in r for n, r in reasons.items())
    assert any("down_proj" in n and "DoRA" in r for n, r in reasons.items())
    assert [len(g) for g in report.fused_groups] == [2, 2]  # q+v per attention; up alone in the MLP
    text = str(report)
    assert "left on PEFT" in text and "DoRA" in text and "fused siblings" in text
    unpatch(model)


def test_dora_and_embedding_models_stay_exact():
    model = lora_model("llama", use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"])
    pf, fk = twins(model)
    report = patch(fk)
    assert not report.patched and len(report.skipped) == 5
    assert_same(run(fk, ids()), run(pf, ids()))


def test_siblings_fused_and_self_disable_on_other_inputs():
    model = lora_model("llama")
    report, _, _ = check_vs_peft(model, train=False)

    class TwoInputs(nn.Module):  # a parent that feeds its q/k siblings different tensors
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(16, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.q_proj(x).sum() + self.k_proj(x * 2).sum()

    holder = nn.Sequential()
    holder.add_module("attn", TwoInputs())
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    m = peft.get_peft_model(holder, cfg)
    ref = copy.deepcopy(m)
    rep = patch(m)
    assert len(rep.fused_groups) == 1
    x = torch.randn(4, 16)
    for _ in range(3):
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert rep.active_groups() == []  # two misses: the group turned itself off


def test_hooks_on_inner_layers_go_to_peft():
    model = lora_model("llama")
    pf, fk = twins(model)
    report = patch(fk)
    seen = []
    for m in (pf, fk):
        m.base_model.model.model.layers[0].self_attn.o_proj.base_layer.register_forward_hook(
            lambda mod, i, o: seen.append(1))
    assert_like_peft(run(fk, ids()), run(pf, ids()), fp64_reference(model, ids()), torch.float32)
    assert len(seen) == 2 and calls(report, "PEFT: forward hooks") == 1


def test_convergence_same_loss_curve():
    def train(model, n=10):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        tokens = ids(batch=4, seq=24)
        for _ in range(n):
            loss = model(input_ids=tokens, labels=tokens).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    model = lora_model("llama", r=8)
    pf, fk = twins(model)
    patch(fk)
    pf.train(), fk.train()
    a, b = train(fk), train(pf)
    assert a[-1] < a[0] - 0.05  # it learns
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        patch(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch("model")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        unpatch(42)
    model = lora_model("llama")
    with pytest.raises(ValueError, match="backend"):
        patch(model, backend="fastest")
    with pytest.raises(TypeError, match="fuse_siblings"):
        patch(model, fuse_siblings="yes")
    with pytest.raises(forgetkern.BackendError, match="cuda"):  # cannot run on CPU tensors
        patch(model, backend="cuda")
    assert not is_patched(model)  # a failed patch leaves nothing behind
    assert unpatch(model) == 0


def test_explicit_torch_backend_and_no_siblings():
    model = lora_model("gpt2")
    pf, fk = twins(model)
    report = patch(fk, backend="torch", fuse_siblings=False)
    assert report.backend == "torch" and report.fused_groups == []
    assert "forgetkern=patched(torch)" in str(fk)
    assert_like_peft(run(fk, ids()), run(pf, ids()), fp64_reference(model, ids()), torch.float32)


def test_fp64_model():
    model = lora_model("llama", dtype=torch.float64)
    pf, fk = twins(model)
    report = patch(fk)
    a, b = run(fk, ids()), run(pf, ids())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    assert calls(report, "fused") > 0 and EPS[torch.float64] < 1e-15
    assert fk_lora.STATE_ATTR in fk.base_model.model.model.layers[0].mlp.down_proj.__dict__


def test_bad_inputs_raise_what_peft_raises():
    model = lora_model("llama")
    pf, fk = twins(model)
    report = patch(fk)
    lp = pf.base_model.model.model.layers[0].mlp.down_proj
    lf = fk.base_model.model.model.layers[0].mlp.down_proj
    for x in (torch.randn(3, 7), torch.ones(3, 160, dtype=torch.long), torch.randn(2, 160, dtype=torch.float16)):
        with pytest.raises(RuntimeError) as want:
            lp(x)
        with pytest.raises(RuntimeError) as got:
            lf(x)
        assert str(got.value) == str(want.value)
    assert calls(report, "fused") == 0 and calls(report, "PEFT") == 3


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_recomputes_the_same_masks(dropout):
    model = lora_model("llama", lora_dropout=dropout)
    fk = copy.deepcopy(model)
    report = patch(fk)
    torch.manual_seed(0)
    plain = run(fk, ids())
    fk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    ckpt = run(fk, ids())
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)
    assert calls(report, "fused") > 0 and calls(report, "PEFT") == 0


def test_dropout_training_statistics_match_peft():
    # different masks by design: the loss and the gradient under dropout agree with PEFT's in distribution
    model = lora_model("llama", lora_dropout=0.3)
    pf, fk = twins(model)
    patch(fk)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    samples = {"pf": [], "fk": []}
    for seed in range(24):
        for name, m in (("pf", pf), ("fk", fk)):
            torch.manual_seed(seed)
            r = run(m, ids())
            samples[name].append(torch.stack([r["loss"], r[key].norm()]).double())
    a, b = torch.stack(samples["fk"]), torch.stack(samples["pf"])
    se = ((a.var(0) + b.var(0)) / a.shape[0]).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() <= 4 * se).all(), (a.mean(0), b.mean(0), se)
    assert (a.std(0) > 0).all()


def test_deepcopy_and_pickle_of_patched_model():
    import io

    model = lora_model("llama")
    never = copy.deepcopy(model)
    patch(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert is_patched(clone)
        assert_like_peft(run(clone, ids()), run(never, ids()), fp64_reference(never, ids()), torch.float32)
        assert unpatch(clone) == 14 and not is_patched(clone)
        assert "forward" not in clone.base_model.model.model.layers[0].mlp.up_proj.__dict__
        assert_same(run(clone, ids()), run(never, ids()))


def test_inference_mode_with_sibling_fusion():
    """Generation and evaluation run under torch.inference_mode: the patched model gives PEFT's logits, and
    the sibling group computes its layers alone there (inference tensors have no version counter)."""
    model = lora_model("llama").eval()
    pf, fk = twins(model)
    report = patch(fk)
    assert report.fused_groups
    tokens = ids()
    with torch.inference_mode():
        want = pf(input_ids=tokens).logits
        got = fk(input_ids=tokens).logits
        again = fk(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, again)
    assert calls(report, "fused (siblings)") == 0 and calls(report, "PEFT") == 0
    assert len(report.active_groups()) == len(report.fused_groups)  # not counted as misses
    with torch.no_grad():  # outside inference mode the groups still fuse
        torch.testing.assert_close(fk(input_ids=tokens).logits, want, rtol=1e-5, atol=1e-5)
    assert calls(report, "fused (siblings)") >= 1
