"""forgetkern.LwF on PEFT models: the teacher is the model with adapters disabled, patched == unpatched."""

import pytest
import torch

import forgetkern
from forgetkern.testing.models import tiny_llama


def _peft(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                                 "up_proj"]))
    with torch.no_grad():  # a trained-looking adapter: the student differs from the teacher
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    labels = torch.where(mask.bool(), ids, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _oracle(model, batch, alpha, T):
    """Full logits of student and of a separate copy of the base model, HF shift, token means."""
    with torch.no_grad():
        with model.disable_adapter():
            zt = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    zs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    y = batch["labels"][:, 1:]
    v = y != -100
    zs, zt = zs[:, :-1][v], zt[:, :-1][v]
    ce = torch.nn.functional.cross_entropy(zs, y[v])
    kl = (torch.softmax(zt / T, -1) * (torch.log_softmax(zt / T, -1) - torch.log_softmax(zs / T, -1))).sum(-1).mean()
    return ce + alpha * T * T * kl, ce


@pytest.mark.parametrize("patched", [False, True])
def test_loss_and_lora_grads_match_full_logit_oracle(patched):
    model = _peft()
    if patched:
        forgetkern.patch(model)
    batch = _batch()
    lwf = forgetkern.LwF(model, alpha=0.5, temperature=2.0)
    loss = lwf.loss(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss, params)
    ref, ce = _oracle(model, batch, 0.5, 2.0)
    g_ref = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lwf.last["ce"], ce.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_alpha_zero_is_the_model_loss_and_fresh_adapter_has_zero_kl():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))  # B = 0: student == teacher
    batch = _batch()
    lwf = forgetkern.LwF(model, alpha=1.0)
    loss = lwf.loss(batch)
    assert float(lwf.last["kl"]) < 1e-10
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-6)
    assert forgetkern.LwF(model, alpha=0.0).loss(batch).requires_grad


def test_teacher_is_the_base_model_and_adapter_stays_enabled():
    model = _peft()
    lwf = forgetkern.LwF(model)
    batch = _batch()
    h_t = lwf.teacher_hidden(batch["input_ids"], batch["attention_mask"])
    base = tiny_llama()
    with torch.no_grad():
        want = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(h_t, want)
    assert not h_t.requires_grad
    h_s = model.get_base_model().model(input_ids=batch["input_ids"]).last_hidden_state  # adapters back on
    assert not torch.allclose(h_s, base.model(input_ids=batch["input_ids"]).last_hidden_state)


def test_labels_default_to_input_ids_under_the_mask():
    model = _peft()
    batch = _batch()
    lwf = forgetkern.LwF(model)
    with torch.no_grad():
        a = lwf.loss(batch)
        b = lwf.loss({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    torch.testing.assert_close(a, b)


def test_errors():
    with pytest.raises(TypeError, match="peft.PeftModel"):
        forgetkern.LwF(tiny_llama())
    model = _peft()
    with pytest.raises(ValueError, match="temperature"):
        forgetkern.LwF(model, temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        forgetkern.LwF(model, alpha=-1)
    with pytest.raises(ValueError, match="input_ids"):
        forgetkern.LwF(model).loss({"labels": torch.zeros(1, 3, dtype=torch.long)})
