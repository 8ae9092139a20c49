"""torch.compile on a patched tiny Llama: the graph breaks of a forward (torch._dynamo.explain) are counted and
reported, none may come from forgetkern's patched layers; forward+backward compiled with aot_eager (a counting
backend) gives the eager loss and gradients, and later steps run without recompiling."""

from __future__ import annotations

import pytest
import torch

import forgetkern

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def _model():
    from forgetkern.testing.models import tiny_llama

    base = tiny_llama(hidden=32, intermediate=64, layers=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        m = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=False), autocast_adapter_dtype=False)
    report = forgetkern.patch(m)
    assert report.fused_groups  # q/k/v and gate/up are sibling groups in eager mode
    return m.train()


def _ids():
    return torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def test_patched_forward_has_no_graph_break_in_forgetkern():
    torch._dynamo.reset()
    model, ids = _model(), _ids()  # no eager call first: the very first forward is the one traced
    ex = torch._dynamo.explain(lambda t: model(input_ids=t, labels=t).loss)(ids)
    ours = [(r.reason.splitlines()[0], [f"{f.filename}:{f.lineno}" for f in r.user_stack[-3:]])
            for r in ex.break_reasons if any("forgetkern" in f.filename for f in r.user_stack)]
    print(f"patched tiny Llama forward: {ex.graph_count} graph(s), {ex.graph_break_count} break(s); "
          f"in forgetkern: {ours}")
    assert ours == [], ours
    assert ex.graph_break_count == 0 and ex.graph_count == 1


def test_compiled_forward_backward_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    ids = _ids()
    eager, comp = _model(), _model()
    counter = CompileCounterWithBackend("aot_eager")

    def step(model, t):
        loss = model(input_ids=t, labels=t).loss
        loss.backward()
        return loss.detach()

    cstep = torch.compile(step, backend=counter, fullgraph=False)
    le = step(eager, ids)
    lc = cstep(comp, ids)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    print(f"compiled step: {counter.frame_count} frame(s) compiled, {counter.op_count} ops")
    # the step's frames (dynamo splits at loss.backward()); a break per patched layer would give >= 7 more
    assert counter.frame_count <= 3
    pe = dict(eager.named_parameters())
    for n, p in comp.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, pe[n].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    # later steps run the compiled code: nothing the patched forward touches per call (its call counters) may
    # become a guard that fails on the next call (each step would compile again, then fall back to eager)
    frames = counter.frame_count
    for _ in range(2):
        cstep(comp, ids)
    assert counter.frame_count == frames, f"recompiled: {counter.frame_count - frames} more frame(s)"
