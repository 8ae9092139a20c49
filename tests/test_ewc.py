"""forgetkern.EWC: both targets and modes against hand-written torch oracles; apply_, state, errors."""

import pytest
import torch

import forgetkern
from forgetkern.testing.models import tiny_gpt2, tiny_llama


def _peft(model=None, seed=0, targets=("q_proj", "v_proj", "up_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model if model is not None else tiny_llama(seed=seed),
                          LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))


def _rand_fisher(named, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in named.items()}


def _perturb(params, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_params_target_penalty_and_apply_match_oracle():
    model = _peft()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    fisher = _rand_fisher(lora)
    ewc = forgetkern.EWC(model, fisher, lam=3.0)
    anchors = {n: p.detach().clone() for n, p in lora.items()}
    _perturb(lora.values())
    want = sum(1.5 * (fisher[n] * (p - anchors[n]) ** 2).sum() for n, p in lora.items())
    torch.testing.assert_close(ewc.penalty(), want.detach(), rtol=1e-5, atol=1e-7)
    names = list(lora)
    lora[names[0]].grad = torch.ones_like(lora[names[0]])  # one pre-filled grad, the others None
    value = ewc.apply_()
    torch.testing.assert_close(value, want.detach(), rtol=1e-5, atol=1e-7)
    for i, (n, p) in enumerate(lora.items()):
        g = 3.0 * fisher[n] * (p.detach() - anchors[n]) + (1.0 if i == 0 else 0.0)
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def _delta_w_oracle(model, fisher, lam, d0=None):
    total = 0.0
    for n, f in fisher.items():
        mod = model.get_submodule(n[: -len(".base_layer.weight")])
        a, b, s = mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.scaling["default"]
        d = s * (b @ a)
        if getattr(mod, "fan_in_fan_out", False):
            d = d.T
        if d0 is not None:
            d = d - d0[n]
        total = total + lam / 2 * (f * d ** 2).sum()
    return total


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("fresh", [True, False])
def test_delta_w_penalty_and_gradients(kind, fresh):
    model = _peft(tiny_gpt2(), targets=("c_attn", "c_fc")) if kind == "gpt2" else _peft()
    fisher = forgetkern.FisherEstimator(model, params="lora_base")
    assert fisher.params and all(n.endswith(".base_layer.weight") for n in fisher.params)
    named = dict(model.named_parameters())
    fisher = _rand_fisher({n: named[n] for n in fisher.params})
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    d0 = None
    if not fresh:  # a trained adapter: the anchor is its update at construction
        _perturb(lora, seed=3, scale=0.2)
        d0 = {n: _delta_w_oracle_update(model, n) for n in fisher}
    ewc = forgetkern.EWC(model, fisher, lam=2.0, target="delta_w")
    if fresh:
        assert float(ewc.penalty()) == 0.0
    _perturb(lora, seed=4, scale=0.2)
    want = _delta_w_oracle(model, fisher, 2.0, d0)
    got = ewc.penalty()
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-7)
    g_want = torch.autograd.grad(want, lora)
    g_pen = torch.autograd.grad(got, lora)
    for p in lora:
        p.grad = None
    ewc.apply_()
    for p, gw, gp in zip(lora, g_want, g_pen):
        torch.testing.assert_close(gp, gw, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.grad, gw, rtol=1e-4, atol=1e-6)


def _delta_w_oracle_update(model, n):
    mod = model.get_submodule(n[: -len(".base_layer.weight")])
    d = mod.scaling["default"] * (mod.lora_B["default"].weight @ mod.lora_A["default"].weight)
    return (d.T if getattr(mod, "fan_in_fan_out", False) else d).detach().clone()


def test_separate_and_online_consolidate():
    model = _peft()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    f1, f2 = _rand_fisher(lora, 1), _rand_fisher(lora, 2)
    sep = forgetkern.EWC(model, f1, lam=1.0, mode="separate")
    onl = forgetkern.EWC(model, f1, lam=1.0, mode="online", gamma=0.5)
    a1 = {n: p.detach().clone() for n, p in lora.items()}
    _perturb(lora.values(), seed=5)
    sep.consolidate(f2)
    onl.consolidate(f2)
    a2 = {n: p.detach().clone() for n, p in lora.items()}
    _perturb(lora.values(), seed=6)
    want_sep = sum(0.5 * (f1[n] * (p - a1[n]) ** 2 + f2[n] * (p - a2[n]) ** 2).sum() for n, p in lora.items())
    want_onl = sum(0.5 * ((0.5 * f1[n] + f2[n]) * (p - a2[n]) ** 2).sum() for n, p in lora.items())
    torch.testing.assert_close(sep.penalty(), want_sep.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(onl.penalty(), want_onl.detach(), rtol=1e-5, atol=1e-7)
    assert len(sep.tasks) == 2 and len(onl.tasks) == 1


def test_state_dict_resume_is_bit_exact(tmp_path):
    def run(model, ewc, steps):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for i in range(steps):
            ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(i))
            model(input_ids=ids, labels=ids).loss.backward()
            ewc.apply_()
            opt.step()
            opt.zero_grad()

    model = _peft()
    fisher = forgetkern.FisherEstimator(model, params="lora_base").estimate(
        [torch.randint(1, 128, (2, 8))], progress=False)
    ewc = forgetkern.EWC(model, fisher, lam=5.0, target="delta_w", mode="online", gamma=0.9)
    run(model, ewc, 2)
    torch.save({"model": model.state_dict(), "ewc": ewc.state_dict()}, tmp_path / "ck.pt")
    run(model, ewc, 2)
    ck = torch.load(tmp_path / "ck.pt")
    model2 = _peft()
    model2.load_state_dict(ck["model"])
    ewc2 = forgetkern.EWC(model2, fisher, lam=1.0, target="delta_w")  # its anchors are replaced by the state
    ewc2.load_state_dict(ck["ewc"])
    assert ewc2.lam == 5.0 and ewc2.mode == "online" and ewc2.fisher_meta["normalize"] == "token"
    run(model2, ewc2, 2)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n


def test_scale_report_gives_lam_for_equal_gradients():
    model = _peft()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    ewc = forgetkern.EWC(model, _rand_fisher(lora), lam=2.0)
    _perturb(lora.values())
    ids = torch.randint(1, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    rep = ewc.scale_report()
    assert rep["ratio"] > 0 and rep["task_grad_norm"] > 0
    ewc2 = forgetkern.EWC.__new__(forgetkern.EWC)
    ewc2.__dict__.update(ewc.__dict__)
    ewc2.lam = rep["lam_for_ratio_1"]
    assert ewc2.scale_report()["ratio"] == pytest.approx(1.0, rel=1e-6)


def test_fisher_scale_is_per_token_by_default():
    model = _peft()
    ids = torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    tok = forgetkern.FisherEstimator(model, params="lora").estimate([ids], progress=False)
    smp = forgetkern.FisherEstimator(model, params="lora", normalize="sample").estimate([ids], progress=False)
    assert tok.normalize == "token" and tok.num_tokens == 3 * 8 and tok.num_samples == 3
    for n in tok:
        torch.testing.assert_close(tok[n] * 8, smp[n], rtol=1e-5, atol=1e-9)  # 3 samples of 8 labelled tokens
    bt = forgetkern.FisherEstimator(model, params="lora", granularity="batch").estimate([ids[:1]], progress=False)
    # one sample: T * (d mean-token loss)^2 / 1 batch = (d sum loss)^2 / T = the per-token Fisher
    one = forgetkern.FisherEstimator(model, params="lora").estimate([ids[:1]], progress=False)
    for n in one:
        torch.testing.assert_close(bt[n], one[n], rtol=1e-4, atol=1e-9)


def test_errors():
    model = _peft()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    f = _rand_fisher(lora)
    with pytest.raises(ValueError, match="target must be"):
        forgetkern.EWC(model, f, lam=1.0, target="weights")
    with pytest.raises(ValueError, match="mode must be"):
        forgetkern.EWC(model, f, lam=1.0, mode="joint")
    with pytest.raises(ValueError, match="lam must be"):
        forgetkern.EWC(model, f, lam=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        forgetkern.EWC(model, f, lam=1.0, gamma=2.0)
    with pytest.raises(ValueError, match="non-empty"):
        forgetkern.EWC(model, {}, lam=1.0)
    with pytest.raises(KeyError, match="not parameters of the model"):
        forgetkern.EWC(model, {"nope": torch.zeros(1)}, lam=1.0)
    n0 = next(iter(f))
    with pytest.raises(ValueError, match="another model"):
        forgetkern.EWC(model, {**f, n0: torch.zeros(3)}, lam=1.0)
    with pytest.raises(ValueError, match="negative or non-finite"):
        forgetkern.EWC(model, {**f, n0: -f[n0]}, lam=1.0)
    with pytest.raises(KeyError, match="params='lora_base'"):
        forgetkern.EWC(model, f, lam=1.0, target="delta_w")
    ewc = forgetkern.EWC(model, f, lam=1.0)
    with pytest.raises(KeyError, match="differ"):
        ewc.consolidate({n0: f[n0]})
    with pytest.raises(ValueError, match="version 1"):
        ewc.load_state_dict({})
