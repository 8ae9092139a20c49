"""Benchmark: forgetkern.patch (fused LoRA linear) against PEFT's own LoRA layers, in the same run.

    .venv/bin/python benchmarks/bench_lora.py                          # everything (~10 min on 2 idle cores)
    .venv/bin/python benchmarks/bench_lora.py --part layer --shapes smollm2 --dropout 0
    .venv/bin/python benchmarks/bench_lora.py --part model --seq 256 --rounds 3 --ablate-siblings

Layer level (``--part layer``): one PEFT ``lora.Linear`` (r=16, alpha=32) around a frozen ``nn.Linear``, in
train mode, input ``x`` [tokens, in] requiring grad; providers:

* ``frozen-linear``: the bare base layer ``F.linear(x, W)`` (its backward computes ``dx`` only);
* ``peft``: PEFT's forward; ``forgetkern``: the same layer after ``forgetkern.patch``.

Modes: ``fwd`` (forward with the autograd graph recorded), ``bwd`` (backward of a graph built outside the timed
region), ``fwd+bwd``. LoRA overhead = time(LoRA layer) - time(frozen-linear), per mode; goal: forgetkern's
overhead <= 50 % of PEFT's (fwd+bwd). Bytes saved for backward: every tensor packed by autograd during one
forward, seen through ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage, without the
storages of parameters (W, A, B are held by the model anyway); goal <= PEFT's, <= 60 % of PEFT's with dropout.
Shapes: SmolLM2-135M's projections (576->576 q/o, 576->192 k/v, 576->1536 gate/up, 1536->576 down) at
``--tokens`` tokens, Llama-7B-like ones (4096->4096, 4096->11008) at ``--tokens-7b`` tokens, and a tiny
64x64 layer at 8 tokens whose times are the per-call overhead (Python, dispatch, autograd bookkeeping).

Model level (``--part model``): SmolLM2-135M-Instruct (fp32, offline copy, see forgetkern.testing.models; with
``--model-dtype bfloat16`` also a bfloat16 base with PEFT's default float32 adapters) with
PEFT LoRA r=16, alpha=32 on all linear layers, dropout 0 and 0.1; one training step = forward + loss +
backward + AdamW step + zero_grad on ``--batch`` x ``--seq`` tokens. Step time and peak memory of one step:
``torch_alloc`` = peak live bytes of the torch CPU allocator above those live before the step, from
``torch.profiler`` memory events (``benchmarks/_common.py``); ``rss_hwm`` = rise of the process's resident-set
high-water mark. Goals: >= 1.10x faster with dropout 0, >= 1.3x with dropout 0.1. Breakdown: ``frozen-base`` is
the same step with the adapters disabled (inputs requiring grad, so the backward still runs through every
layer): PEFT step / frozen-base step is the most any LoRA implementation can gain, and
``lora_overhead`` = step - frozen-base step is what each provider spends on LoRA (compute, optimizer, calls).

Bytes (``--part bytes``, no timing): the Triton forward on the SmolLM2 shapes (bf16, ``--bytes-tokens`` rows) run in
the Triton interpreter, its loads and stores counted (``forgetkern.testing.bytes_moved``) and required to equal
the kernels' tile model (each operand panel re-read once per tile of the other side) with y and xa stored
exactly once; next to it the compulsory minimum (inputs read once, outputs written once) and, modelled, the
same tile model with the sm_90 tiles and the compulsory traffic of PEFT's op-by-op forward.

Timing: providers are measured in interleaved rounds (A, B, C, A, B, C, ...) so that load from other processes
on a shared machine hits them alike; median and 20/80 percentiles of the rounds are reported. Every provider is
checked against PEFT (same output and gradients, dropout 0) before it is timed. Results: a table on stdout and
``<out>/bench_lora.csv`` / ``.json`` with torch/peft/transformers versions, machine, load and commit.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common as bc  # noqa: E402
import _lora_bytes  # noqa: E402
from forgetkern.patching import patch, unpatch  # noqa: E402

RANK, ALPHA = 16, 32
SHAPES = {"smollm2": [("q_proj/o_proj", 576, 576), ("k_proj/v_proj", 576, 192), ("gate/up_proj", 576, 1536),
                      ("down_proj", 1536, 576)],
          "llama7b": [("attn 4096x4096", 4096, 4096), ("mlp 4096->11008", 4096, 11008)],
          "tiny": [("per-call overhead", 64, 64)]}
MODES = ("fwd", "bwd", "fwd+bwd")
PEERS = ("peft",)   # baselines (benchmarks/run.py); frozen-linear / frozen-base are lower bounds, not peers


def runner_argv(quick: bool, device: str) -> list:
    """Arguments for ``benchmarks/run.py`` (CPU only). The bytes part needs the Triton interpreter from the start
    of the process: the runner gets it from :func:`modelled_rows` in a child process instead. ``quick``: layer
    level, the tiny and SmolLM2 shapes at 128 tokens, 3 rounds."""
    if quick:
        return ["--part", "layer", "--shapes", "tiny,smollm2", "--tokens", "128", "--rounds", "3"]
    return ["--part", "layer,model"]
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)


def interleaved(fns: dict, *, rounds: int, warmup: int = 1, setups: dict | None = None) -> dict:
    """``{name: Stats}``: each round calls every ``fns[name]`` once (``setups[name]`` first, untimed)."""
    setups = setups or {}
    samples = {n: [] for n in fns}
    for i in range(warmup + rounds):
        names = list(fns) if i % 2 == 0 else list(fns)[::-1]
        for n in names:
            if n in setups:
                setups[n]()
            t0 = time.perf_counter()
            fns[n]()
            if i >= warmup:
                samples[n].append((time.perf_counter() - t0) * 1e3)
    return {n: bc.stats(s) for n, s in samples.items()}


def saved_bytes(forward, params) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during ``forward()``."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------- layer level


def _peft_layer(n_in: int, n_out: int, p: float):
    import peft

    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(n_in, n_out, bias=False))
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p, target_modules=["proj"])
    model = peft.get_peft_model(holder, cfg)
    with torch.no_grad():  # non-zero B, as after some training
        model.base_model.model.proj.lora_B["default"].weight.normal_(0, 0.02)
    return model.train()


def bench_layer(res: bc.Results, label: str, n_in: int, n_out: int, tokens: int, p: float, rounds: int) -> None:
    size = tokens * n_in * n_out
    op, mode_tag = f"lora_linear {label} {n_in}->{n_out} t={tokens}", f"dropout={p:g}"
    pf = _peft_layer(n_in, n_out, p)
    fk = copy.deepcopy(pf)
    patch(fk)
    weight = pf.base_model.model.proj.base_layer.weight.detach()
    x = torch.randn(tokens, n_in).requires_grad_(True)
    g = torch.randn(tokens, n_out) * 0.01
    layers = {"frozen-linear": lambda inp: torch.nn.functional.linear(inp, weight), "peft": pf, "forgetkern": fk}
    trainable = {n: [q for q in (m.parameters() if isinstance(m, nn.Module) else ()) if q.requires_grad]
                 for n, m in layers.items()}

    if p == 0.0:  # correctness before timing
        outs = {}
        for n in ("peft", "forgetkern"):
            x.grad = None
            y = layers[n](x)
            y.backward(g)
            outs[n] = (y.detach(), x.grad.clone(), [q.grad.clone() for q in trainable[n]])
            for q in trainable[n]:
                q.grad = None
        (ya, dxa, ga), (yb, dxb, gb) = outs["forgetkern"], outs["peft"]
        tol = dict(rtol=1e-4, atol=1e-4 * max(1.0, yb.abs().max().item()))
        torch.testing.assert_close(ya, yb, **tol)
        torch.testing.assert_close(dxa, dxb, **tol)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * max(1e-6, b.abs().max().item()))

    def clear(n):
        def f():
            x.grad = None
            for q in trainable[n]:
                q.grad = None
        return f

    graphs: dict = {}

    def build(n):
        def f():
            clear(n)()
            graphs[n] = layers[n](x)
        return f

    per_mode = {
        "fwd": ({n: (lambda n=n: layers[n](x)) for n in layers}, {n: clear(n) for n in layers}),
        "bwd": ({n: (lambda n=n: graphs.pop(n).backward(g)) for n in layers}, {n: build(n) for n in layers}),
        "fwd+bwd": ({n: (lambda n=n: layers[n](x).backward(g)) for n in layers}, {n: clear(n) for n in layers}),
    }
    times = {}
    for mode, (fns, setups) in per_mode.items():
        st = interleaved(fns, rounds=rounds, setups=setups)
        for n, s in st.items():
            res.add(bc.time_row(op, n, f"{mode} {mode_tag}", size, s))
            times[(n, mode)] = s.median
    for mode in MODES:
        o_pf = times[("peft", mode)] - times[("frozen-linear", mode)]
        o_fk = times[("forgetkern", mode)] - times[("frozen-linear", mode)]
        for n, o in (("peft", o_pf), ("forgetkern", o_fk)):
            res.add(bc.Row(op, n, f"{mode} {mode_tag}", "lora_overhead", size, "ms", o))
        row = res.add(bc.Row(op, "forgetkern", f"{mode} {mode_tag}", "overhead_vs_peft", size, "x",
                             o_fk / o_pf if o_pf > 0 else float("nan"),
                             note="forgetkern overhead / PEFT overhead over the frozen linear"))
        if mode == "fwd+bwd":
            row.set_goal(0.5, at_least=False)
    sb = {}
    for n in ("frozen-linear", "peft", "forgetkern"):
        params = [weight] + (list(layers[n].parameters()) if isinstance(layers[n], nn.Module) else [])
        sb[n] = saved_bytes(lambda n=n: layers[n](x), params)
        res.add(bc.Row(op, n, f"fwd {mode_tag}", "saved_bytes", size, "MB", sb[n] / bc.MB))
    res.add(bc.Row(op, "forgetkern", f"fwd {mode_tag}", "saved_vs_peft", size, "x", sb["forgetkern"] / sb["peft"],
                   note="bytes saved for backward, forgetkern / PEFT")).set_goal(0.6 if p > 0 else 1.0,
                                                                                  at_least=False)
    log(f"{op} {mode_tag}: fwd+bwd frozen {times[('frozen-linear', 'fwd+bwd')]:.1f} ms, "
        f"peft {times[('peft', 'fwd+bwd')]:.1f} ms, forgetkern {times[('forgetkern', 'fwd+bwd')]:.1f} ms; "
        f"saved MB peft {sb['peft'] / bc.MB:.1f} forgetkern {sb['forgetkern'] / bc.MB:.1f}")


# ---------------------------------------------------------------------------------------------- model level


def bench_model(res: bc.Results, p: float, batch: int, seq: int, rounds: int, ablate: bool,
                dtype: torch.dtype = torch.float32) -> None:
    import peft

    from forgetkern.testing.models import smollm2

    base, _ = smollm2()
    # a half-precision base gets PEFT's default float32 adapters (autocast_adapter_dtype=True)
    model = peft.get_peft_model(base.to(dtype), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p,
                                                                target_modules="all-linear"))
    with torch.no_grad():
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.02)
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    variants = {"peft": None, "forgetkern": dict(fuse_siblings=True)}
    if ablate:
        variants["forgetkern-nosiblings"] = dict(fuse_siblings=False)
    current = {"name": None}

    def use(name):
        if current["name"] == name:
            return
        unpatch(model)
        if variants[name] is not None:
            patch(model, **variants[name])
        current["name"] = name

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    emb = model.get_input_embeddings()(tokens).detach()

    def frozen_step():  # the same network without LoRA, backward through every layer (dx only)
        with model.disable_adapter():
            loss = model(inputs_embeds=emb.clone().requires_grad_(True), labels=tokens).loss
            loss.backward()
        opt.zero_grad(set_to_none=True)
        return loss

    if p == 0.0:  # same loss and gradients before timing
        grads = {}
        for name in variants:
            use(name)
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            grads[name] = (loss.item(), torch.cat([q.grad.flatten() for q in params]))
            opt.zero_grad(set_to_none=True)
        tol = 1e-4 if dtype == torch.float32 else 1e-2  # 16-bit: the fused sum rounds once, PEFT's twice
        for name in variants:
            l0, g0 = grads["peft"]
            l1, g1 = grads[name]
            assert abs(l1 - l0) <= tol * abs(l0), (name, l1, l0)
            assert (g1 - g0).norm() <= 10 * tol * g0.norm(), (name, (g1 - g0).norm().item(), g0.norm().item())
    tag = "" if dtype == torch.float32 else f" {str(dtype)[6:]}+fp32-adapters"
    op, mode, size = f"smollm2-135m{tag} train step b={batch} s={seq}", f"dropout={p:g}", batch * seq
    fns = {"frozen-base": frozen_step, **{n: step for n in variants}}
    setups = {"frozen-base": lambda: use("peft"), **{n: (lambda n=n: use(n)) for n in variants}}
    st = interleaved(fns, rounds=rounds, setups=setups)
    for n, s in st.items():
        res.add(bc.time_row(op, n, mode, size, s))
    res.add(bc.Row(op, "frozen-base", mode, "speedup_vs_peft", size, "x",
                   st["peft"].median / st["frozen-base"].median,
                   note="upper bound: PEFT step / step without LoRA (what removing all LoRA cost would give)"))
    for n in variants:
        res.add(bc.Row(op, n, mode, "lora_overhead", size, "ms", st[n].median - st["frozen-base"].median,
                       note="step - frozen-base step (LoRA compute + optimizer + per-call overhead)"))
        if n == "peft":
            continue
        res.add(bc.Row(op, n, mode, "speedup_vs_peft", size, "x", st["peft"].median / st[n].median)
                ).set_goal(1.3 if p > 0 else 1.1)
    mem = {}
    for n in variants:
        use(n)
        gc.collect()
        mem[n] = bc.peak_memory(step)
        for method, v in mem[n].items():
            if v is not None:
                res.add(bc.Row(op, n, mode, f"peak_mem:{method}", size, "MB", v / bc.MB,
                               note=bc.MEMORY_METHODS[method]))
    for n in variants:
        if n != "peft":
            a, b = mem[n]["torch_alloc"], mem["peft"]["torch_alloc"]
            res.add(bc.Row(op, n, mode, "peak_mem_vs_peft", size, "x", a / b,
                           note="torch_alloc peak, forgetkern / PEFT")).set_goal(1.0, at_least=False)
    use("peft")
    unpatch(model)
    log(f"{op} {mode}: " + ", ".join(f"{n} {s.median:.0f} ms" for n, s in st.items())
        + "; peak MB " + ", ".join(f"{n} {mem[n]['torch_alloc'] / bc.MB:.0f}" for n in variants))
    del model, base, opt
    gc.collect()


# ---------------------------------------------------------------------------------------------- bytes moved


def bench_bytes(res: bc.Results, tokens: int) -> None:
    _lora_bytes.bench_bytes(res, tokens, SHAPES["smollm2"], RANK, log)


def modelled_rows(quick: bool) -> list:
    """Modelled H100 times of the LoRA forward on the SmolLM2 shapes (``benchmarks/_lora_bytes.py``)."""
    return _lora_bytes.modelled_rows(quick, SHAPES["smollm2"], RANK)


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="layer,model,bytes", help="comma list of: layer, model, bytes")
    ap.add_argument("--bytes-tokens", type=int, default=512, help="tokens for the bytes-moved count")
    ap.add_argument("--shapes", default="tiny,smollm2,llama7b", help="comma list of: tiny (64x64, 8 tokens: "
                                                                     "per-call overhead), smollm2, llama7b")
    ap.add_argument("--dropout", default="0,0.1", help="comma list of LoRA dropout rates")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens for the SmolLM2 layer shapes")
    ap.add_argument("--tokens-7b", type=int, default=256, help="tokens for the Llama-7B-like layer shapes")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per layer benchmark")
    ap.add_argument("--model-rounds", type=int, default=6, help="timed training steps per provider")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model-dtype", default="float32", help="comma list of float32, bfloat16 (a bfloat16 base "
                                                             "with PEFT's default float32 adapters)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--ablate-siblings", action="store_true", help="model level: also forgetkern without "
                                                                    "sibling fusion")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads; default 1: on a shared 2-core machine, OpenMP barriers across "
                         "2 threads turn other processes' load into large, provider-dependent stalls")
    ap.add_argument("--out", default=str(bc.RESULTS_DIR))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = set(args.part.split(","))
    if "bytes" in parts:  # before any Triton kernel is defined
        __import__("os").environ["TRITON_INTERPRET"] = "1"
    dropouts = [float(v) for v in args.dropout.split(",")]
    import peft
    import transformers

    meta = bc.machine_info("cpu")
    meta.update(peft=peft.__version__, transformers=transformers.__version__, rank=RANK, alpha=ALPHA,
                args=vars(args))
    res = bc.Results("bench_lora", meta)
    bc.print_header("forgetkern.patch vs PEFT LoRA (CPU)", meta)
    print(f"   peft {peft.__version__} | transformers {transformers.__version__}")
    if "layer" in parts:
        for shape_set in args.shapes.split(","):
            tokens = {"smollm2": args.tokens, "llama7b": args.tokens_7b, "tiny": 8}[shape_set]
            rounds = {"smollm2": args.rounds, "llama7b": max(3, args.rounds // 2), "tiny": 50}[shape_set]
            for label, n_in, n_out in SHAPES[shape_set]:
                for p in dropouts:
                    bench_layer(res, label, n_in, n_out, tokens, p, rounds)
                    gc.collect()
    if "bytes" in parts:
        bench_bytes(res, args.bytes_tokens)
    if "model" in parts:
        for dt in args.model_dtype.split(","):
            for p in dropouts:
                bench_model(res, p, args.batch, args.seq, args.model_rounds, args.ablate_siblings,
                            getattr(torch, dt))
    res.meta["load_avg_end"] = list(__import__("os").getloadavg())
    res.meta["wall_s"] = time.perf_counter() - T0
    print()
    print(res.summary([("time ms [p20, p80]", "time"), ("overhead ms", "lora_overhead"),
                       ("overhead/PEFT", "overhead_vs_peft"), ("saved MB", "saved_bytes"),
                       ("saved/PEFT", "saved_vs_peft"), ("x PEFT", "speedup_vs_peft"),
                       ("peak MB (torch_alloc)", "peak_mem:torch_alloc"), ("RSS+ MB", "peak_mem:rss_hwm"),
                       ("peak/PEFT", "peak_mem_vs_peft"), ("MB moved", "bytes_moved"),
                       ("min/PEFT", "min_vs_peft")]))
    paths = res.write(args.out)
    print(f"\nload average at the end: {res.meta['load_avg_end']}; wrote {paths[0]} and {paths[1]} "
          f"({res.meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
