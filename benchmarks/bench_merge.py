"""Benchmark: merging task vectors (task arithmetic, TIES, DARE-linear, DARE-TIES) with forgetkern's fused op vs
PEFT's ``peft.utils.merge_utils`` functions and mergekit's ``merge_state_dicts`` (the real packages, same run).

    .venv/bin/python benchmarks/bench_merge.py                       # 4 SmolLM2-135M layers, < 3 min
    .venv/bin/python benchmarks/bench_merge.py --layers 30 --llama     # the whole model + Llama-7B shapes
    .venv/bin/python benchmarks/bench_merge.py --layers 1 --repeat 1 --out /tmp/res

Inputs: a base model and 3 task vectors, float32. ``smollm2``: ``--layers`` layers (SmolLM2-135M has 30) of
{q, o: 576x576; k, v: 192x576; gate, up: 1536x576; down: 576x1536} (3.5 M elements per layer; every layer has
the same shapes, so times scale linearly with the layer count). The default is a 4-layer slice: PEFT's TIES
alone takes about 5 s per layer on the 2-core reference machine, so the 30 layers of every method do not fit
the 3-minute budget. ``--llama`` adds one 4096x4096 and one 11008x4096 tensor (Llama-7B's attention and MLP
shapes; 62 M elements per model, about 1.2 GB for base + 3 task vectors + output). The merged model is
``base + merge(taus)``:

* ``peft``: per tensor, ``base + merge_utils.<method>(taus, weights, density)`` (``task_arithmetic``,
  ``ties``, ``dare_linear``, ``dare_ties``; TIES trims with ``topk``, DARE draws ``torch.bernoulli`` masks);
* ``mergekit``: ``mergekit.merge_methods.merge_state_dicts([base] + models, method, base=0)``, the in-memory
  API over the GeneralizedTaskArithmeticMerge its YAML merges run, on the fine-tuned models ``base + tau_k``
  (formed once, before timing), with mergekit's defaults per method (task vectors weighted before the sign
  vote; TIES normalised by the agreeing weights; TIES trims with ``argsort``; DARE draws ``torch.bernoulli``
  masks and restores each task vector's L1 norm);
* ``forgetkern-<backend>``: ``forgetkern.merge_task_vectors(base, taus, method=...)`` over the whole list
  (thresholds by ``torch.kthvalue``, then one fused pass; DARE masks from the counter-based hash), in PEFT's
  semantics; ``forgetkern-<backend>:mergekit-args`` the same op on the same fine-tuned models as mergekit
  (``subtract_base=True``) with the keywords that give mergekit's merge (DARE rescaled by 1/(1-p), the paper's
  rule, where mergekit matches L1 norms).

Checks before timing: task arithmetic and TIES against PEFT and mergekit (max |diff| relative to max |tau|);
DARE: the kept
fraction of each task is 1 - p within 1 % (the masks differ by construction). Time: median [p20, p80] of
``--repeat`` calls; peak memory: torch CPU allocator bytes above the inputs during one call (torch.profiler),
also per element of the model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import _common as bc  # noqa: E402
import forgetkern  # noqa: E402
from forgetkern import _backend  # noqa: E402

T0 = time.perf_counter()
METHODS = {"task_arithmetic": {}, "ties": {"density": 0.2}, "dare_linear": {"p": 0.9}, "dare_ties": {"p": 0.9}}
WEIGHTS = [0.5, 0.3, 0.2]
# forgetkern keywords that give mergekit's merge with mergekit's defaults for each method
MERGEKIT_ARGS = {"task_arithmetic": {"normalize": "none"}, "ties": {"sign_weighted": True, "normalize": "weight"},
                 "dare_linear": {"normalize": "none"}, "dare_ties": {"sign_weighted": True, "normalize": "none"}}


def smollm2_shapes(layers: int) -> list:
    per = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    return [s for _ in range(layers) for s in per]


def make(shapes, n_tasks, seed):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    taus = [[torch.randn(s, generator=g) * 1e-3 for s in shapes] for _ in range(n_tasks)]
    return base, taus


def peft_merge(method, base, taus, weights):
    from peft.utils import merge_utils as mu

    w = torch.tensor(weights)
    out = []
    for t, b in enumerate(base):
        tt = [tv[t] for tv in taus]
        if method == "task_arithmetic":
            d = mu.task_arithmetic(tt, w)
        elif method == "ties":
            d = mu.ties(tt, w, METHODS["ties"]["density"])
        else:
            d = getattr(mu, method)(tt, w, 1.0 - METHODS[method]["p"])
        out.append(b + d)
    return out


def mergekit_merge(method, base_sd, model_sds, weights):
    from mergekit.merge_methods import merge_state_dicts

    params = {"weight": weights}
    if method == "ties":
        params["density"] = METHODS["ties"]["density"]
    elif method.startswith("dare"):
        params["density"] = 1.0 - METHODS[method]["p"]
    return merge_state_dicts([base_sd] + model_sds, method, base=0, parameters=params)


def fk_merge(method, base, taus, weights, backend, **kw):
    with forgetkern.use_backend(backend):
        return forgetkern.merge_task_vectors(base, taus, method=method, weights=weights, seed=0, **METHODS[method],
                                             **kw)


def check(method, base, taus, got, want, peer="peft") -> str:
    if method in ("task_arithmetic", "ties"):
        scale = max(float(tv[t].abs().max()) for tv in taus for t in range(len(base)))
        err, n_tie, n_diff = 0.0, 0, 0
        for t, (g, w) in enumerate(zip(got, want)):
            d = (g - w).abs()
            if method == "ties":
                # |tau| == threshold: forgetkern keeps every tie (deterministic), PEFT's topk exactly k of them
                thr = forgetkern.merge.magnitude_thresholds([tv[t] for tv in taus], METHODS["ties"]["density"])
                tie = torch.zeros_like(d, dtype=torch.bool)
                for k, tv in enumerate(taus):
                    tie |= tv[t].abs() == thr[k]
                n_tie += int(tie.sum())
                n_diff += int((d > 1e-4 * scale).sum())
                d = d.masked_fill(tie, 0)
            err = max(err, float(d.max()) / scale)
        if err > 1e-4:
            raise AssertionError(f"{method}: forgetkern and {peer} differ by {err:.3g} of max |tau|")
        note = f"max |fk - {peer}| / max |tau| = {err:.2e}"
        if method == "ties":
            note += (f" outside the {n_tie} elements where some |tau_k| equals its threshold ({n_diff} elements "
                     f"differ there: {peer} keeps exactly k of the tied values, forgetkern all)")
        return note
    p = METHODS[method]["p"]
    # single task with weight 1: the kept fraction is visible directly
    one = forgetkern.merge_task_vectors([torch.zeros_like(base[0])], [[taus[0][0]]], method="dare_linear", p=p)[0]
    frac = float((one != 0).double().mean())
    if abs(frac - (1 - p)) > 0.01:
        raise AssertionError(f"{method}: kept fraction {frac:.4f}, expected {1 - p}")
    return f"kept fraction {frac:.4f} (1 - p = {1 - p:g}); masks differ from {peer}'s by construction"


def run_set(res, args, name, shapes, backends):
    base, taus = make(shapes, 3, args.seed)
    size = sum(b.numel() for b in base)
    names = [f"t{t}" for t in range(len(base))]
    models = [[b + tv[t] for t, b in enumerate(base)] for tv in taus]   # mergekit merges fine-tuned models
    base_sd = dict(zip(names, base))
    model_sds = [dict(zip(names, m)) for m in models]
    # the task vectors mergekit (and forgetkern with subtract_base) sees: (base + tau) - base, rounded
    mk_taus = [[m - b for m, b in zip(model, base)] for model in models]
    print(f"\n== {name}: {len(shapes)} tensors, {size:,} elements per model, 3 task vectors", flush=True)
    for method in METHODS:
        provs = {"peft": lambda m=method: peft_merge(m, base, taus, WEIGHTS),
                 "mergekit": lambda m=method: list(mergekit_merge(m, base_sd, model_sds, WEIGHTS).values())}
        for be in backends:
            provs[f"forgetkern-{be}"] = lambda m=method, be=be: fk_merge(m, base, taus, WEIGHTS, be)
            provs[f"forgetkern-{be}:mergekit-args"] = lambda m=method, be=be: fk_merge(
                m, base, models, WEIGHTS, be, subtract_base=True, **MERGEKIT_ARGS[m])
        wants = {"peft": provs["peft"](), "mergekit": provs["mergekit"]()}
        for prov, fn in provs.items():
            if prov.startswith("forgetkern"):
                peer = "mergekit" if prov.endswith(":mergekit-args") else "peft"
                note = check(method, base, mk_taus if peer == "mergekit" else taus, fn(), wants[peer], peer)
                print(f"   {method} {prov}: {note}")
                res.notes.append(f"{name}/{method}/{prov}: {note}")
        del wants
        st = bc.time_interleaved(provs, warmup=0, repeat=args.repeat, budget_s=args.budget_s, min_repeat=1)
        for prov, s in st.items():
            res.add(bc.time_row("merge", prov, f"{name}/{method}", size, s))
        for prov in provs:
            if prov.startswith("forgetkern"):
                peer = "mergekit" if prov.endswith(":mergekit-args") else "peft"
                res.add(bc.Row("merge", prov, f"{name}/{method}", f"speedup_vs_{peer}", size, "x",
                               st[peer].median / st[prov].median, note=f"time({peer}) / time"))
        if not args.no_memory:
            for prov, fn in provs.items():
                mem = bc.peak_memory(lambda fn=fn: fn())
                for how, nb in mem.items():
                    if nb is not None:
                        res.add(bc.Row("merge", prov, f"{name}/{method}", f"peak_mem:{how}", size, "MB",
                                       nb / bc.MB, note=f"{nb / size:.2f} bytes per model element (output: 4); "
                                                        f"{bc.MEMORY_METHODS[how]}"))
        line = ", ".join(f"{p} {s.median:.0f} ms" for p, s in st.items())
        print(f"   {method}: {line}", flush=True)
    del base, taus, models, mk_taus


PEERS = ("peft", "mergekit")   # PEFT's merge_utils and mergekit's merge_state_dicts (the real packages)


def runner_argv(quick: bool, device: str) -> list:
    """Arguments for ``benchmarks/run.py``: ``quick`` merges one SmolLM2 layer."""
    return ["--layers", "1", "--repeat", "1", "--no-memory"] if quick else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="SmolLM2-135M layers (the model has 30)")
    ap.add_argument("--llama", action="store_true", help="add the Llama-7B-shaped tensors")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=20.0, help="per provider and method (0: no budget)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--torch-backend", action="store_true", help="also time the pure-PyTorch reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="bench_merge")
    ap.add_argument("--out", default=str(bc.RESULTS_DIR))
    args = ap.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        args.budget_s = None
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(max(1, threads))
    avail = _backend.availability("cpu", "merge_task_vectors")
    backends = [b for b in ("cpp",) if avail.get(b) is None] + (["torch"] if args.torch_backend else [])
    if not backends:
        backends = ["torch"]
    meta = bc.machine_info("cpu", backends=avail)
    import importlib.metadata

    import peft

    meta.update({"peft_version": peft.__version__, "mergekit_version": importlib.metadata.version("mergekit"), "layers": args.layers, "repeat": args.repeat,
                 "methods": METHODS, "weights": WEIGHTS, "dtype": "float32"})
    res = bc.Results(args.name, meta)
    res.notes.append("peak_mem:torch_alloc counts torch tensors only: forgetkern's C++ TIES threshold selection "
                     "works in a std::vector scratch copy of |tau| (one tensor's worth per thread), which "
                     "peak_mem:rss_hwm includes")
    bc.print_header(f"bench_merge: SmolLM2-135M x {args.layers} layers" + (" + Llama-7B" if args.llama else ""),
                    meta)
    run_set(res, args, "smollm2", smollm2_shapes(args.layers), backends)
    if args.llama:
        run_set(res, args, "llama7b", [(4096, 4096), (11008, 4096)], backends)
    meta["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["wall_s"] = round(time.perf_counter() - T0, 1)
    csv_path, json_path = res.write(args.out)
    print()
    print(res.summary([("time ms [p20, p80]", "time"), ("x vs peft", "speedup_vs_peft"),
                       ("x vs mergekit", "speedup_vs_mergekit"),
                       ("peak MB (torch)", "peak_mem:torch_alloc"), ("peak MB (RSS)", "peak_mem:rss_hwm")]))
    print(f"   wall {meta['wall_s']} s; wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
