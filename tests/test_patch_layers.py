"""Kernel-level earned tolerance: one patched PEFT layer (or one q/k/v sibling group) against the same PEFT
layer, both against an fp64 copy: forgetkern's error <= 2x PEFT's own error (+ 1 ulp), output and every
gradient, in fp32/fp16/bf16, for every layer configuration patch() runs fused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests._patch_helpers import assert_earned, calls, peft

from forgetkern.patching import patch


class Attn(nn.Module):
    """A Llama-style parent: q/k/v read the same input (a sibling group)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(64, 64, bias=bias)
        self.k_proj = nn.Linear(64, 32, bias=bias)
        self.v_proj = nn.Linear(64, 32, bias=bias)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)


def _layer_model(case: str, r: int, dtype):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    holder = nn.Sequential()
    cfg = dict(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=["proj"])
    if case == "siblings":
        holder.add_module("attn", Attn(bias=True))
        cfg["target_modules"] = ["q_proj", "k_proj", "v_proj"]
    elif case == "conv1d":
        holder.add_module("proj", Conv1D(96, 64))
        cfg["fan_in_fan_out"] = True
    else:
        holder.add_module("proj", nn.Linear(64, 96, bias=case != "no_bias"))
    if case == "lora_bias":
        cfg["lora_bias"] = True
    if case == "trainable_bias":
        cfg["bias"] = "all"
    with torch.no_grad():
        for p in holder.parameters():
            p.normal_(0, 0.1)
    model = peft.get_peft_model(holder, peft.LoraConfig(**cfg), autocast_adapter_dtype=False)
    if case == "two_adapters":
        model.add_adapter("b", peft.LoraConfig(r=r // 2 + 1, lora_alpha=3, target_modules=["proj"],
                                               init_lora_weights=False, use_rslora=True))
        model.base_model.set_adapter(["default", "b"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and n.endswith("bias"):
                p.normal_(0, 0.1)
    return model.to(dtype)


def _go(model, x, g) -> dict:
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(g)
    out = {"y": y.detach(), "dx": x.grad}
    out.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return out


CASES = ["no_bias", "bias", "conv1d", "lora_bias", "trainable_bias", "two_adapters", "siblings"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("case", CASES)
def test_layer_error_at_most_twice_peft(case, r, dtype):
    model = _layer_model(case, r, dtype)
    pf, fk = copy.deepcopy(model), copy.deepcopy(model)
    report = patch(fk)
    ref = copy.deepcopy(model).double()
    n_out = 128 if case == "siblings" else 96
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 40, 64, generator=gen).to(dtype)
        g = torch.randn(3, 40, n_out, generator=gen).to(dtype)
        for m in (pf, fk, ref):
            m.zero_grad(set_to_none=True)
        got, want, exact = _go(fk, x, g), _go(pf, x, g), _go(ref, x.double(), g.double())
        assert_earned(got, want, exact, dtype, what=f"{case} r={r} seed={seed}: ")
    kind = "fused (siblings)" if case == "siblings" else "fused"
    assert calls(report, kind) == (6 if case == "siblings" else 2), report.call_stats()


def test_dropout_layer_eval_matches_and_train_differs_from_eval():
    model = _layer_model("bias", 16, torch.float32)
    for m in model.modules():
        if isinstance(m, peft.tuners.lora.layer.Linear):
            m.lora_dropout["default"] = nn.Dropout(0.3)
    pf, fk = copy.deepcopy(model), copy.deepcopy(model)
    patch(fk)
    x = torch.randn(8, 64)
    pf.eval(), fk.eval()
    torch.testing.assert_close(fk(x), pf(x), rtol=2e-6, atol=2e-6)
    fk.train()
    assert not torch.allclose(fk(x), pf(x))


def test_layers_already_wrapped_or_hooked_stay_on_peft():
    model = _layer_model("bias", 16, torch.float32)
    layer = model.base_model.model.proj
    seen = []
    layer.base_layer.register_forward_pre_hook(lambda mod, args: seen.append(1))
    report = patch(model)
    assert not report.patched and "hooked by another library" in report.skipped["base_model.model.proj"]
    model(torch.randn(2, 64))
    assert seen == [1]


def test_quantized_and_other_lora_layer_types_are_refused_by_type():
    from forgetkern.patching.lora import unsupported_reason

    LoraLayer = peft.tuners.lora.layer.LoraLayer
    fake_4bit = type("Linear4bit", (nn.Module, LoraLayer), {"__module__": "peft.tuners.lora.bnb"})
    fake_sub = type("MyLinear", (peft.tuners.lora.layer.Linear,), {"__module__": "mylib"})
    assert "quantized base layer" in unsupported_reason(fake_4bit.__new__(fake_4bit))
    assert "subclasses lora.Linear" in unsupported_reason(fake_sub.__new__(fake_sub))
    emb = peft.tuners.lora.layer.Embedding
    assert "embedding/conv/other" in unsupported_reason(emb.__new__(emb))
