"""ForgettingCallback checkpoints forgetkern state with the Trainer's checkpoints and loads it on resume."""

import os

import pytest
import torch

import forgetkern
from forgetkern.data import text_windows
from forgetkern.testing.models import tiny_llama
from tests._text_helpers import ByteTokenizer
from tests.test_training_callback import _Windows

transformers = pytest.importorskip("transformers")


def _run(tmp_path, steps, resume=None, lam=0.3):
    from peft import LoraConfig, get_peft_model

    from forgetkern.training import ForgettingCallback

    tok = ByteTokenizer()
    task = text_windows(tok, ["def f(x):\n    return x + 1\n" * 20], length=16)
    general = text_windows(tok, ["the river carries sand to the sea. " * 6], length=16)
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    forgetkern.patch(model)
    lora = {n: torch.full(p.shape, 0.5) for n, p in model.named_parameters() if p.requires_grad}
    ewc = forgetkern.EWC(model, lora, lam=lam)
    est = forgetkern.FisherEstimator(model, params="lora")
    cb = ForgettingCallback(general, ewc=ewc, state={"fisher": est}, stop=False, threshold=0.5)

    class Ema(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            est.update_from_grads(decay=0.5)

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                                          learning_rate=1e-2, logging_steps=100, report_to=[], save_strategy="steps",
                                          save_steps=2, use_cpu=True, seed=0)
    tr = transformers.Trainer(model=model, args=args, train_dataset=_Windows(task), callbacks=[cb, Ema()])
    tr.train(resume_from_checkpoint=resume)
    return model, ewc, est, cb


def test_callback_saves_and_resumes_forgetkern_state(tmp_path):
    _, ewc, est, cb = _run(tmp_path, steps=2)
    d = tmp_path / "checkpoint-2" / "forgetkern"
    assert (d / "forgetkern_state.safetensors").is_file() and cb.resumed_from is None
    saved_anchor, saved_ema = ewc.tasks[0]["anchors"][0].clone(), dict(est.fisher)
    model, ewc2, est2, cb2 = _run(tmp_path, steps=3, resume=str(tmp_path / "checkpoint-2"), lam=0.9)
    assert ewc2.lam == 0.3  # the EWC state came from the checkpoint, not from the fresh construction
    assert cb2.resumed_from == str(d)
    assert torch.equal(ewc2.tasks[0]["anchors"][0], saved_anchor)
    assert set(est2.fisher) == set(saved_ema) and est2.num_samples == est.num_samples
    assert os.path.isdir(tmp_path / "checkpoint-3" / "forgetkern")
