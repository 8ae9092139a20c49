"""Benchmark: a training step of a forgetkern-patched PEFT LoRA model, eager vs ``torch.compile``.

    .venv/bin/python benchmarks/bench_compile.py                       # tiny Llama + hidden 512 x 4 layers
    .venv/bin/python benchmarks/bench_compile.py --shapes tiny --repeat 10 --no-peft --out /tmp/res
    .venv/bin/python benchmarks/bench_compile.py --shapes tiny --backend eager --repeat 2 --warmup 1 --no-peft

Models (``forgetkern.testing.models.tiny_llama``, fp32, random weights; LoRA r=8, alpha 16, on all seven linears
of every layer, ``init_lora_weights=False`` so that B != 0 and the adapter path carries gradient):

* ``tiny``: hidden 64, 2 layers, intermediate 160, 4 heads / 2 KV heads, vocab 128; batch 4 x 32 tokens;
* ``h512``: hidden 512, 4 layers, intermediate 1376, 8 heads / 4 KV heads, vocab 2048; batch 4 x 128 tokens.

The step: ``loss = model(input_ids=ids, labels=ids).loss``, ``loss.backward()``, ``forgetkern.optim.AdamW`` step
over the LoRA parameters, ``zero_grad``. Providers (each its own copy of the model, same weights, same batch):

* ``forgetkern-eager``: the model after ``forgetkern.patch`` (sibling q/k/v and gate/up layers fused);
* ``forgetkern-compiled``: ``torch.compile(patched model, backend=--backend, dynamic=False)``; under compile
  every patched layer calls forgetkern's op alone and the compiler sees the shared input itself;
* ``peft-eager`` / ``peft-compiled`` (the peers; ``--no-peft`` leaves them out): the same two without
  ``forgetkern.patch``.

Measured: the first compiled step's wall time (Dynamo trace, AOT autograd, Inductor code generation and C++
compilation; in a fresh Inductor cache folder per run unless ``--reuse-cache``, so a run's first compile is a
cold one), the graph breaks and graphs of that compilation (``torch._dynamo.utils.counters``), and, after
``--warmup`` steps of every provider, the steady-state step time: ``--repeat`` interleaved rounds (eager,
compiled, eager, ...), medians and p20/p80, one thread by default. Reported ratio: ``compiled_vs_eager`` =
time(compiled) / time(eager) (< 1: compiling pays). The first step's losses of the compiled and the eager copy
are checked to agree, and no recompilation may happen during timing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import _common as bc  # noqa: E402
import forgetkern  # noqa: E402

OP = "train_step"
SHAPES = {
    "tiny": dict(model=dict(hidden=64, layers=2, intermediate=160, heads=4, kv_heads=2, vocab=128), batch=(4, 32)),
    "h512": dict(model=dict(hidden=512, layers=4, intermediate=1376, heads=8, kv_heads=4, vocab=2048),
                 batch=(4, 128)),
}
LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
SUMMARY = [("time ms [p20, p80]", "time"), ("compiled / eager", "compiled_vs_eager"),
           ("vs peft (same mode)", "time_vs_peft"), ("compile s", "compile_s"), ("graph breaks", "graph_breaks"),
           ("graphs", "graphs")]
PEERS = ("peft-eager", "peft-compiled")


def runner_argv(quick: bool, device: str) -> list:
    """Arguments for ``benchmarks/run.py``: ``quick`` times the patched tiny model only, few rounds. The step runs
    on CPU whatever ``device`` is (``benchmarks/gpu.py`` times the patched LoRA layers on a GPU)."""
    return ["--shapes", "tiny", "--repeat", "5", "--warmup", "2", "--no-peft"] if quick else []


def build(shape: str, patched: bool, seed: int):
    import peft

    from forgetkern.testing.models import tiny_llama

    base = tiny_llama(seed=seed, **SHAPES[shape]["model"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = peft.get_peft_model(base, peft.LoraConfig(**LORA), autocast_adapter_dtype=False)
    if patched:
        report = forgetkern.patch(model)
        if not report.patched or report.skipped:
            raise RuntimeError(f"forgetkern.patch left layers unpatched: {report}")
    return model.train()


def make_step(model, ids):
    opt = forgetkern.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@contextlib.contextmanager
def inductor_cache(fresh: bool):
    """A fresh Inductor/Triton cache folder for the run (the first compile is then a cold one)."""
    if not fresh:
        yield None
        return
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="fk-bench-inductor-") as d:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
        try:
            yield d
        finally:
            if old is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def compile_first_step(step) -> dict:
    """Run the compiled copy's first step; its wall time and what Dynamo counted while compiling it."""
    from torch._dynamo.utils import counters

    counters.clear()
    t0 = time.perf_counter()
    loss = step()
    wall = time.perf_counter() - t0
    breaks = dict(counters["graph_break"])
    return {"loss": loss, "compile_s": wall, "graph_breaks": sum(breaks.values()),
            "graphs": int(counters["stats"]["unique_graphs"]), "break_reasons": breaks}


def run_shape(res, shape: str, args) -> None:
    rows, seq = SHAPES[shape]["batch"]
    ids = torch.randint(1, SHAPES[shape]["model"]["vocab"], (rows, seq), generator=torch.Generator().manual_seed(7))
    tokens = rows * seq
    kinds = ["forgetkern"] + ([] if args.no_peft else ["peft"])
    steps, info = {}, {}
    print(f"\n== {shape}: {SHAPES[shape]['model']}, batch {rows} x {seq}", flush=True)
    for kind in kinds:
        eager, compiled = (build(shape, kind == "forgetkern", args.seed) for _ in range(2))  # same weights
        res.meta.setdefault("params", {})[shape] = sum(p.numel() for p in eager.parameters())
        steps[f"{kind}-eager"] = make_step(eager, ids)
        steps[f"{kind}-compiled"] = make_step(torch.compile(compiled, backend=args.backend, dynamic=False), ids)
        loss_eager = steps[f"{kind}-eager"]()
        first = compile_first_step(steps[f"{kind}-compiled"])
        err = abs(float(first["loss"]) - float(loss_eager))
        if err > 1e-4 * max(1.0, abs(float(loss_eager))):
            raise AssertionError(f"{shape}/{kind}: the compiled first-step loss {float(first['loss']):.6f} differs "
                                 f"from the eager one {float(loss_eager):.6f}")
        info[kind] = first
        print(f"   {kind}: first compiled step {first['compile_s']:.1f} s, {first['graphs']} graph(s), "
              f"{first['graph_breaks']} graph break(s) {first['break_reasons'] or ''}", flush=True)
    from torch._dynamo.utils import counters

    graphs_before = int(counters["stats"]["unique_graphs"])
    st = bc.time_interleaved(steps, warmup=args.warmup, repeat=args.repeat, budget_s=args.budget_s)
    recompiles = int(counters["stats"]["unique_graphs"]) - graphs_before
    if recompiles:
        raise AssertionError(f"{shape}: {recompiles} graph(s) compiled again during timing (a recompile)")
    for prov, s in st.items():
        res.add(bc.time_row(OP, prov, shape, tokens, s, note=f"{s.n} samples; fwd + bwd + AdamW step"))
    for kind in kinds:
        ratio = st[f"{kind}-compiled"].median / st[f"{kind}-eager"].median
        row = res.add(bc.Row(OP, f"{kind}-compiled", shape, "compiled_vs_eager", tokens, "x", ratio,
                             note=f"median time({kind}-compiled) / median time({kind}-eager)"))
        if kind == "forgetkern":
            row.set_goal(1.0, at_least=False)
        first = info[kind]
        res.add(bc.Row(OP, f"{kind}-compiled", shape, "compile_s", tokens, "s", first["compile_s"],
                       note=f"wall time of the first compiled step, backend {args.backend}"
                            + ("" if args.reuse_cache else ", fresh Inductor cache")))
        res.add(bc.Row(OP, f"{kind}-compiled", shape, "graph_breaks", tokens, "count", first["graph_breaks"],
                       note="; ".join(f"{n} x {r}" for r, n in first["break_reasons"].items())))
        res.add(bc.Row(OP, f"{kind}-compiled", shape, "graphs", tokens, "count", first["graphs"],
                       note="unique graphs Dynamo compiled for the model's forward"))
    if not args.no_peft:
        for mode in ("eager", "compiled"):
            res.add(bc.Row(OP, f"forgetkern-{mode}", shape, "time_vs_peft", tokens, "x",
                           st[f"forgetkern-{mode}"].median / st[f"peft-{mode}"].median,
                           note=f"median time(forgetkern-{mode}) / median time(peft-{mode})"))
    line = ", ".join(f"{p} {s.median:.2f} ms" for p, s in st.items())
    print(f"   {line}; compiled / eager {st['forgetkern-compiled'].median / st['forgetkern-eager'].median:.3f}",
          flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="tiny,h512", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (inductor; aot_eager for a "
                                                          "fast check of the script)")
    ap.add_argument("--no-peft", action="store_true", help="time the patched model only (not the PEFT peers)")
    ap.add_argument("--repeat", type=int, default=20, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps of every provider after the first")
    ap.add_argument("--budget-s", type=float, default=30.0, help="stop timing a provider after this many seconds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared machine a "
                    "descheduled OpenMP thread stalls every small matmul of a multi-threaded step)")
    ap.add_argument("--reuse-cache", action="store_true", help="compile with the usual Inductor cache folder "
                                                               "(default: a fresh one, a cold compile)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="bench_compile", help="output file stem")
    ap.add_argument("--out", default=str(bc.RESULTS_DIR), help="output directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s.strip() and s.strip() not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown shape(s) {', '.join(unknown)}; expected some of {', '.join(SHAPES)}")
    return args


def main(argv=None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    meta = bc.machine_info("cpu")
    import peft
    import transformers

    meta.update({"peft_version": peft.__version__, "transformers_version": transformers.__version__,
                 "backend": args.backend, "repeat": args.repeat, "warmup": args.warmup, "lora": LORA,
                 "shapes": {s: SHAPES[s] for s in args.shapes.split(",") if s.strip()}, "dtype": "float32"})
    res = bc.Results(args.name, meta)
    bc.print_header(f"bench_compile: patched PEFT LoRA training step, eager vs torch.compile ({args.backend})", meta)
    with inductor_cache(fresh=not args.reuse_cache):
        for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
            run_shape(res, shape, args)
    torch._dynamo.reset()
    meta["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    print()
    print(res.summary(SUMMARY))
    csv_path, json_path = res.write(args.out)
    print(f"   wall {meta['wall_s']} s; wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
