"""FisherEstimator: per-sample / per-token / per-batch Fisher against per-sample autograd, labels, EMA."""

import warnings

import pytest
import torch

import forgetkern
from forgetkern.fisher import FisherEstimator
from forgetkern.testing.models import tiny_gpt2, tiny_llama
from tests._helpers import backends

VOCAB = 128


def _lora(model, targets=("q_proj", "v_proj")):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.1,
                          init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return peft.get_peft_model(model, cfg).eval()


def _batches(n_batches=2, n=3, t=9, seed=0, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (n, t), generator=gen)
        lens = lengths or [t] + [int(torch.randint(2, t, (1,), generator=gen)) for _ in range(n - 1)]
        attn = (torch.arange(t)[None, :] < torch.tensor(lens)[:, None]).long()
        out.append({"input_ids": ids.masked_fill(attn == 0, 0), "attention_mask": attn})
    return out


def _per_sample_oracle(model, batches, names):
    """1/N sum_n (d l_n / d theta)^2, each sample run alone without its padding (float64 accumulation)."""
    params = dict(model.named_parameters())
    ps = [params[k] for k in names]
    saved = [p.requires_grad for p in ps]
    for p in ps:
        p.requires_grad_(True)
    total = {k: torch.zeros(params[k].shape, dtype=torch.float64) for k in names}
    count = 0
    for b in batches:
        for ids, attn in zip(b["input_ids"], b["attention_mask"]):
            ln = int(attn.sum())
            ids = ids[None, :ln]
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            for k, g in zip(names, torch.autograd.grad(loss, ps, allow_unused=True)):
                if g is not None:
                    total[k] += g.double() ** 2
            count += 1
    for p, s in zip(ps, saved):
        p.requires_grad_(s)
    return {k: v / count for k, v in total.items()}


def _assert_fisher_close(got, want, rtol=2e-4):
    assert set(got) == set(want)
    for k in want:
        scale = float(want[k].abs().max()) + 1e-30
        torch.testing.assert_close(got[k].double(), want[k], rtol=rtol, atol=rtol * scale, msg=k)


@pytest.mark.parametrize("backend", [p for p in backends() if p.id in ("torch", "triton")])
def test_lora_sample_fisher_matches_per_sample_autograd(backend):
    model = _lora(tiny_llama())
    batches = _batches()
    est = FisherEstimator(model, normalize="sample", params="lora")
    assert not est.fallback and len(est.layers) == 8  # lora_A + lora_B of q and v in 2 layers
    with forgetkern.use_backend(backend, op="linear_persample_sq_grad_"):
        got = est.estimate(batches, progress=False)
    assert est.num_samples == 6 and est.nonfinite == []
    assert not model.training  # the mode is restored
    _assert_fisher_close(got, _per_sample_oracle(model, batches, list(got)))


def test_all_weights_with_fallback_params_match():
    """Linear weights fused; norms, and the embedding tied to lm_head, through per-sample autograd."""
    model = tiny_llama(layers=1)
    batches = _batches(n_batches=1, n=4)
    est = FisherEstimator(model, normalize="sample")
    assert "model.embed_tokens.weight" in est.fallback and "model.norm.weight" in est.fallback
    assert any(layer.weight == "model.layers.0.mlp.down_proj.weight" for layer in est.layers)
    got = est.estimate(batches, progress=False)
    _assert_fisher_close(got, _per_sample_oracle(model, batches, list(got)))


def test_fallback_one_backward_per_sample(monkeypatch):
    from forgetkern.fisher import estimator

    monkeypatch.setattr(estimator, "_BATCHED_FALLBACK_BYTES", 0)
    model = tiny_llama(layers=1)
    batches = _batches(n_batches=1, n=3)
    got = FisherEstimator(model, normalize="sample", params=["model.norm.weight", "model.layers.0.input_layernorm.weight"]).estimate(
        batches, progress=False)
    _assert_fisher_close(got, _per_sample_oracle(model, batches, list(got)))


def test_gpt2_conv1d_with_bias():
    model = tiny_gpt2(layers=1)
    batches = _batches(n_batches=1, n=3)
    names = [n for n, _ in model.named_parameters() if ".attn." in n or ".mlp." in n]
    est = FisherEstimator(model, normalize="sample", params=names)
    assert not est.fallback
    got = est.estimate(batches, progress=False)
    _assert_fisher_close(got, _per_sample_oracle(model, batches, names))


def test_batch_size_one_batch_equals_sample():
    model = _lora(tiny_llama())
    batches = [{k: v[i:i + 1] for k, v in b.items()} for b in _batches(n_batches=1, n=3) for i in range(3)]
    f_batch = FisherEstimator(model, normalize="sample", params="lora", granularity="batch").estimate(batches, progress=False)
    f_sample = FisherEstimator(model, normalize="sample", params="lora", granularity="sample").estimate(batches, progress=False)
    _assert_fisher_close(f_batch, {k: v.double() for k, v in f_sample.items()}, rtol=1e-4)


def test_one_labelled_token_token_equals_sample():
    """Sequences of two tokens: one labelled position, so sample and token granularity coincide."""
    model = _lora(tiny_llama())
    batches = _batches(n_batches=2, n=4, t=2, lengths=[2, 2, 2, 2])
    f_tok = FisherEstimator(model, normalize="sample", params="lora", granularity="token").estimate(batches, progress=False)
    f_smp = FisherEstimator(model, normalize="sample", params="lora", granularity="sample").estimate(batches, progress=False)
    _assert_fisher_close(f_tok, {k: v.double() for k, v in f_smp.items()}, rtol=1e-4)


def test_batch_granularity_is_squared_mean_gradient():
    model = _lora(tiny_llama())
    batches = _batches(n_batches=2, n=3)
    got = FisherEstimator(model, normalize="sample", params="lora", granularity="batch").estimate(batches, progress=False)
    params = dict(model.named_parameters())
    want = {k: torch.zeros(params[k].shape, dtype=torch.float64) for k in got}
    for b in batches:
        logits = model(**b).logits.float()
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                reduction="none").view(3, -1).sum(1)
        grads = torch.autograd.grad(nll.mean(), [params[k] for k in got])
        for k, g in zip(got, grads):
            want[k] += g.double() ** 2 / len(batches)
    _assert_fisher_close(got, want, rtol=1e-4)


def test_token_mode_is_exact_per_token_fisher_for_positionwise_model():
    """No token mixing: token granularity equals the Fisher of per-token losses, each token a sample."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, 24), torch.nn.Tanh(),
                                torch.nn.Linear(24, VOCAB))
    model.get_input_embeddings = lambda: model[0]
    ids = torch.randint(0, VOCAB, (3, 6))
    labels = torch.randint(0, VOCAB, (3, 6))
    labels[2, 4:] = -100
    batch_fn = lambda m, b: (m(b[0]), b[1])  # noqa: E731
    names = ["1.weight", "1.bias", "3.weight"]
    got = FisherEstimator(model, normalize="sample", params=names, granularity="token", batch_fn=batch_fn).estimate(
        [(ids, labels)], progress=False)
    params = dict(model.named_parameters())
    want = {k: torch.zeros(params[k].shape, dtype=torch.float64) for k in names}
    for n in range(3):
        for t in range(6):
            if labels[n, t] < 0:
                continue
            loss = torch.nn.functional.cross_entropy(model(ids[n, t:t + 1]), labels[n, t:t + 1], reduction="sum")
            for k, g in zip(names, torch.autograd.grad(loss, [params[k] for k in names])):
                want[k] += g.double() ** 2 / 3
    _assert_fisher_close(got, want, rtol=1e-5)


def test_model_without_embeddings_and_custom_batch_fn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 5))
    x = torch.randn(4, 3, 8, requires_grad=False)
    y = torch.randint(0, 5, (4, 3))
    got = FisherEstimator(model, normalize="sample", batch_fn=lambda m, b: (m(b[0]), b[1])).estimate([(x, y)], progress=False)
    params = dict(model.named_parameters())
    want = {k: torch.zeros(p.shape, dtype=torch.float64) for k, p in params.items()}
    for n in range(4):
        loss = torch.nn.functional.cross_entropy(model(x[n]), y[n], reduction="sum")
        for (k, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            want[k] += g.double() ** 2 / 4
    _assert_fisher_close(got, want, rtol=1e-5)


def test_sampled_labels_reproduce_with_seed():
    model = _lora(tiny_llama())
    batches = _batches(n_batches=2, n=2)
    run = lambda seed, k=2: FisherEstimator(model, normalize="sample", params="lora", labels="sampled", label_samples=k,  # noqa
                                            seed=seed).estimate(batches, progress=False)
    a, b, c = run(0), run(0), run(1)
    emp = FisherEstimator(model, normalize="sample", params="lora").estimate(batches, progress=False)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        assert not torch.equal(a[k], c[k]) and not torch.equal(a[k], emp[k])
        assert torch.isfinite(a[k]).all() and (a[k] >= 0).all()


def test_nonfinite_samples_are_dropped_and_reported():
    model = _lora(tiny_llama())
    batches = _batches(n_batches=1, n=3)

    def batch_fn(m, b):
        logits = m(**b).logits
        poison = torch.zeros_like(logits)
        poison[1, 2, 5] = float("nan")  # sample 1 only
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        return (logits + poison)[:, :-1], labels[:, 1:], b["attention_mask"]

    est = FisherEstimator(model, normalize="sample", params="lora", batch_fn=batch_fn)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        got = est.estimate(batches, progress=False)
    assert est.nonfinite and all(torch.isfinite(v).all() for v in got.values())
    clean = {"input_ids": batches[0]["input_ids"][[0, 2]], "attention_mask": batches[0]["attention_mask"][[0, 2]]}
    want = _per_sample_oracle(model, [clean], list(got))
    _assert_fisher_close(got, {k: v * 2 / 3 for k, v in want.items()})


def test_update_from_grads_ema():
    model = _lora(tiny_llama())
    est = FisherEstimator(model, normalize="sample", params="lora")
    b = _batches(n_batches=1)[0]
    hist = []
    for step in range(3):
        model.zero_grad()
        model(**b, labels=b["input_ids"]).loss.mul(step + 1).backward()
        hist.append({k: p.grad.detach().clone() for k, p in model.named_parameters() if "lora_" in k})
        found = est.update_from_grads(model, decay=0.8)
        assert found.item() == 0.0
    for k, f in est.fisher.items():
        want = torch.zeros_like(f)
        for g in hist:
            want = 0.8 * want + 0.2 * g[k] * g[k]
        torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-12)
    name = next(iter(est.fisher))
    before = est.fisher[name].clone()
    dict(model.named_parameters())[name].grad.view(-1)[0] = float("inf")
    assert est.update_from_grads(decay=0.5).item() == 1.0 and est.ema_nonfinite
    assert est.fisher[name].view(-1)[0] == before.view(-1)[0] and torch.isfinite(est.fisher[name]).all()


def test_progress_bar_and_max_batches(capsys):
    model = _lora(tiny_llama())
    est = FisherEstimator(model, normalize="sample", params="lora")
    est.estimate(_batches(n_batches=3), max_batches=2, progress=True)
    assert est.num_samples == 6
    assert "Fisher (sample)" in capsys.readouterr().err


def test_bad_arguments():
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match="labels must be one of"):
        FisherEstimator(model, normalize="sample", labels="true")
    with pytest.raises(ValueError, match="granularity='token' needs Linear"):
        FisherEstimator(model, normalize="sample", granularity="token")
    with pytest.raises(ValueError, match="label_samples > 1 needs labels='sampled'"):
        FisherEstimator(model, normalize="sample", label_samples=3)
    with pytest.raises(ValueError, match="no parameter selected"):
        FisherEstimator(model, normalize="sample", params="lora")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FisherEstimator(model, normalize="sample", params=lambda n, p: n.endswith("q_proj.weight"))


def _padded(side: str, lengths, t=9, seed=5):
    """One batch with the given lengths, padded on the ``side`` ("left" or "right"); pad id 0, labels -100."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), t), generator=gen)
    pos = torch.arange(t)[None, :]
    lens = torch.tensor(lengths)[:, None]
    attn = (pos >= t - lens) if side == "left" else (pos < lens)
    ids = ids.masked_fill(~attn, 0)
    return {"input_ids": ids, "attention_mask": attn.long(), "labels": ids.masked_fill(~attn, -100)}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("backend", [p for p in backends() if p.id in ("torch", "triton")])
def test_padding_side_labels_decide_what_counts(side, backend):
    """For one sample, "sample" equals "batch" (the loss's own gradient) whichever side is padded, and a
    padded batch of mixed lengths equals the sum of its samples run one at a time: labels decide."""
    model = _lora(tiny_llama(), targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    batch = _padded(side, [9, 5, 2])
    singles = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(3)]
    with forgetkern.use_backend(backend, op="linear_persample_sq_grad_"):
        f_sample = FisherEstimator(model, normalize="sample", params="lora").estimate(singles, progress=False)
        f_batched = FisherEstimator(model, normalize="sample", params="lora").estimate([batch], progress=False)
    f_batch = FisherEstimator(model, normalize="sample", params="lora", granularity="batch").estimate(singles, progress=False)
    _assert_fisher_close(f_batch, {k: v.double() for k, v in f_sample.items()}, rtol=1e-4)
    _assert_fisher_close(f_batched, {k: v.double() for k, v in f_sample.items()}, rtol=1e-4)


def test_update_from_grads_refuses_negative_or_nan_scale():
    model = _lora(tiny_llama())
    est = FisherEstimator(model, normalize="sample", params="lora")
    with pytest.raises(ValueError, match="scale must be a finite float >= 0"):
        est.update_from_grads(model, decay=0.5, scale=-1.0)
    with pytest.raises(ValueError, match="scale must be a finite float >= 0"):
        est.update_from_grads(model, decay=0.5, scale=float("nan"))
    with pytest.raises(ValueError, match=r"decay must be a float in \[0, 1\]"):
        est.update_from_grads(model, decay=-0.1)
