"""Property-based suite over the modes a patched model can meet (hypothesis; profiles in tests/conftest.py).

``forgetkern.patch(peft_model)`` against the same model unpatched, on tiny random PEFT Llama models: outputs and
gradients within the earned tolerance of tests/_patch_helpers.py (against an fp64 run) under no_grad,
inference_mode, eval/train, gradient checkpointing, CPU autocast bf16, deepcopy/pickle, and sequences of
adapter operations (add/switch/disable/merge); the dropout seed rules in train mode; one torch.compile example.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests._patch_helpers import (assert_earned, assert_like_peft, assert_same, fp64_reference, ids, lora_model,
                                  peft, run)
from tests._prop_strategies import examples

from forgetkern.patching import is_patched, patch

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(scope="module")
def models():
    """Unpatched base models: without dropout, and with LoRA dropout 0.1 (small: 1 layer, rank 16)."""
    kw = dict(base_kw=dict(layers=1))
    return {0.0: lora_model("llama", **kw), 0.1: lora_model("llama", lora_dropout=0.1, **kw)}


tokens_st = st.builds(lambda b, s, seed: ids(batch=b, seq=s, seed=seed), st.integers(1, 3), st.integers(2, 12),
                      st.integers(0, 2**16))


def _logits(model, tokens, ctx):
    with ctx():
        return {"logits": model(input_ids=tokens).logits}


def _pickled(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


MODES = ["train", "eval", "eval-dropout", "no_grad", "inference_mode", "checkpointing", "autocast-bf16",
         "deepcopy", "pickle"]


@pytest.mark.parametrize("mode", MODES)
@examples(2)
@given(tokens=tokens_st)
def test_patched_matches_peft_in_mode(models, mode, tokens):
    base = models[0.1 if mode == "eval-dropout" else 0.0]
    pf, fk = copy.deepcopy(base), copy.deepcopy(base)
    report = patch(fk)
    if mode in ("deepcopy", "pickle"):
        fk = copy.deepcopy(fk) if mode == "deepcopy" else _pickled(fk)
        assert is_patched(fk)
    train = mode in ("train", "checkpointing", "deepcopy", "pickle", "autocast-bf16")
    if mode in ("no_grad", "inference_mode"):
        ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
        pf.eval(), fk.eval()
        got, want = _logits(fk, tokens, ctx), _logits(pf, tokens, ctx)
        ref = {"logits": _logits(copy.deepcopy(base).double().eval(), tokens, ctx)["logits"]}
        assert not got["logits"].requires_grad
        assert_earned(got, want, ref, F32, factor=4.0)
        return
    if mode == "checkpointing":
        for m in (pf, fk):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "autocast-bf16":
        with torch.autocast("cpu", dtype=BF16):
            got, want = run(fk, tokens, train=train), run(pf, tokens, train=train)
        assert got["logits"].dtype == want["logits"].dtype == BF16
        assert_like_peft(got, want, fp64_reference(base, tokens, train=train), BF16)
        return
    got, want = run(fk, tokens, train=train), run(pf, tokens, train=train)
    assert_like_peft(got, want, fp64_reference(base, tokens, train=train), F32)
    if mode not in ("deepcopy", "pickle"):
        assert sum(v for k, v in report.call_stats().items() if k.startswith("fused")) > 0


@examples(3)
@given(tokens=tokens_st, seed=st.integers(0, 2**31))
def test_dropout_train_seed_rules(models, tokens, seed):
    """LoRA dropout in train mode: masks differ from PEFT's by design, but torch.manual_seed reproduces them
    bit for bit, another seed changes them, and gradient checkpointing recomputes the same masks."""
    fk = copy.deepcopy(models[0.1])
    patch(fk)
    torch.manual_seed(seed)
    a = run(fk, tokens)
    torch.manual_seed(seed)
    b = run(fk, tokens)
    assert_same(a, b)
    torch.manual_seed(seed + 1)
    c = run(fk, tokens)
    assert not torch.equal(a["logits"], c["logits"])
    fk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    ck = run(fk, tokens)
    for k in a:
        torch.testing.assert_close(ck[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


ADAPTER_OPS = ["set-default", "set-second", "set-both", "disable", "merge-unmerge", "run"]


def _apply(m, op: str):
    if op == "set-default":
        m.base_model.set_adapter("default")
    elif op == "set-second":
        m.base_model.set_adapter("second")
    elif op == "set-both":
        m.base_model.set_adapter(["default", "second"])


def _compare(fk, pf, tokens, op):
    if op == "disable":
        with fk.disable_adapter(), pf.disable_adapter():
            assert_same(run(fk, tokens), run(pf, tokens))
        return
    if op == "merge-unmerge":
        pf.merge_adapter(), fk.merge_adapter()
        a, b = run(fk, tokens, train=False), run(pf, tokens, train=False)
        assert_same({"logits": a["logits"]}, {"logits": b["logits"]})
        pf.unmerge_adapter(), fk.unmerge_adapter()
        return
    got, want = run(fk, tokens), run(pf, tokens)
    assert got.keys() == want.keys()
    for k in want:  # fp32 tiny model: the fused sums differ from PEFT's in the last bits only
        scale = float(want[k].abs().max()) + 1e-30
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


@examples(4)
@given(ops=st.lists(st.sampled_from(ADAPTER_OPS), min_size=1, max_size=4), tokens=tokens_st,
       added_before_patch=st.booleans())
def test_adapter_operations_sequence(models, ops, tokens, added_before_patch):
    """A sequence of adapter switches / disable / merge on a patched model tracks PEFT after every step, the
    second adapter added before or after patch()."""
    pf, fk = copy.deepcopy(models[0.0]), copy.deepcopy(models[0.0])
    cfg = peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)

    def add(m):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            m.add_adapter("second", cfg)

    if added_before_patch:
        add(pf), add(fk)
        patch(fk)
    else:
        patch(fk)
        add(pf), add(fk)
    for op in ops:
        _apply(pf, op), _apply(fk, op)
        _compare(fk, pf, tokens, op)


def test_torch_compile_patched_model(models):
    """One example (compiling is slow): the compiled patched model gives the eager PEFT loss and gradients."""
    pf, fk = copy.deepcopy(models[0.0]), copy.deepcopy(models[0.0])
    patch(fk)
    tokens = ids(batch=2, seq=8)
    fk.train(), pf.train()
    compiled = torch.compile(fk, backend="aot_eager")
    out = compiled(input_ids=tokens, labels=tokens)
    params = [(n, p) for n, p in fk.named_parameters() if p.requires_grad]
    got = dict(zip([n for n, _ in params], torch.autograd.grad(out.loss, [p for _, p in params])))
    ref = pf(input_ids=tokens, labels=tokens)
    pparams = dict(pf.named_parameters())
    want = dict(zip(got, torch.autograd.grad(ref.loss, [pparams[n] for n in got])))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5 * float(want[k].abs().max()), msg=k)
