"""Benchmark: one optimizer step with EWC - forgetkern.optim.AdamW(ewc=...) (one fused pass) vs the unfused
EWC gradient followed by torch.optim.AdamW, on SmolLM2-135M-shaped parameter lists.

    .venv/bin/python benchmarks/bench_adamw_ewc.py                          # both lists, 2 threads
    .venv/bin/python benchmarks/bench_adamw_ewc.py --lists lora --repeat 5 --threads 1 --out /tmp/res

Parameter lists (fp32, SmolLM2-135M: hidden 576, intermediate 1536, 3 KV heads of 64, vocab 49152, 30 layers):

* ``lora``: LoRA r=16 on all seven linears of every layer (210 adapted layers, 420 tensors, 4.9 M parameters):
  q/o A 16x576, B 576x16; k/v A 16x576, B 192x16; gate/up A 16x576, B 1536x16; down A 16x1536, B 576x16.
* ``full``: every parameter of the model (embedding, 7 projections and 2 norms per layer, final norm):
  272 tensors, 134.5 M parameters.

Providers (mode ``ewc``, the step with EWC on every tensor, ``lam`` > 0; mode ``adamw``, the AdamW step alone):

* ``forgetkern-fused``: ``forgetkern.optim.AdamW(params, ewc=ewc).step()`` - one pass, reads p, g, m, v, p*, F,
  writes p, m, v (36 bytes per fp32 parameter);
* ``apply+torch-foreach`` / ``apply+torch-fused`` / ``apply+torch-forloop``: ``ewc.apply_()``
  (``forgetkern.ewc_penalty_and_grad_``, the fused C++ EWC gradient: 20 bytes) then ``torch.optim.AdamW`` with
  ``foreach=True`` / ``fused=True`` (torch's CPU fused kernel) / the default single-tensor loop (28 bytes);
  together 48 bytes per parameter at least;
* mode ``adamw``: ``forgetkern-fused`` without EWC vs ``torch-foreach`` / ``torch-fused`` (28 bytes).

All providers of a list step the SAME parameter, gradient and moment tensors (the torch optimizers' state dicts
are pointed at forgetkern's moments), so the working set is the same for all; they are timed in interleaved
rounds (A, B, C, ..., A, ...) together with a ``dst.copy_(src)`` probe, and the medians are reported. Before
timing, each provider's first step is checked against the fused optimizer on copies (max difference within a
few float32 ulps of the largest parameter). Bandwidth = the provider's minimum bytes / median time, also as a
fraction of the copy bandwidth of the same rounds (the copy counts read + write, not the read-for-ownership of
its destination, so an in-place kernel can exceed 1).
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

import _common as bc  # noqa: E402
import forgetkern  # noqa: E402

OP = "adamw_ewc_step"
GOAL = 1.5  # fused step vs the fastest unfused step
H, INTER, KV, VOCAB, LAYERS, R = 576, 1536, 192, 49152, 30, 16
SUMMARY = [("time ms [p20, p80]", "time"), ("GB/s", "bandwidth"), ("copy frac", "copy_bw_frac"),
           ("x foreach", "speedup_vs_foreach"), ("x torch-fused", "speedup_vs_fused"),
           ("x forloop", "speedup_vs_forloop")]
BYTES = {"forgetkern-fused": 36, "apply+torch-foreach": 48, "apply+torch-fused": 48, "apply+torch-forloop": 48}
BYTES_ADAMW = 28


def lora_shapes(layers: int = LAYERS) -> list:
    out = []
    for i in range(layers):
        for name, fan_in, fan_out in (("q_proj", H, H), ("k_proj", H, KV), ("v_proj", H, KV), ("o_proj", H, H),
                                      ("gate_proj", H, INTER), ("up_proj", H, INTER), ("down_proj", INTER, H)):
            out += [(f"layers.{i}.{name}.lora_A", (R, fan_in)), (f"layers.{i}.{name}.lora_B", (fan_out, R))]
    return out


def full_shapes(layers: int = LAYERS) -> list:
    out = [("embed_tokens", (VOCAB, H))]
    for i in range(layers):
        out += [(f"layers.{i}.{n}", s) for n, s in (
            ("q_proj", (H, H)), ("k_proj", (KV, H)), ("v_proj", (KV, H)), ("o_proj", (H, H)),
            ("gate_proj", (INTER, H)), ("up_proj", (INTER, H)), ("down_proj", (H, INTER)),
            ("input_layernorm", (H,)), ("post_attention_layernorm", (H,)))]
    return out + [("norm", (H,))]


class Holder(torch.nn.Module):
    def __init__(self, shapes, gen):
        super().__init__()
        for n, s in shapes:
            p = torch.nn.Parameter(torch.empty(s).normal_(0, 0.02, generator=gen))
            p.grad = torch.empty(s).normal_(0, 1e-3, generator=gen)
            self.register_parameter(n.replace(".", "_"), p)


def build(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = Holder(shapes, gen)
    fisher = {n: torch.empty(p.shape).normal_(0, 1.0, generator=gen).square_() for n, p in model.named_parameters()}
    ewc = forgetkern.EWC(model, fisher, lam=0.5)
    del fisher
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.empty(p.shape).normal_(0, 1e-3, generator=gen))
    return model, ewc


PEERS = ("apply+torch-foreach", "apply+torch-fused", "apply+torch-forloop", "torch-foreach", "torch-fused")


def runner_argv(quick: bool, device: str) -> list:
    """Arguments for ``benchmarks/run.py``: ``quick`` steps a 2-layer LoRA list only."""
    return ["--lists", "lora", "--layers", "2", "--repeat", "3", "--copy-mb", "32"] if quick else []


def providers(model, ewc, mode):
    params = list(model.parameters())
    kw = dict(lr=1e-4, weight_decay=0.01)
    fused = forgetkern.optim.AdamW(params, ewc=ewc if mode == "ewc" else None, **kw)
    fused.step()  # creates the moments every optimizer below shares
    opts = {"foreach": torch.optim.AdamW(params, foreach=True, **kw),
            "fused": torch.optim.AdamW(params, fused=True, **kw),
            "forloop": torch.optim.AdamW(params, foreach=False, **kw)}
    for o in opts.values():
        for p in params:
            o.state[p] = fused.state[p]
    if mode == "ewc":
        fns = {"forgetkern-fused": fused.step}
        for k, o in opts.items():
            fns[f"apply+torch-{k}"] = (lambda o=o: (ewc.apply_(), o.step()))
    else:
        fns = {"forgetkern-fused": fused.step}
        for k in ("foreach", "fused"):
            fns[f"torch-{k}"] = opts[k].step
    return fns


def check(shapes, mode, names):
    """First step of every provider on fresh copies against the fused optimizer (the same math, rounded
    differently: torch uses FMAs; bound 64 float32 ulps of the largest parameter)."""
    small = shapes[:40]
    model, ewc = build(small, seed=1)
    results = {}
    for name in names:
        m = copy.deepcopy(model)  # (deepcopy does not copy .grad)
        for q, p in zip(m.parameters(), model.parameters()):
            q.grad = p.grad.clone()
        e = forgetkern.EWC(m, {n: f for n, f in zip(ewc.names, ewc.tasks[0]["fishers"])}, lam=ewc.lam)
        e.tasks = copy.deepcopy(ewc.tasks)
        kw = dict(lr=1e-3, weight_decay=0.01)
        ps = list(m.parameters())
        if name == "forgetkern-fused":
            forgetkern.optim.AdamW(ps, ewc=e if mode == "ewc" else None, **kw).step()
        else:
            kind = name.rsplit("-", 1)[1]
            opt = torch.optim.AdamW(ps, foreach=kind == "foreach", fused=True if kind == "fused" else None, **kw)
            if mode == "ewc":
                e.apply_()
            opt.step()
        results[name] = [p.detach().clone() for p in ps]
    ref = results["forgetkern-fused"]
    bound = 64 * 2.0**-23 * max(float(p.abs().max()) for p in ref)
    for name, ps in results.items():
        err = max(float((a - b).abs().max()) for a, b in zip(ps, ref))
        if err > bound:
            raise AssertionError(f"{name} ({mode}): first step differs from forgetkern-fused by {err:.3g} > {bound:.3g}")


def run_list(res, list_name, shapes, args):
    model, ewc = build(shapes, seed=args.seed)
    n = sum(p.numel() for p in model.parameters())
    res.meta[f"{list_name}_params"] = n
    res.meta[f"{list_name}_tensors"] = len(shapes)
    probe = bc.CopyProbe(int(args.copy_mb * bc.MB))
    for mode in ("ewc", "adamw"):
        fns = providers(model, ewc, mode)
        check(shapes, mode, list(fns))
        fns["copy"] = probe
        repeat = args.repeat if list_name == "lora" else max(3, args.repeat // 2)
        st = bc.time_interleaved(fns, warmup=1, repeat=repeat, budget_s=args.budget_s)
        copy_gbps = probe.gbps(st.pop("copy"))
        res.add(bc.Row("copy", "torch-copy_", f"{list_name}/{mode}", "bandwidth", probe.bytes_per_buffer, "GB/s",
                       copy_gbps, note="dst.copy_(src), read+write bytes, median of the same rounds"))
        for name, s in st.items():
            bpe = BYTES.get(name, 36) if mode == "ewc" else (BYTES_ADAMW if name != "forgetkern-fused" else 28)
            res.add(bc.time_row(OP, name, f"{list_name}/{mode}", n, s, note=f"{s.n} samples"))
            bw = bc.gbps(bpe * n, s.median)
            res.add(bc.Row(OP, name, f"{list_name}/{mode}", "bandwidth", n, "GB/s", bw,
                           note=f"{bpe} bytes per parameter (minimum of the provider) / median time"))
            res.add(bc.Row(OP, name, f"{list_name}/{mode}", "copy_bw_frac", n, "frac", bw / copy_gbps,
                           note=f"copy bandwidth of the same rounds: {copy_gbps:.2f} GB/s"))
        ours = st["forgetkern-fused"].median
        prefix = "apply+torch-" if mode == "ewc" else "torch-"
        best = min(s.median for k, s in st.items() if k != "forgetkern-fused")
        for kind in ("foreach", "fused", "forloop"):
            if prefix + kind in st:
                row = res.add(bc.Row(OP, "forgetkern-fused", f"{list_name}/{mode}", f"speedup_vs_{kind}", n, "x",
                                     st[prefix + kind].median / ours, note="median time ratio"))
                if mode == "ewc" and st[prefix + kind].median == best:
                    row.set_goal(GOAL)
        print(f"   {list_name}/{mode}: done ({time.perf_counter() - T0:.0f} s)", flush=True)
    del model, ewc
    gc.collect()


T0 = time.perf_counter()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lists", default="lora,full", help="comma-separated: lora, full (default both)")
    ap.add_argument("--repeat", type=int, default=10, help="timed rounds, at most (full: half, >= 3)")
    ap.add_argument("--budget-s", type=float, default=8.0, help="stop timing a provider after this many seconds")
    ap.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads (default 2)")
    ap.add_argument("--copy-mb", type=float, default=256, help="buffer size of the copy-bandwidth probe (MiB)")
    ap.add_argument("--out", default=str(bc.RESULTS_DIR), help="output directory (default benchmarks/results)")
    ap.add_argument("--name", default="bench_adamw_ewc", help="output file stem")
    ap.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (default 30, SmolLM2-135M)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    meta = bc.machine_info("cpu")
    meta.update({"layers": args.layers, "repeat": args.repeat, "budget_s": args.budget_s, "threads_requested": args.threads,
                 "lam": 0.5, "lr": 1e-4, "weight_decay": 0.01, "dtype": "float32"})
    res = bc.Results(args.name, meta)
    bc.print_header("forgetkern.optim.AdamW(ewc=...) vs EWC.apply_ + torch.optim.AdamW", meta)
    lists = {"lora": lora_shapes, "full": full_shapes}
    for name in [s.strip() for s in args.lists.split(",") if s.strip()]:
        if name not in lists:
            raise SystemExit(f"--lists: unknown list {name!r}; expected lora and/or full")
        run_list(res, name, lists[name](args.layers), args)
    meta["load_avg_end"] = list(__import__("os").getloadavg())
    meta["wall_s"] = round(time.perf_counter() - T0, 1)
    res.notes.append("threads: torch.set_num_threads(%d) (OpenMP of the forgetkern kernels and torch alike); the "
                     "machine is shared, see load_avg_1_5_15 / load_avg_end" % args.threads)
    print(res.summary(SUMMARY))
    csv_path, json_path = res.write(args.out)
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
