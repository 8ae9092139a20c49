"""ForgettingCallback / ForgettingTrainer with a real transformers.Trainer on a tiny model."""

import pytest
import torch

import forgetkern
from forgetkern.data import text_windows
from forgetkern.testing.models import tiny_llama
from tests._text_helpers import ByteTokenizer

transformers = pytest.importorskip("transformers")


class _Windows(torch.utils.data.Dataset):
    def __init__(self, w):
        self.w = w

    def __len__(self):
        return self.w.shape[0]

    def __getitem__(self, i):
        from forgetkern.data import batch_from_windows

        return {k: v[0] for k, v in batch_from_windows(self.w[i:i + 1]).items()}


def _setup(tmp_path, lr, steps):
    from peft import LoraConfig, get_peft_model

    from forgetkern.training import ForgettingCallback

    tok = ByteTokenizer()
    task = text_windows(tok, ["def f(x):\n    return x + 1\n" * 20], length=16)
    general = text_windows(tok, ["the river carries sand to the sea and the fields grow. " * 6], length=16)
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    forgetkern.patch(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                                          learning_rate=lr, eval_strategy="steps", eval_steps=2, logging_steps=2,
                                          report_to=[], save_strategy="no", use_cpu=True, seed=0)
    return model, task, general, args, ForgettingCallback


def test_callback_logs_drop_and_stops_past_threshold(tmp_path):
    model, task, general, args, Cb = _setup(tmp_path, lr=5e-2, steps=20)
    cb = Cb(general, threshold=0.01)
    tr = transformers.Trainer(model=model, args=args, train_dataset=_Windows(task), eval_dataset=_Windows(task[:4]),
                              callbacks=[cb])
    tr.train()
    assert cb.baseline == pytest.approx(forgetkern.eval.perplexity(tiny_llama(), general), rel=1e-6)
    assert cb.stopped_at is not None and cb.stopped_at < 20
    assert tr.state.global_step == cb.stopped_at
    assert cb.history[-1]["general_drop"] > 0.01
    evals = [h for h in tr.state.log_history if "general_drop" in h]
    assert evals and evals[-1]["general_drop"] == pytest.approx(cb.history[-1]["general_drop"])
    assert "eval_loss" in evals[0]  # joined to the Trainer's own evaluation entry


def test_trainer_with_lwf_uses_the_lwf_loss(tmp_path):
    from forgetkern.training import ForgettingCallback, ForgettingTrainer

    model, task, general, args, _ = _setup(tmp_path, lr=1e-2, steps=4)
    lwf = forgetkern.LwF(model, alpha=1.0, temperature=2.0)
    seen = []
    orig = lwf.loss

    def spy(batch):
        out = orig(batch)
        seen.append(float(out.detach()))
        return out

    lwf.loss = spy
    cb = ForgettingCallback(general, threshold=0.5)
    tr = ForgettingTrainer(model=model, args=args, train_dataset=_Windows(task), eval_dataset=_Windows(task[:4]),
                           callbacks=[cb], lwf=lwf)
    tr.train()
    assert len(seen) == 4
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses and all(abs(x) > 0 for x in losses)
    assert cb.stopped_at is None and len(cb.history) >= 2


def test_callback_errors():
    from forgetkern.training import ForgettingCallback

    with pytest.raises(ValueError, match="token windows"):
        ForgettingCallback(torch.zeros(3))
    with pytest.raises(ValueError, match="threshold"):
        ForgettingCallback(torch.zeros(2, 3, dtype=torch.long), threshold=2.0)
