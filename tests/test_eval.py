"""forgetkern.eval: perplexity and multiple choice against hand computations; CL metrics; the report."""

import json
import math

import pytest
import torch

from forgetkern import corpora
from forgetkern.data import text_windows
from forgetkern.eval import (ForgettingReport, Run, average_accuracy, bwt, forgetting, mc_accuracy, perplexity,
                             relative_drop)
from forgetkern.testing.models import tiny_llama
from tests._text_helpers import ByteTokenizer


def test_perplexity_is_exp_of_mean_token_nll_and_ignores_padding():
    model = tiny_llama()
    tok = ByteTokenizer()
    w = text_windows(tok, ["the cat sat on the mat", "a dog", "rivers shape the land they cross"], length=8)
    assert (w == -1).any()  # "a dog" is padded
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in w:
            ids = row[row >= 0][None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            n += ids.shape[1] - 1
    assert perplexity(model, w, batch_size=2) == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert model.training is False
    model.train()
    perplexity(model, w)
    assert model.training  # mode restored


def test_mc_accuracy_scores_choice_loglikelihood_like_lm_eval():
    model = tiny_llama()
    tok = ByteTokenizer()
    items = [{"context": "Question: x?\nAnswer:", "choices": [" aa", " bbbb", " c"], "answer": 1},
             {"context": "The sky is", "choices": [" blue", " green"], "answer": 0}]
    want_acc = want_norm = 0
    with torch.no_grad():
        for it in items:
            ctx = [tok.bos_token_id] + tok(it["context"])["input_ids"]
            sc = []
            for ch in it["choices"]:
                a = tok(ch)["input_ids"]
                ids = torch.tensor([ctx + a])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                sc.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(a)))
            want_acc += int(max(range(len(sc)), key=lambda i: sc[i]) == it["answer"])
            norm = [s / len(c.encode()) for s, c in zip(sc, it["choices"])]
            want_norm += int(max(range(len(norm)), key=lambda i: norm[i]) == it["answer"])
    got = mc_accuracy(model, tok, items, batch_size=2)
    assert got == {"acc": want_acc / 2, "acc_norm": want_norm / 2, "n": 2}
    with pytest.raises(ValueError, match=r"items\[0\]\['answer'\]=5"):
        mc_accuracy(model, tok, [{"context": "a", "choices": [" b"], "answer": 5}])
    with pytest.raises(ValueError, match="empty"):
        mc_accuracy(model, tok, [])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-peft-patched"])
def test_mc_shared_context_scores_equal_scoring_each_sequence_alone(arch):
    """The KV-cache sharing of mc_accuracy (contexts left-padded, choices continuing from the cache) gives each
    choice the log-likelihood it has when ``context + choice`` runs alone, unpadded."""
    import peft

    import forgetkern
    from forgetkern.eval.metrics import _score_shared_context
    from forgetkern.testing.models import tiny_gpt2

    model = tiny_gpt2() if arch == "gpt2" else tiny_llama()
    if arch.endswith("patched"):
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        forgetkern.patch(model)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ctxs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (1, 7, 3, 12)]
    chs = [[torch.randint(3, 128, (n,), generator=g).tolist() for n in lens]
           for lens in ((1, 4), (2, 2, 5), (6,), (1, 1, 3, 2))]
    with torch.no_grad():
        got = _score_shared_context(model, ctxs, chs, pad=0)
        for ctx, options, scores in zip(ctxs, chs, got):
            for ch, score in zip(options, scores):
                ids = torch.tensor([ctx + ch])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(ch))
                assert float(score) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_continual_learning_metrics_by_hand():
    R = [[0.9, 0.1, 0.0], [0.7, 0.8, 0.2], [0.6, 0.5, 0.9]]
    assert average_accuracy(R) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert bwt(R) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
    assert relative_drop(10.0, 12.0) == pytest.approx(0.2)
    assert relative_drop(0.8, 0.6, higher_is_better=True) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="square"):
        bwt([[1.0, 2.0]])
    with pytest.raises(ValueError, match="two tasks"):
        forgetting([[1.0]])


def test_report_flags_summarises_seeds_and_round_trips(tmp_path):
    rep = ForgettingReport(threshold=0.05, meta={"model": "tiny"})
    for seed, gppl in ((0, 10.4), (1, 10.8)):
        rep.add(Run("naive", seed, 1e-3, 10, {"task_ppl": 20.0, "general_ppl": 10.0, "general_mc": 0.8},
                    {"task_ppl": 15.0, "general_ppl": gppl, "general_mc": 0.7}))
    rep.add(Run("ewc", 0, 1e-3, 10, {"task_ppl": 20.0, "general_ppl": 10.0}, {"task_ppl": 16.0, "general_ppl": 10.1}))
    assert [r.seed for r in rep.flagged()] == [1]  # 8% > 5%; 4% is not
    naive = rep.summary()[0]
    assert naive["seeds"] == 2 and naive["general_drop"] == pytest.approx(0.06)
    assert naive["general_drop_min"] == pytest.approx(0.04) and naive["task_gain"] == pytest.approx(0.25)
    md = rep.to_markdown()
    assert "| naive | 0.001 | 10 | 2 | +25.0%" in md and "FORGOT > 5%" in md
    back = ForgettingReport.from_json(rep.to_json())
    assert back.to_markdown() == md and back.meta == {"model": "tiny"}
    files = rep.save(tmp_path)
    assert json.loads(files["json"].read_text())["runs"][0]["general_drop"] == pytest.approx(0.04)
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="threshold"):
        ForgettingReport(threshold=0)


def test_report_judges_by_its_primary_general_metric(tmp_path):
    """general="general_mc": MC accuracy decides the flag, the summary's "drop" and the plot, even when perplexity
    says the opposite (the case that makes perplexity a blunt probe)."""
    before = {"task_ppl": 20.0, "general_ppl": 10.0, "general_mc": 0.80}
    rep = ForgettingReport(general="general_mc")
    rep.add(Run("naive", 0, 1e-3, 8, before, {"task_ppl": 15.0, "general_ppl": 9.5, "general_mc": 0.70}))
    rep.add(Run("wise", 0, 1e-3, 8, before, {"task_ppl": 17.0, "general_ppl": 11.0, "general_mc": 0.79},
                {"alpha": 0.5}))
    naive, wise = rep.runs
    assert naive.general_drop == pytest.approx(-0.05) and rep.drop(naive) == pytest.approx(0.125)
    assert rep.flagged() == [naive]
    rows = {r["method"]: r for r in rep.summary()}
    assert rows["naive"]["drop"] == pytest.approx(0.125) and rows["wise"]["alpha"] == 0.5
    md = rep.to_markdown()
    assert "| naive | 0.001 | 8 | 1 | +25.0% | -5.0% | +12.5% | FORGOT > 5% |" in md and "| wise a=0.5 |" in md
    back = ForgettingReport.from_json(rep.to_json())
    assert back.general == "general_mc" and back.to_markdown() == md
    assert rep.save(tmp_path)["plot"].stat().st_size > 1000
    with pytest.raises(ValueError, match="general must be one of"):
        ForgettingReport(general="mmlu")
    with pytest.raises(KeyError, match="'general_mc' was not measured"):
        rep.add(Run("ewc", 0, 1e-3, 8, {"task_ppl": 1.0, "general_ppl": 1.0}, {"task_ppl": 1.0, "general_ppl": 1.0}))


def test_shipped_sets_are_disjoint_and_well_formed():
    ev, rep = corpora.general_text("eval"), corpora.general_text("replay")
    assert ev and rep and not set(ev) & set(rep)
    for it in corpora.general_mc() + corpora.cloze_mc():
        assert 0 <= it["answer"] < len(it["choices"]) and all(c.startswith(" ") for c in it["choices"])
    assert len(corpora.general_mc()) == 64
    cl = corpora.cloze_mc(seed=3)
    assert cl == corpora.cloze_mc(seed=3) and len({tuple(i["choices"]) for i in cl}) == len(cl)
    train, evs = corpora.python_source("train"), corpora.python_source("eval")
    assert len(train) >= 15 and len(evs) >= 10 and not set(train) & set(evs)
    with pytest.raises(ValueError, match="split"):
        corpora.general_text("test")
