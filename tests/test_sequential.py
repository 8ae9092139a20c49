"""forgetkern.training.sequential and ``forgetkern demo --sequential``: two tasks in a row on a tiny Llama; every
method evaluates every task after each one, replay and MSSR spend the same replay rows, O-LoRA keeps the new
adapter off the old one's rows, the merge is the sum of the two adapters' updates, and the summary's ACC / BWT
are the ones of the rows."""

import json

import pytest
import torch

import forgetkern
from forgetkern import corpora, demo, demo_sequential
from forgetkern.data import text_windows
from forgetkern.testing import models
from forgetkern.testing.models import tiny_llama
from forgetkern.training import runs, sequential
from forgetkern.training.sequential import SeqConfig, SeqData, Task, matrix, train_sequence
from tests._text_helpers import ByteTokenizer

TARGETS = ("q_proj", "v_proj", "up_proj")


@pytest.fixture(autouse=True)
def small_targets(monkeypatch):
    monkeypatch.setattr(runs, "LORA_TARGETS", TARGETS)


@pytest.fixture(scope="module")
def data():
    tok = ByteTokenizer()

    def task(name, texts):
        return Task(name, text_windows(tok, texts * 3, length=16), text_windows(tok, texts, length=16))

    code = ["def f(x):\n    return x + 1\n" * 4, "class A:\n    pass\n" * 6]
    prose = ["The if statement selects one suite. " * 3, "A for loop iterates over a sequence. " * 3]
    return SeqData(tasks=[task("code", code), task("prose", prose)],
                   general_eval=text_windows(tok, corpora.general_text("eval")[:2], length=16),
                   general_mc=corpora.general_mc()[:3], tokenizer=tok)


@pytest.mark.parametrize("method", sequential.SEQ_METHODS)
def test_every_method_evaluates_every_task_after_each_one(data, method):
    rows = train_sequence(tiny_llama(), data, SeqConfig(method, 1e-2, 2, rank=4))
    stages = [r for r in rows if "merge" not in r]
    assert [(r["stage"], r["task"]) for r in stages] == [(0, "code"), (1, "prose")]
    merges = [r["merge"] for r in rows if "merge" in r]
    assert merges == (["task_arithmetic", "ties"] if method == "merge" else [])
    for r in rows:
        assert set(r["metrics"]) == {"task:code", "task:prose", "general_ppl", "general_mc"}
        assert all(torch.isfinite(torch.tensor(v)) for v in r["metrics"].values())
    before = sequential.evaluate_tasks(tiny_llama(), data)
    R = matrix(stages, before, ["code", "prose"])
    assert R[0][0] > 0 and R[1][1] > 0  # each task learned while it was trained


def test_replay_and_mssr_spend_the_same_replay_rows_and_mssr_goes_weakest_first(data, monkeypatch):
    picked = {}
    real = sequential._Replay.pick

    def spy(self):
        idx = real(self)
        picked.setdefault(self.mssr is not None, []).append(idx)
        return idx

    monkeypatch.setattr(sequential._Replay, "pick", spy)
    n_mem = data.tasks[0].train.shape[0]
    out = {}
    for method in ("replay", "mssr"):
        rows = train_sequence(tiny_llama(), data, SeqConfig(method, 1e-2, 4, rank=4, replay_ratio=0.5))
        out[method] = rows[-1]["replay_rows"]
        assert "replay_rows" not in rows[0]  # nothing to replay during the first task
    assert out["replay"] == out["mssr"] == 4 * 2
    mssr = torch.cat(picked[True])
    assert mssr.numel() == 8 and mssr.unique().numel() == min(8, n_mem)  # never-rehearsed samples come first
    assert all(int(i.max()) < n_mem for i in picked[False])


def test_olora_keeps_the_second_adapter_off_the_first_ones_rows(data, monkeypatch):
    seen = []

    class Spy(forgetkern.OLoRA):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append(self)

    monkeypatch.setattr(forgetkern, "OLoRA", Spy)
    overlap = {}
    for lam in (0.0, 100.0):
        train_sequence(tiny_llama(), data, SeqConfig("olora", 3e-2, 6, rank=4, olora_lam=lam))
        reg = seen[-1]
        assert reg.num_tasks == 1 and all(p.shape[0] == 4 for p in reg.past)
        with torch.no_grad():
            overlap[lam] = float(sum((p @ s.a.t()).abs().sum() for p, s in zip(reg.past, reg.sites)))
    assert overlap[100.0] < 0.5 * overlap[0.0]


def test_merge_is_the_sum_of_the_two_adapters_updates(data, monkeypatch):
    snaps = []
    real = sequential.evaluate_tasks

    def spy(model, d):
        snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, d)

    monkeypatch.setattr(sequential, "evaluate_tasks", spy)
    base = tiny_llama()
    train_sequence(base, data, SeqConfig("merge", 1e-2, 2, rank=4, merge_methods=("task_arithmetic",)))
    a, b, merged = snaps
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    scale = 32.0 / 4

    def delta(s):
        return scale * s[f"{key}.lora_B.default.weight"] @ s[f"{key}.lora_A.default.weight"]

    want = base.state_dict()["model.layers.0.self_attn.q_proj.weight"] + delta(a) + delta(b)
    torch.testing.assert_close(merged[f"{key}.base_layer.weight"], want, rtol=1e-5, atol=1e-6)


def test_summary_acc_and_bwt_are_those_of_the_rows():
    before = {"task:a": 10.0, "task:b": 20.0, "general_ppl": 5.0, "general_mc": 0.5}

    def row(stage, a, b, mc, **kw):
        return {"stage": stage, "task": "ab"[stage], "metrics": {"task:a": a, "task:b": b, "general_ppl": 6.0,
                                                                 "general_mc": mc}, **kw}

    runs_ = [{"method": "naive", "lr": 1e-3, "seed": s, "rows": [row(0, 5.0, 20.0, 0.5), row(1, 8.0, 10.0, 0.4)]}
             for s in (0, 1)]
    runs_.append({"method": "merge", "lr": 1e-3, "seed": 0,
                  "rows": [row(0, 5.0, 20.0, 0.5), row(1, 20.0, 10.0, 0.5), row(1, 6.0, 12.0, 0.45, merge="ties")]})
    out = {r["method"]: r for r in demo_sequential.summarize(runs_, before, ["a", "b"])}
    assert set(out) == {"naive", "merge:ties"}
    n = out["naive"]
    assert n["seeds"] == 2 and sum(n["R"], []) == pytest.approx([0.5, 0.0, 0.2, 0.5])
    assert n["acc"]["mean"] == pytest.approx(0.35) and n["bwt"]["mean"] == pytest.approx(-0.3)
    assert n["forgetting"]["mean"] == pytest.approx(0.3) and n["mc_drop"]["mean"] == pytest.approx(0.2)
    m = out["merge:ties"]
    assert sum(m["R"], []) == pytest.approx([0.5, 0.0, 0.4, 0.4]) and m["bwt"]["mean"] == pytest.approx(-0.1)
    assert demo_sequential.best_naive(list(out.values()))["lr"] == 1e-3
    table = demo_sequential.format_summary(list(out.values()), ["a", "b"])
    assert "merge:ties" in table and "+35.0%" in table


def test_demo_sequential_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    """``forgetkern demo --sequential --quick`` with the tiny model standing in for SmolLM2 (the real run is the
    documented one: minutes, not a unit test)."""
    monkeypatch.setattr(models, "smollm2", lambda: (tiny_llama(), ByteTokenizer()))
    monkeypatch.setitem(demo_sequential.QUICK, "task_windows", 16)
    monkeypatch.setitem(demo_sequential.QUICK, "eval_windows", 4)
    monkeypatch.setitem(demo_sequential.QUICK, "steps", 2)
    assert demo.main(["--sequential", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "sequential.json").read_text())
    assert rec["tasks"] == ["code", "reference"] and rec["baseline"] == 1e-3
    assert {r["method"] for r in rec["summary"]} == {"naive", "olora", "merge:task_arithmetic", "merge:ties"}
    assert "| naive |" in (tmp_path / "sequential.md").read_text()
    with pytest.raises(SystemExit):
        demo.main(["--sequential", "--methods", "lwf", "--out", str(tmp_path)])


def test_seq_config_and_data_reject_bad_values(data):
    with pytest.raises(ValueError, match="method must be one of"):
        SeqConfig("ewc", 1e-3, 2)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        SeqConfig("naive", 1e-3, 0)
    with pytest.raises(ValueError, match="replay_ratio"):
        SeqConfig("replay", 1e-3, 2, replay_ratio=0.01)
    with pytest.raises(ValueError, match="at least two tasks"):
        SeqData(tasks=[data.tasks[0]], general_eval=data.general_eval)
    with pytest.raises(ValueError, match="cover stages"):
        matrix([{"stage": 0, "metrics": {}}], {}, ["a", "b"])


def test_python_reference_splits_are_disjoint_topics():
    train, held = corpora.python_reference("train"), corpora.python_reference("eval")
    assert len(train) > 2 * len(held) > 0 and not set(train) & set(held)
    with pytest.raises(ValueError, match="split"):
        corpora.python_reference("test")
