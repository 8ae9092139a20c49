"""forgetkern.training.runs, the engine of ``forgetkern demo``: every method trains on a tiny Llama and its
mitigation does what it says (projections hold, replay slots are filled, EWC pulls back, WiSE-FT restores)."""

import pytest
import torch

import forgetkern
from forgetkern import corpora, demo
from forgetkern.data import text_windows
from forgetkern.testing.models import tiny_llama
from forgetkern.training import runs
from forgetkern.training.runs import Data, RunConfig, train_and_eval
from tests._text_helpers import ByteTokenizer

TARGETS = ("q_proj", "v_proj", "up_proj")


@pytest.fixture(scope="module")
def data():
    tok = ByteTokenizer()
    code = ["def f(x):\n    return x + 1\n" * 4, "class A:\n    pass\n" * 6, "import os\nprint(os.sep)\n" * 5]
    return Data(task_train=text_windows(tok, code * 4, length=16), task_eval=text_windows(tok, code, length=16),
                general_eval=text_windows(tok, corpora.general_text("eval")[:2], length=16),
                general_replay=text_windows(tok, corpora.general_text("replay")[:2], length=16),
                general_mc=corpora.general_mc()[:3], tokenizer=tok)


@pytest.fixture(autouse=True)
def small_targets(monkeypatch):
    monkeypatch.setattr(runs, "LORA_TARGETS", TARGETS)


@pytest.fixture
def trained(monkeypatch):
    """``trained(data, cfg, **kw)`` -> (model, mitigation object) after the run (the engine keeps neither)."""
    seen = {}
    real = runs._Mitigation.after_step

    def spy(self):
        real(self)
        seen["model"], seen["reg"] = self.model, self.reg

    monkeypatch.setattr(runs._Mitigation, "after_step", spy)

    def go(data, cfg, **kw):
        train_and_eval(tiny_llama(), data, cfg, **kw)
        return seen["model"], seen["reg"]

    return go


@pytest.mark.parametrize("method", ["naive", "full", "replay", "mssr", "freeze", "lwf", "oplora", "gpm"])
def test_every_method_trains_and_evaluates_at_its_checkpoints(data, method):
    res = train_and_eval(tiny_llama(), data, RunConfig(method, 1e-2, (1, 3), batch_size=4, rank=4, oplora_k=8))
    assert [r["steps"] for r in res] == [1, 3]
    for r in res:
        assert set(r["metrics"]) == {"task_ppl", "general_ppl", "general_mc"}
        assert all(torch.isfinite(torch.tensor(v)) for v in r["metrics"].values())


def _lora_sites(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def test_oplora_and_gpm_keep_the_update_off_the_protected_subspace(data, trained):
    for method in ("oplora", "gpm"):
        model, reg = trained(data, RunConfig(method, 1e-2, (3,), batch_size=4, rank=4, oplora_k=8, gpm_threshold=0.9))
        for i, m in enumerate(_lora_sites(model)):
            a = m.lora_A["default"].weight.detach()  # r x in
            b = m.lora_B["default"].weight.detach()  # out x r
            assert a.abs().max() > 0 and b.abs().max() > 0
            if method == "oplora":
                dw = b @ a
                assert (reg.U[i].t() @ dw).abs().max() <= 1e-5 * dw.abs().max()
                assert (dw @ reg.V[i]).abs().max() <= 1e-5 * dw.abs().max()
            else:
                assert reg.bases[i].shape[1] > 0
                assert (a @ reg.bases[i]).abs().max() <= 1e-5 * a.abs().max()


def test_mssr_fills_its_replay_slots_with_general_windows(data):
    batches = []
    cfg = RunConfig("mssr", 1e-2, (4,), batch_size=4, rank=4, replay_ratio=0.5)
    for batch, mssr in runs._stream(data, cfg, 4):
        batches.append(batch)
        r = batch["replay_index"]
        mssr.update(r[r >= 0], torch.ones(int((r >= 0).sum())))
    r0 = batches[0]["replay_index"]
    assert (r0 >= 0).sum() == 2 and (r0[:2] == -1).all()  # two task windows, then two replay windows
    assert torch.equal(batches[0]["input_ids"][2:], data.general_replay[r0[2:]].clamp_min(0))
    assert all(b["input_ids"].shape[0] == 4 for b in batches)
    plain = next(runs._stream(data, RunConfig("naive", 1e-2, (1,), batch_size=4), 1))[0]
    assert (plain["replay_index"] == -1).all()


def test_ewc_needs_a_fisher_and_pulls_back(data, trained):
    with pytest.raises(ValueError, match="needs a Fisher"):
        train_and_eval(tiny_llama(), data, RunConfig("ewc", 1e-2, (1,), batch_size=4, rank=4))
    fisher = demo.estimate_fisher(tiny_llama(), data, params="lora_base", rank=4)
    assert fisher and all(f.min() >= 0 for f in fisher.values()) and fisher.normalize == "token"
    drift = {}
    for lam in (0.0, 1e6):
        model, _ = trained(data, RunConfig("ewc", 1e-2, (4,), batch_size=4, rank=4, ewc_lam=lam), fisher=fisher)
        drift[lam] = sum(float((m.lora_B["default"].weight @ m.lora_A["default"].weight).norm())
                         for m in _lora_sites(model))
    assert drift[1e6] < 0.5 * drift[0.0]


def test_wise_rows_scale_the_adapter_and_restore_it(data):
    model = runs._peft_model(tiny_llama(), RunConfig("naive", 1e-2, (1,), rank=4))
    for m in _lora_sites(model):
        torch.nn.init.normal_(m.lora_B["default"].weight)
    forgetkern.patch(model)
    full = runs.evaluate(model, data)
    rows = demo.wise_rows(model, data, (0.0, 1.0))
    assert rows[1]["metrics"] == pytest.approx(full)
    base = runs.evaluate(tiny_llama(), data)
    assert rows[0]["metrics"] == pytest.approx(base, rel=1e-5)  # alpha 0: the base model
    assert runs.evaluate(model, data) == pytest.approx(full)    # scaling restored


def test_run_config_rejects_bad_values():
    with pytest.raises(ValueError, match="method must be one of"):
        RunConfig("nope", 1e-3, (1,))
    with pytest.raises(ValueError, match="checkpoints"):
        RunConfig("naive", 1e-3, (2, 1))
    with pytest.raises(ValueError, match="lr must be > 0"):
        RunConfig("naive", 0.0, (1,))
