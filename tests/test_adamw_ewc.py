"""forgetkern.optim.AdamW and the fused adamw_ewc_ op: against torch.optim.AdamW, against EWC.apply_() then
AdamW, a float64 AdamW oracle, every backend against the reference, state_dict round trips, bad inputs.

Tolerances against torch.optim.AdamW: torch's CPU single-tensor AdamW rounds differently from the fused kernels
(fused multiply-adds in lerp_/addcmul_, a vector sqrt that is not always correctly rounded, and for bfloat16
parameters a bfloat16 rounding after every op), so it is not bitwise reproducible by any other loop. The bound
is the flash-attention one: after many steps, the fused optimizer's error against a float64 AdamW run on the
same gradients is at most twice torch's own error (plus one unit in the last place of the parameters), and the
two stay within a few units in the last place of each other. Between the backends (reference, C++, Triton
interpreter) the results are bitwise equal: the same IEEE operations in the same order.
"""

import copy

import pytest
import torch

import forgetkern
from forgetkern.ops.adamw_ewc import adamw_ewc_
from tests._helpers import EPS, backends, size_sets

SIZES = size_sets()
_SKIP = {b.values[0]: b.marks for b in backends()}
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}


def _model(dtype=torch.float32, seed=0, zero_size=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(23, 40), torch.nn.Linear(40, 17), torch.nn.Linear(17, 5, bias=False)]
    m = torch.nn.Sequential(*layers)
    if zero_size:
        m.register_parameter("empty", torch.nn.Parameter(torch.zeros(0, 7)))
    return m.to(dtype)


def _set_grads(models, gen, scale=1.0):
    ref = list(models[0].parameters())
    gs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale for p in ref]
    for m in models:
        for p, g in zip(m.parameters(), gs):
            p.grad = g.to(p.dtype)


def _err(m, m64):
    return max((float((p.detach().double() - q.detach()).abs().max()) if p.numel() else 0.0)
               for p, q in zip(m.parameters(), m64.parameters()))


def _max_abs(m):
    return max((float(p.detach().abs().max()) if p.numel() else 0.0) for p in m.parameters())


# ---- vs torch.optim.AdamW, no EWC ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("amsgrad,maximize,wd", [(False, False, 0.01), (True, False, 0.1), (False, True, 0.0),
                                                 (True, True, 0.05)])
def test_matches_torch_adamw_many_steps(dtype, amsgrad, maximize, wd):
    base = _model(dtype, zero_size=True)
    ours, theirs, m64 = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base).double()
    kw = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    o1 = forgetkern.optim.AdamW(ours.parameters(), **kw)
    o2 = torch.optim.AdamW(theirs.parameters(), **kw)
    o3 = torch.optim.AdamW(m64.parameters(), **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        _set_grads([ours, theirs, m64], gen)
        for o in (o1, o2, o3):
            o.step()
    ulp = ULP[dtype] * _max_abs(m64)
    e_ours, e_torch = _err(ours, m64), _err(theirs, m64)
    assert e_ours <= 2 * e_torch + ulp, (e_ours, e_torch)
    for (p, q) in zip(ours.parameters(), theirs.parameters()):
        assert p.dtype == dtype
        if p.numel():
            assert float((p.detach().double() - q.detach().double()).abs().max()) <= 2 * e_torch + 2 * ulp
    # the state: same keys, same step counts (float32 CPU tensors), moments close
    for p, q in zip(ours.parameters(), theirs.parameters()):
        s1, s2 = o1.state[p], o2.state[q]
        assert set(s1) == set(s2)
        assert s1["step"].dtype == s2["step"].dtype and s1["step"].device == s2["step"].device
        assert torch.equal(s1["step"], s2["step"])
        for k in s1:
            if k != "step" and p.numel():
                scale = float(s2[k].double().abs().max()) + 1e-30
                assert float((s1[k].double() - s2[k].double()).abs().max()) <= 0.05 * scale


def test_bf16_matches_torch_fused_adamw():
    """bfloat16: this optimizer rounds once per output from float32 math, as torch's fused AdamW does."""
    base = _model(torch.bfloat16)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    o1 = forgetkern.optim.AdamW(ours.parameters(), lr=1e-2, amsgrad=True)
    o2 = torch.optim.AdamW(theirs.parameters(), lr=1e-2, amsgrad=True, fused=True)
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        _set_grads([ours, theirs], gen)
        o1.step()
        o2.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        # at most one bfloat16 rounding apart per element (fused multiply-adds inside torch's kernel)
        assert float((p.double() - q.double()).abs().max()) <= 2 * EPS[torch.bfloat16] * float(q.abs().max())


def test_param_groups_lr_tensor_and_hundreds_of_tensors():
    torch.manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(0, 50, (300,))]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = lambda ps: [{"params": ps[:100]}, {"params": ps[100:200], "lr": 1e-2, "weight_decay": 0.3},
                         {"params": ps[200:], "lr": torch.tensor(5e-3), "betas": (0.5, 0.9)}]
    o1 = forgetkern.optim.AdamW(groups(params), lr=torch.tensor(1e-3))
    o2 = torch.optim.AdamW(groups(twins), lr=torch.tensor(1e-3))
    gen = torch.Generator().manual_seed(4)
    for it in range(5):
        for p, q in zip(params, twins):
            if it == 2 and p.numel() % 3 == 0:  # some parameters get no gradient in a step: skipped
                p.grad = q.grad = None
                continue
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        o1.step()
        o2.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=8 * EPS[torch.float32] * (1 + (float(q.detach().abs().max()) if q.numel() else 0.0)))
        assert torch.equal(o1.state[p]["step"], o2.state[q]["step"]) if p.numel() else True


def test_lr_float_and_tensor_are_identical_and_zero_grad_inherited():
    base = _model()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    oa = forgetkern.optim.AdamW(a.parameters(), lr=2e-3)
    ob = forgetkern.optim.AdamW(b.parameters(), lr=torch.tensor(2e-3, dtype=torch.float64))
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        _set_grads([a, b], gen)
        oa.step()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    oa.zero_grad()
    assert all(p.grad is None for p in a.parameters())
    assert oa.last_ewc_penalty is None


# ---- state_dict round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_round_trip(direction, tmp_path):
    base = _model()
    first, second = (torch.optim.AdamW, forgetkern.optim.AdamW) if direction == "torch_to_ours" else \
        (forgetkern.optim.AdamW, torch.optim.AdamW)
    a = copy.deepcopy(base)
    oa = first(a.parameters(), lr=1e-2, amsgrad=True, weight_decay=0.2)
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        _set_grads([a], gen)
        oa.step()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, tmp_path / "ckpt.pt")
    ck = torch.load(tmp_path / "ckpt.pt")
    b = copy.deepcopy(base)
    b.load_state_dict(ck["model"])
    ob = second(b.parameters(), lr=1.0, amsgrad=True)  # hyperparameters come from the state_dict
    ob.load_state_dict(ck["opt"])
    assert ob.param_groups[0]["lr"] == 1e-2 and ob.param_groups[0]["weight_decay"] == 0.2
    sd_a, sd_b = oa.state_dict(), ob.state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"]
    for k in sd_a["state"]:
        assert set(sd_a["state"][k]) == set(sd_b["state"][k]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for name in sd_a["state"][k]:
            assert torch.equal(sd_a["state"][k][name], sd_b["state"][k][name])
    # both continue; the resumed optimizer follows the uninterrupted one
    cont = copy.deepcopy(a)
    oc = first(cont.parameters(), lr=1e-2, amsgrad=True, weight_decay=0.2)
    oc.load_state_dict(oa.state_dict())
    for _ in range(4):
        _set_grads([b, cont], gen)
        ob.step()
        oc.step()
    for p, q in zip(b.parameters(), cont.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=8 * EPS[torch.float32] * float(q.abs().max()))


def test_resume_is_bitwise_identical():
    base = _model()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    oa = forgetkern.optim.AdamW(a.parameters(), lr=1e-2)
    ob = forgetkern.optim.AdamW(b.parameters(), lr=1e-2)
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(3):
        _set_grads([a], gen_a)
        oa.step()
        _set_grads([b], gen_b)
        ob.step()
    ob2 = forgetkern.optim.AdamW(b.parameters())
    ob2.load_state_dict(ob.state_dict())
    for _ in range(3):
        _set_grads([a], gen_a)
        oa.step()
        _set_grads([b], gen_b)
        ob2.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ---- with EWC ---------------------------------------------------------------------------------------------------
def _ewc_setup(dtype=torch.float32, state_dtype=torch.float32, lam=2.0, seed=0, mode="separate"):
    m = _model(dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 10)
    fisher = {n: torch.rand(p.shape, generator=gen) for n, p in m.named_parameters()}
    ewc = forgetkern.EWC(m, fisher, lam=lam, state_dtype=state_dtype, mode=mode)
    with torch.no_grad():  # move away from the anchor so the penalty is not 0
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen).to(dtype))
    return m, ewc, fisher


# Triton (interpreter): one dtype pair; test_backends_equal_reference covers the others for the kernel itself.
_PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]
_FUSED_CASES = [pytest.param(b, dt, st, marks=_SKIP[b], id=f"{b}-{dt}-{st}")
                for b in ("torch", "cpp", "cuda", "triton") for dt, st in _PAIRS
                if b != "triton" or (dt, st) == _PAIRS[1]]


@pytest.mark.parametrize("backend,dtype,state_dtype", _FUSED_CASES)
def test_fused_ewc_equals_apply_then_adamw(backend, dtype, state_dtype):
    m1, ewc1, _ = _ewc_setup(dtype, state_dtype)
    m2, ewc2, _ = _ewc_setup(dtype, state_dtype)
    m3 = copy.deepcopy(m2)
    ewc3 = forgetkern.EWC(m3, {n: f for n, f in zip(ewc2.names, ewc2.tasks[0]["fishers"])}, lam=2.0,
                          state_dtype=state_dtype)
    ewc3.tasks = copy.deepcopy(ewc2.tasks)
    fused = forgetkern.optim.AdamW(m1.parameters(), lr=1e-2, amsgrad=True, ewc=ewc1)
    plain = forgetkern.optim.AdamW(m2.parameters(), lr=1e-2, amsgrad=True)
    torch_opt = torch.optim.AdamW(m3.parameters(), lr=1e-2, amsgrad=True)
    gen = torch.Generator().manual_seed(8)
    with forgetkern.use_backend(backend):
        for _ in range(2 if backend == "triton" else 6):
            _set_grads([m1, m2, m3], gen, scale=0.1)
            want_pen = ewc1.penalty().detach()
            fused.step()
            pen2 = ewc2.apply_()
            plain.step()
            ewc3.apply_()
            torch_opt.step()
            got = fused.last_ewc_penalty
            assert got.dim() == 0 and got.dtype == torch.float32
            torch.testing.assert_close(got, want_pen, rtol=1e-5, atol=0)
            if backend == "cpp" and dtype == torch.float32:  # fp32: both runs have the same parameters
                assert torch.equal(got, pen2)  # the same d, summed in the same order as ewc_penalty
    for p1, p2, p3 in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        if dtype == torch.float32:
            # fp32: g + lam F d rounds to the same float in both paths, so the steps are identical
            assert torch.equal(p1, p2)
            torch.testing.assert_close(p1, p3, rtol=0, atol=16 * EPS[dtype] * float(p3.abs().max()))
        else:
            # bf16: the unfused path stores g + lam F d in bfloat16 once more
            torch.testing.assert_close(p1, p2, rtol=0, atol=4 * EPS[dtype] * float(p2.abs().max()))


def test_grad_none_parameters_are_skipped_but_their_penalty_counts():
    m, ewc, _ = _ewc_setup()
    opt = forgetkern.optim.AdamW(m.parameters(), lr=1e-2, ewc=ewc)
    gen = torch.Generator().manual_seed(9)
    _set_grads([m], gen)
    frozen = list(m.parameters())[1]
    frozen.grad = None
    before = frozen.detach().clone()
    want = ewc.penalty().detach()
    opt.step()
    assert torch.equal(frozen, before) and frozen.grad is None and len(opt.state[frozen]) == 0
    torch.testing.assert_close(opt.last_ewc_penalty, want, rtol=1e-6, atol=0)
    # the others moved as with the EWC gradient: compare with apply_ on a twin restricted to them
    m2, ewc2, _ = _ewc_setup()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    _set_grads([m2], torch.Generator().manual_seed(9))
    list(m2.parameters())[1].grad = None
    ps = [p for p in m2.parameters() if p.grad is not None]
    idx = [i for i, p in enumerate(ewc2.params()) if p.grad is not None]
    forgetkern.ewc_penalty_and_grad_(ps, [ewc2.tasks[0]["anchors"][i] for i in idx],
                                     [ewc2.tasks[0]["fishers"][i] for i in idx], lam=ewc2.lam,
                                     grads=[p.grad for p in ps])
    opt2.step()
    for p, q in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=8 * EPS[torch.float32] * float(q.abs().max()))


def test_maximize_keeps_ewc_a_penalty():
    """maximize negates the task gradient; the EWC term still pulls towards the anchor."""
    m1, ewc1, _ = _ewc_setup()
    m2, ewc2, _ = _ewc_setup()
    o1 = forgetkern.optim.AdamW(m1.parameters(), lr=1e-2, maximize=True, ewc=ewc1)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, maximize=True)
    gen = torch.Generator().manual_seed(10)
    for _ in range(3):
        _set_grads([m1, m2], gen)
        # torch's maximize ascends .grad: put the ascent direction of (task - penalty) there
        for p, a, f in zip(ewc2.params(), ewc2.tasks[0]["anchors"], ewc2.tasks[0]["fishers"]):
            p.grad -= ewc2.lam * f * (p.detach() - a)
        o1.step()
        o2.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=16 * EPS[torch.float32] * float(q.abs().max()))


def test_separate_mode_two_tasks_and_lam_change():
    m1, ewc1, fisher = _ewc_setup()
    m2, ewc2, _ = _ewc_setup()
    with torch.no_grad():
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            p1.mul_(0.5)
            p2.mul_(0.5)
    ewc1.consolidate(fisher)
    ewc2.consolidate(fisher)
    o1 = forgetkern.optim.AdamW(m1.parameters(), lr=1e-2, ewc=ewc1)
    o2 = forgetkern.optim.AdamW(m2.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(11)
    for step in range(4):
        if step == 2:
            ewc1.lam = ewc2.lam = 0.5
        _set_grads([m1, m2], gen)
        want = ewc2.apply_()
        o1.step()
        o2.step()
        torch.testing.assert_close(o1.last_ewc_penalty, want, rtol=1e-5, atol=0)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=4 * EPS[torch.float32] * float(q.abs().max()))


def test_delta_w_target_calls_apply_before_the_step():
    from peft import LoraConfig, get_peft_model

    from forgetkern.testing.models import tiny_llama

    def build():
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(seed=0, layers=1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(1)
        fisher = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()
                  if n.endswith(".base_layer.weight") and ("q_proj" in n or "v_proj" in n)}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=g)
        return model, forgetkern.EWC(model, fisher, lam=5.0, target="delta_w")

    m1, e1 = build()
    m2, e2 = build()
    lora1 = [p for n, p in m1.named_parameters() if "lora_" in n]
    lora2 = [p for n, p in m2.named_parameters() if "lora_" in n]
    o1 = forgetkern.optim.AdamW(lora1, lr=1e-2, ewc=e1)
    o2 = torch.optim.AdamW(lora2, lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        for p, q in zip(lora1, lora2):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        want = e2.apply_()
        o1.step()
        o2.step()
        torch.testing.assert_close(o1.last_ewc_penalty, want)
    for p, q in zip(lora1, lora2):
        torch.testing.assert_close(p, q, rtol=0, atol=16 * EPS[torch.float32] * float(q.abs().max()))


# ---- the op: every backend against the reference, bitwise ---------------------------------------------------------
def _op_lists(shapes, dtype, state_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda s, sc=1.0: (torch.randn(s, generator=gen, dtype=torch.float64) * sc).to(dtype)
    params = [r(s) for s in shapes]
    grads = [r(s) for s in shapes]
    ms = [r(s, 0.1) for s in shapes]
    vs = [(r(s, 0.1).double() ** 2).to(dtype) for s in shapes]
    xs = [(v.double() * 1.5).to(dtype) for v in vs]
    anchors = [(p.double() + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(state_dtype)
               for p in params]
    fishers = [torch.rand(p.shape, generator=gen, dtype=torch.float64).to(state_dtype) for p in params]
    return params, grads, ms, vs, xs, anchors, fishers


def _run(backend, lists, *, amsgrad, ewc, maximize=False, lr=1e-2, step=3.0):
    params, grads, ms, vs, xs, anchors, fishers = [[t.clone() for t in L] for L in lists]
    with forgetkern.use_backend(backend):
        pen = adamw_ewc_(params, grads, ms, vs, xs if amsgrad else None, anchors=anchors if ewc else None,
                         fishers=fishers if ewc else None, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=0.1, step=step, lam=0.7, amsgrad=amsgrad, maximize=maximize)
    return pen, params, ms, vs, xs


# The Triton interpreter costs ~1 ms per program and block: it gets fewer, smaller cases than the C++ kernel.
_CASES = [("cpp", sizes, dt, st) for sizes in ["empty", "seven", "65537", "520-tensors", "shapes"]
          for dt, st in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                         (torch.float16, torch.float32), (torch.float64, torch.float64)]]
_CASES += [("triton", "seven", torch.float64, torch.float64), ("triton", "small-shapes", torch.bfloat16, torch.bfloat16),
           ("triton", "12-tensors", torch.float16, torch.float32),
           ("triton", "16385", torch.float32, torch.bfloat16)]  # two chunks of 16384, a masked tail


@pytest.mark.parametrize("backend,sizes,dtype,state_dtype",
                         [pytest.param(*c, marks=_SKIP[c[0]], id=f"{c[0]}-{c[1]}-{c[2]}-{c[3]}") for c in _CASES])
def test_backends_equal_reference(backend, sizes, dtype, state_dtype):
    shapes = SIZES[sizes] if sizes in SIZES else {"16385": [16385], "small-shapes": [(3, 5), (0, 4), (33, 65), (2, 3, 4)],
                                                  "12-tensors": SIZES["520-tensors"][:12]}[sizes]
    lists = _op_lists(shapes, dtype, state_dtype)
    for amsgrad, ewc, maximize in ((False, False, False), (True, True, True)):
        want = _run("torch", lists, amsgrad=amsgrad, ewc=ewc, maximize=maximize)
        got = _run(backend, lists, amsgrad=amsgrad, ewc=ewc, maximize=maximize)
        for name, w, g in zip(("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), want[1:], got[1:]):
            for i, (a, b) in enumerate(zip(w, g)):
                assert a.dtype == b.dtype == dtype
                if dtype == torch.float64:
                    # torch's float64 sqrt/div differ from IEEE's by an ulp at most; p - lr * u can cancel, so
                    # the ulps are those of the operands (O(1) here), not of a result near 0
                    scale = float(a.abs().amax()) if a.numel() else 0.0
                    torch.testing.assert_close(b, a, rtol=4 * EPS[dtype], atol=4 * EPS[dtype] * scale, msg=f"{name}[{i}]")
                elif backend == "triton" and dtype == torch.bfloat16:
                    # the interpreter's bfloat16 stores truncate instead of rounding: one ulp
                    torch.testing.assert_close(b, a, rtol=EPS[dtype], atol=0, msg=f"{name}[{i}]")
                else:
                    assert torch.equal(a, b), f"{backend} {name}[{i}] differs from the reference"
        assert got[0].dtype == want[0].dtype and got[0].dim() == 0
        n = sum(p.numel() for p in lists[0])
        torch.testing.assert_close(got[0], want[0], rtol=8 * EPS[want[0].dtype] * (n ** 0.5 + 8), atol=0)


def test_op_against_float64_oracle():
    """One step of the reference against the formulas in float64 (the docstring's math)."""
    lists = _op_lists([1000, (3, 7)], torch.float32, torch.float32, seed=3)
    pen, params, ms, vs, xs = _run("torch", lists, amsgrad=True, ewc=True, step=5.0)
    p0, g0, m0, v0, x0, a0, f0 = [[t.double() for t in L] for L in lists]
    lam, lr, b1, b2, eps, wd, t = 0.7, 1e-2, 0.9, 0.999, 1e-8, 0.1, 5.0
    want_pen = 0.0
    for i in range(2):
        d = p0[i] - a0[i]
        want_pen += float((lam / 2 * f0[i] * d * d).sum())
        g = g0[i] + lam * f0[i] * d
        m = b1 * m0[i] + (1 - b1) * g
        v = b2 * v0[i] + (1 - b2) * g * g
        x = torch.maximum(x0[i], v)
        p = p0[i] * (1 - lr * wd) - lr / (1 - b1 ** t) * m / (x.sqrt() / (1 - b2 ** t) ** 0.5 + eps)
        for got, want in ((params[i], p), (ms[i], m), (vs[i], v), (xs[i], x)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert abs(pen.item() - want_pen) <= 1e-5 * want_pen


@pytest.mark.parametrize("backend", backends()[:2])  # the schema is the op's; torch and cpp kernels suffice
def test_opcheck(backend):
    lists = _op_lists([17, (4, 9)], torch.float32, torch.bfloat16, seed=4)
    params, grads, ms, vs, xs, anchors, fishers = lists
    with forgetkern.use_backend(backend):
        torch.library.opcheck(torch.ops.forgetkern.adamw_ewc_.default,
                              (params, grads, ms, vs, xs, anchors, fishers, 1e-2, 0.9, 0.999, 1e-8, 0.1, 2.0, 0.5,
                               True, False))
        torch.library.opcheck(torch.ops.forgetkern.adamw_ewc_.default,
                              (params, grads, ms, vs, [], [], [], 1e-2, 0.9, 0.999, 1e-8, 0.1, 2.0, 0.0,
                               False, True))


# ---- bad inputs ---------------------------------------------------------------------------------------------------
def test_bad_hyperparameters_are_refused():
    ps = list(_model().parameters())
    with pytest.raises(ValueError, match="lr must be >= 0"):
        forgetkern.optim.AdamW(ps, lr=-1e-3)
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\)"):
        forgetkern.optim.AdamW(ps, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)"):
        forgetkern.optim.AdamW(ps, betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        forgetkern.optim.AdamW(ps, eps=-1.0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        forgetkern.optim.AdamW(ps, weight_decay=-0.1)
    with pytest.raises(ValueError, match="Tensor lr must have 1 element"):
        forgetkern.optim.AdamW(ps, lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="betas must be a pair"):
        forgetkern.optim.AdamW(ps, betas=(0.9,))


def test_ewc_of_another_model_is_refused():
    m, ewc, _ = _ewc_setup()
    other = _model(seed=1)
    with pytest.raises(ValueError, match="not parameters of this optimizer.*another model"):
        forgetkern.optim.AdamW(other.parameters(), ewc=ewc)
    with pytest.raises(TypeError, match="ewc must be a forgetkern.EWC"):
        forgetkern.optim.AdamW(m.parameters(), ewc={"lam": 1.0})


def test_op_bad_inputs():
    params, grads, ms, vs, xs, anchors, fishers = _op_lists([5, 6], torch.float32, torch.float32)
    kw = dict(lr=1e-3, step=1.0)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.bfloat16 but params\[0\]"):
        adamw_ewc_(params, [g.bfloat16() for g in grads], ms, vs, **kw)
    with pytest.raises(ValueError, match="amsgrad=True needs max_exp_avg_sqs"):
        adamw_ewc_(params, grads, ms, vs, amsgrad=True, **kw)
    with pytest.raises(ValueError, match="both anchors and fishers"):
        adamw_ewc_(params, grads, ms, vs, anchors=anchors, **kw)
    with pytest.raises(TypeError, match=r"fishers\[1\] has dtype torch.bfloat16 but anchors\[1\]"):
        adamw_ewc_(params, grads, ms, vs, anchors=anchors, fishers=[fishers[0], fishers[1].bfloat16()], **kw)
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] has shape"):
        adamw_ewc_(params, grads, [ms[0], ms[1][:3]], vs, **kw)
    with pytest.raises(ValueError, match="step must be >= 1"):
        adamw_ewc_(params, grads, ms, vs, lr=1e-3, step=0.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        adamw_ewc_(params, grads, ms, vs, anchors=anchors, fishers=fishers, lam=-1.0, **kw)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] and exp_avg_sqs\[0\] share memory|share memory"):
        adamw_ewc_(params, grads, ms, [ms[0], vs[1]], **kw)
    with pytest.raises(ValueError, match="not contiguous"):
        adamw_ewc_([params[0].view(1, 5).expand(2, 5).t()], [grads[0].repeat(2).view(5, 2)],
                   [torch.zeros(5, 2)], [torch.zeros(5, 2)], **kw)


def test_non_contiguous_parameters_and_mixed_dtypes_in_one_group():
    torch.manual_seed(12)
    make = lambda: [torch.nn.Parameter(torch.randn(7, 5).t()), torch.nn.Parameter(torch.randn(9)),
                    torch.nn.Parameter(torch.randn(4, 3).bfloat16())]
    ours, theirs = make(), None
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    assert not ours[0].is_contiguous() and not theirs[0].is_contiguous()
    o1, o2 = forgetkern.optim.AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    gen = torch.Generator().manual_seed(13)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            q.grad = p.grad.clone()
        o1.step()
        o2.step()
    for p, q in zip(ours, theirs):
        assert p.stride() == q.stride() and p.dtype == q.dtype
        torch.testing.assert_close(p, q, rtol=0, atol=4 * EPS[p.dtype] * float(q.detach().abs().max()))


@pytest.mark.skipif(_SKIP["triton"] != [], reason="needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("ewc,amsgrad", [(True, True), (False, False)])
def test_triton_moves_each_byte_once(ewc, amsgrad):
    """Counted in the interpreter: p, g, m, v (vmax, p*, F) read once, p, m, v (vmax) written once, one
    workspace slot per program; the chunk-table rows (72 bytes per program) are the only extra."""
    from forgetkern.testing.bytes_moved import count_bytes
    from forgetkern.triton import adamw_ewc as tri

    sizes = [20_000, 768, 7, 16_385, 0, 3_000, 1]
    lists = _op_lists(sizes, torch.float32, torch.bfloat16, seed=14)
    params, grads, ms, vs, xs, anchors, fishers = lists
    with count_bytes() as moved:
        tri.adamw_ewc_(params, grads, ms, vs, xs if amsgrad else [], anchors if ewc else [],
                       fishers if ewc else [], 1e-3, 0.9, 0.999, 1e-8, 0.01, 2.0, 0.5, amsgrad, False)
    n, programs = sum(sizes), sum(-(-k // tri.CHUNK) for k in sizes)
    fp32_lists_read = 4 + amsgrad
    minimum = n * (4 * fp32_lists_read + (2 + 2 if ewc else 0) + 4 * (3 + amsgrad)) + (programs * 4 if ewc else 0)
    assert moved.launches == ["adamw_ewc_kernel"]
    assert minimum <= moved.total <= minimum + programs * 72, (moved.total, minimum)


def test_benchmark_tiny_run_writes_expected_rows(tmp_path):
    """benchmarks/bench_adamw_ewc.py end to end on a 2-layer LoRA list (in this process: no second torch
    import)."""
    import csv
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_adamw_ewc.py"
    spec = importlib.util.spec_from_file_location("bench_adamw_ewc", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--lists", "lora", "--layers", "2", "--repeat", "1", "--copy-mb", "8", "--threads", "1",
                           "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "bench_adamw_ewc.csv", newline="") as f:
        keys = {(r["provider"], r["mode"], r["metric"]) for r in csv.DictReader(f)}
    for prov in ("forgetkern-fused", "apply+torch-foreach", "apply+torch-fused", "apply+torch-forloop"):
        assert {(prov, "lora/ewc", m) for m in ("time", "bandwidth", "copy_bw_frac")} <= keys
    for m in ("speedup_vs_foreach", "speedup_vs_fused", "speedup_vs_forloop"):
        assert ("forgetkern-fused", "lora/ewc", m) in keys
    assert ("torch-fused", "lora/adamw", "time") in keys and ("torch-copy_", "lora/ewc", "bandwidth") in keys
