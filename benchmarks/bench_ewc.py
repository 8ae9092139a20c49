"""Benchmark: fused EWC penalty + gradient and fused Fisher accumulation vs the usual PyTorch code.

    .venv/bin/python benchmarks/bench_ewc.py                       # ~100 M fp32 parameters
    .venv/bin/python benchmarks/bench_ewc.py --params 10e6 --repeat 5 --threads 2 --out /tmp/res

The parameters are a Llama-shaped list (per layer q, k, v, o, gate, up, down and two RMSNorm vectors, plus
the embedding and the final norm; SmolLM2-135M proportions, 30 layers, hidden size scaled to ``--params``),
i.e. a few hundred tensors from a few hundred elements to tens of millions.

EWC penalty + gradient (``grads += lam * F * (theta - theta*)``, penalty ``lam/2 * sum F d^2``):

* ``avalanche-loop``: Avalanche's ``EWCPlugin`` formulation, a Python loop over ``named_parameters()`` adding
  ``(F * (p - p_star).pow(2)).sum()`` (no 1/2: ``ewc_lambda = lam / 2``), then autograd ``backward()``
  accumulating into the existing ``p.grad``;
* ``avalanche-ewcplugin``: Avalanche EWCPlugin, re-implemented from avalanche-lib 0.6.0 source
  (``benchmarks/_avalanche_ewc.py``: ``EWCPlugin.before_backward`` in ``mode="separate"`` with its
  ``ParamData`` objects and their ``expand`` per step, then ``loss.backward()``); ``avalanche-loop`` is the same
  formulation with plain tensors;
* ``torch-foreach``: ``d = _foreach_sub(P, A)``; ``_foreach_addcmul_(G, F, d, value=lam)``;
  ``_foreach_mul_(d, d)``; ``_foreach_mul_(d, F)``; penalty = ``lam/2 * stack([d_i.sum()]).sum()``: one
  temporary list and 13 x 4 bytes of traffic per element (the fused op needs 5). Reducing with ``torch.dot``
  (11 x 4 bytes) was rejected: its fp32 accumulation missed the penalty by 1.6e-4 relative at 100 M parameters
  (7e-4 on a 23 M-element tensor alone; ``_foreach_norm(ord=1)``: 2e-2);
* ``forgetkern-<backend>``: ``forgetkern.ewc_penalty_and_grad_`` on each backend available here; also with
  anchors and Fisher in bfloat16 (``bf16-state``; native backends only, unless none is available).

Fisher accumulation (``F += g^2``): ``python-loop`` (``for f, g in zip(F, G): f += g**2``),
``torch-foreach-addcmul`` (``_foreach_addcmul_(F, G, G)``) and ``forgetkern-<backend>``.

Every provider is checked before it is timed: penalty against a reference (rtol 1e-4; torch.sum's cascade
summation per tensor, 1e-8 relative on the largest tensor here, added in float64),
gradients / Fisher against a reference computed per tensor (max error within 16 ulp of the tensor's largest
term). Bandwidth = minimum bytes of the op / median time (EWC fp32: read theta, theta*, F, g + write g =
5 x 4 bytes per parameter; bf16 state: 4+2+2+4+4; Fisher: read F, g + write F), also given as a fraction of
the ``dst.copy_(src)`` bandwidth (2 x 256 MiB, same thread count) timed in the same interleaved rounds, so
that load from other processes affects both alike (medians). The copy bandwidth counts read + write bytes,
not the read-for-ownership of ``dst``; the in-place ops need none, so fractions above 1 are possible.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import _avalanche_ewc  # noqa: E402
import _common as bc  # noqa: E402
import forgetkern  # noqa: E402
from forgetkern import _backend  # noqa: E402

EWC, FISHER = "ewc_penalty_and_grad", "fisher_accumulate"
GOALS = {"speedup_vs_avalanche": 4.0, "speedup_vs_foreach": 1.5, "copy_bw_frac": 0.70,
         "speedup_vs_loop": 2.0}
EPS32 = 2.0**-23
T0 = time.perf_counter()
SUMMARY = [("time ms [p20, p80]", "time"), ("GB/s", "bandwidth"), ("copy frac", "copy_bw_frac"),
           ("x avalanche", "speedup_vs_avalanche"), ("x plugin", "speedup_vs_avalanche_plugin"),
           ("x loop", "speedup_vs_loop"),
           ("x foreach", "speedup_vs_foreach")]
NOTES = {"forgetkern-torch": "pure-PyTorch reference fallback",
         "avalanche-ewcplugin": "Avalanche EWCPlugin, re-implemented from avalanche-lib 0.6.0 source"}
PEERS = ("avalanche-ewcplugin", "avalanche-loop", "torch-foreach", "python-loop",
         "torch-foreach-addcmul")   # baselines (benchmarks/run.py)
MEMORY_COLUMNS = {"cuda": [("peak MB", "peak_mem:cuda_alloc")],
                  "cpu": [("peak MB", "peak_mem:torch_alloc"), ("RSS+ MB", "peak_mem:rss_hwm")]}


# ---------------------------------------------------------------------------------------------- model shapes


def llama_shapes(target: float, layers: int = 30) -> list:
    """``(name, shape)`` of a Llama-like model with about ``target`` parameters (SmolLM2-135M proportions)."""
    def r8(x):
        return max(8, int(round(x / 8)) * 8)

    h = r8(math.sqrt(0.77 * target / (layers * 10.67)))   # layers hold ~77 %, 10.67 h^2 per layer
    inter, kv = r8(h * 8 / 3), r8(h / 3)
    vocab = max(16, int(round(0.23 * target / h)))
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,))]


def make_state(shapes, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(shape, std):
        return torch.empty(shape, device=device).normal_(0.0, std, generator=gen)

    params = [rnd(s, 0.02) for _, s in shapes]
    anchors = [rnd(p.shape, 1e-3).add_(p) for p in params]
    fishers = [rnd(p.shape, 1.0).square_() for p in params]           # >= 0, like g^2
    grads = [rnd(p.shape, 1e-3) for p in params]
    return params, anchors, fishers, grads


# ---------------------------------------------------------------------------------------------- providers


class AvalancheModel(torch.nn.Module):
    """Holds the parameters (sharing storage with ``params``) so the loop runs over ``named_parameters()``."""

    def __init__(self, names, params, grads):
        super().__init__()
        for n, p, g in zip(names, params, grads):
            param = torch.nn.Parameter(p)
            param.grad = g
            self.register_parameter(n.replace(".", "_"), param)


def avalanche_step(model, saved, importances, ewc_lambda, device):
    # EWCPlugin.before_backward (one experience), then the strategy's loss.backward().
    penalty = torch.tensor(0).float().to(device)
    for k, cur_param in model.named_parameters():
        new_shape = cur_param.shape
        penalty += (importances[k].expand(new_shape) * (cur_param - saved[k].expand(new_shape)).pow(2)).sum()
    loss = ewc_lambda * penalty
    loss.backward()
    return loss.detach()


def foreach_step(params, anchors, fishers, grads, lam):
    # One temporary list. The per-tensor reductions are .sum() (cascade summation): torch.dot and
    # _foreach_norm(ord=1) would save one pass but lose 1e-3 / 2e-2 relative on a 23M-element fp32 tensor.
    d = torch._foreach_sub(params, anchors)
    torch._foreach_addcmul_(grads, fishers, d, value=lam)
    torch._foreach_mul_(d, d)
    torch._foreach_mul_(d, fishers)
    return torch.stack([x.sum() for x in d]).sum() * (lam / 2)


def fused_step(backend, params, anchors, fishers, grads, lam):
    with forgetkern.use_backend(backend):
        return forgetkern.ewc_penalty_and_grad_(params, anchors, fishers, lam=lam, grads=grads)


def fisher_loop(fishers, grads):
    for f, g in zip(fishers, grads):
        f += g**2


def fisher_fused(backend, fishers, grads):
    with forgetkern.use_backend(backend):
        return forgetkern.fisher_accumulate_(fishers, grads)


def fused_backends(device) -> tuple:
    """(backends to run, {backend: reason skipped})."""
    avail = dict(_backend.availability(device.type))
    if device.type == "cpu" and avail.get("triton") is None:
        avail["triton"] = "TRITON_INTERPRET=1: the Triton interpreter is not a performance backend"
    order = ("cpp", "cuda", "triton", "torch")
    return [b for b in order if avail.get(b) is None], {b: avail[b] for b in order if avail.get(b) is not None}


# ---------------------------------------------------------------------------------------------- checks


def ewc_reference(params, anchors, fishers, g0, lam):
    """Penalty (per-tensor cascade sums, added in float64) and the expected gradients with a per-tensor bound.

    The bound, 16 ulp of the largest term of each tensor (``max|g| + lam * max|F d|``), absorbs the different
    rounding orders of the providers; it catches any real error (missing term, wrong factor, wrong element).
    The unit tests check elementwise precision; this guards the benchmark against timing wrong code.
    """
    total, want, bounds = 0.0, [], []
    for p, a, f, g in zip(params, anchors, fishers, g0):
        d = p.float() - a.float()
        fd = f.float() * d
        want.append(torch.add(g, fd, alpha=lam))
        bounds.append(16 * EPS32 * (_maxabs(g) + lam * _maxabs(fd)) + 1e-38)
        total += float(d.mul_(fd).sum())
        del d, fd
    return lam / 2 * total, want, torch.tensor(bounds, dtype=torch.float64)


def _maxabs(x) -> float:
    return float(torch.linalg.vector_norm(x, math.inf))


def check_close(what, name, got, want, bounds):
    err = torch.stack(torch._foreach_norm(torch._foreach_sub(got, want), math.inf)).double().cpu()
    bad = (err > bounds).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise AssertionError(f"{what}: {name}[{i}] max error {float(err[i]):.3g} > bound {float(bounds[i]):.3g} "
                             f"({len(bad)} tensors off)")


def check_ewc(what, penalty, grads, ref):
    oracle, want, bounds = ref
    got = float(penalty)
    if not abs(got - oracle) <= 1e-4 * abs(oracle) + 1e-30:
        raise AssertionError(f"{what}: penalty {got!r} != reference {oracle!r}")
    check_close(what, "grads", grads, want, bounds)


def fisher_reference(f0, grads):
    want = [torch.addcmul(f, g, g) for f, g in zip(f0, grads)]
    return want, torch.tensor([8 * EPS32 * _maxabs(w) + 1e-38 for w in want], dtype=torch.float64)


def restore(dst, src):
    torch._foreach_copy_(dst, src)


# ---------------------------------------------------------------------------------------------- bench


def measure(res, args, device, op, mode, size, providers, nbytes, probe, notes=None):
    """Time ``providers`` (``[(name, fn)]``) and the copy probe in interleaved rounds, then peak memory."""
    notes = notes or {}
    sts = bc.time_interleaved({**dict(providers), "copy-probe": probe}, device=device, warmup=args.warmup,
                              repeat=args.repeat, budget_s=args.budget_s)
    copy_gbps = probe.gbps(sts["copy-probe"])
    for provider, fn in providers:
        st, note = sts[provider], notes.get(provider, "")
        res.add(bc.time_row(op, provider, mode, size, st, note=(note + f"; {st.n} samples").lstrip("; ")))
        bw = bc.gbps(nbytes, st.median)
        res.add(bc.Row(op, provider, mode, "bandwidth", size, "GB/s", bw, bc.gbps(nbytes, st.p80),
                       bc.gbps(nbytes, st.p20), note="minimum bytes of the op / time"))
        res.add(bc.Row(op, provider, mode, "copy_bw_frac", size, "frac", bw / copy_gbps,
                       note=f"median op bandwidth / median copy bandwidth of the same rounds "
                            f"({copy_gbps:.2f} GB/s)"))
        if not args.no_memory:
            for method, nb in bc.peak_memory(fn, device).items():
                if nb is not None:
                    res.add(bc.Row(op, provider, mode, f"peak_mem:{method}", size, "MB", nb / bc.MB,
                                   note=bc.MEMORY_METHODS[method]))
        gc.collect()
        print(f"   {op:<20} {mode:<10} {provider:<22} {st.median:10.2f} ms  {bw:7.2f} GB/s  (n={st.n}, "
              f"t={time.perf_counter() - T0:.0f} s)", flush=True)
    print(f"   {op:<20} {mode:<10} {'copy-probe':<22} {sts['copy-probe'].median:10.2f} ms  {copy_gbps:7.2f} GB/s")
    res.add(bc.Row("copy", "torch-copy_", f"{op}/{mode}", "bandwidth", probe.bytes_per_buffer // 4, "GB/s",
                   copy_gbps, probe.gbps(sts["copy-probe"], "p80"), probe.gbps(sts["copy-probe"], "p20"),
                   note="dst.copy_(src), read+write bytes, interleaved with the rounds of this group"))


def ratio(res, op, mode, provider, base, metric, size, goal, note=""):
    t, b = res.get(op, provider, mode, "time", size), res.get(op, base, mode, "time", size)
    if t is None or b is None:
        return None
    row = bc.Row(op, provider, mode, metric, size, "x", b.median / t.median, note=note or f"time({base}) / time")
    if goal is not None:
        row.set_goal(goal)
    return res.add(row)


def bench_ewc(res, args, device, names, state, backends, probe, size):
    params, anchors, fishers, grads = state
    lam = 0.4
    ewc_lambda = lam / 2                                   # Avalanche: ewc_lambda * sum F d^2, no 1/2
    g0 = [g.clone() for g in grads]
    ref = ewc_reference(params, anchors, fishers, g0, lam)
    nbytes = sum(p.numel() * (p.element_size() + a.element_size() + f.element_size() + 2 * g.element_size())
                 for p, a, f, g in zip(params, anchors, fishers, grads))
    model = AvalancheModel(names, params, grads)
    keys = [k for k, _ in model.named_parameters()]
    saved, imp = dict(zip(keys, anchors)), dict(zip(keys, fishers))
    mode = "fp32-state"
    plugin = _avalanche_ewc.make_plugin(model, anchors, fishers, ewc_lambda)
    providers = [("avalanche-loop", lambda: avalanche_step(model, saved, imp, ewc_lambda, device)),
                 ("avalanche-ewcplugin", lambda: _avalanche_ewc.plugin_step(plugin, model, device)),
                 ("torch-foreach", lambda: foreach_step(params, anchors, fishers, grads, lam))]
    providers += [(f"forgetkern-{b}", (lambda b=b: fused_step(b, params, anchors, fishers, grads, lam)))
                  for b in backends]
    for name, fn in providers:                             # verify everything before timing anything
        restore(grads, g0)
        pen = fn()
        if name.startswith("avalanche-"):
            assert all(p.grad is g for p, g in zip(model.parameters(), grads)), "grads were not accumulated in place"
        check_ewc(name, pen, grads, ref)
    print(f"   verified {len(providers)} EWC providers against the reference (penalty {ref[0]:.6g}; "
          f"t={time.perf_counter() - T0:.0f} s)", flush=True)
    measure(res, args, device, EWC, mode, size, providers, nbytes, probe, NOTES)
    for b in backends:
        prov = f"forgetkern-{b}"
        note = "pure-PyTorch reference fallback; goals target native kernels" if b == "torch" else ""
        native = b != "torch"   # the goals are the native kernels'; the reference row is shown for context
        ratio(res, EWC, mode, prov, "avalanche-loop", "speedup_vs_avalanche", size,
              GOALS["speedup_vs_avalanche"] if native else None, note)
        ratio(res, EWC, mode, prov, "torch-foreach", "speedup_vs_foreach", size,
              GOALS["speedup_vs_foreach"] if native else None, note)
        ratio(res, EWC, mode, prov, "avalanche-ewcplugin", "speedup_vs_avalanche_plugin", size, None,
              note or "time(Avalanche EWCPlugin, re-implemented from avalanche-lib 0.6.0 source) / time")
        if native:
            res.get(EWC, prov, mode, "copy_bw_frac", size).set_goal(GOALS["copy_bw_frac"])
    del model, saved, imp, providers, ref, plugin
    gc.collect()

    # bf16 state: anchors and Fisher stored in bfloat16 (fused op only), checked against the upcast values.
    # The pure-PyTorch reference runs here only when no native backend is available (it is slow and its
    # fp32-state row already shows it).
    mode = "bf16-state"
    backends = [b for b in backends if b != "torch"] or backends
    anchors16 = [a.to(torch.bfloat16) for a in anchors]
    fishers16 = [f.to(torch.bfloat16) for f in fishers]
    ref = ewc_reference(params, anchors16, fishers16, g0, lam)
    nbytes16 = sum(p.numel() * (p.element_size() + a.element_size() + f.element_size() + 2 * g.element_size())
                   for p, a, f, g in zip(params, anchors16, fishers16, grads))
    for b in backends:
        restore(grads, g0)
        pen = fused_step(b, params, anchors16, fishers16, grads, lam)
        check_ewc(f"forgetkern-{b} bf16", pen, grads, ref)
    measure(res, args, device, EWC, mode, size,
            [(f"forgetkern-{b}", (lambda b=b: fused_step(b, params, anchors16, fishers16, grads, lam)))
             for b in backends], nbytes16, probe, NOTES)
    del anchors16, fishers16, g0, ref
    gc.collect()


def bench_fisher(res, args, device, state, backends, probe, size):
    _, _, fishers, grads = state
    f0 = [f.clone() for f in fishers]
    want, bounds = fisher_reference(f0, grads)
    nbytes = sum(f.numel() * (2 * f.element_size() + g.element_size()) for f, g in zip(fishers, grads))
    mode = "fp32"
    providers = [("python-loop", lambda: fisher_loop(fishers, grads)),
                 ("torch-foreach-addcmul", lambda: torch._foreach_addcmul_(fishers, grads, grads))]
    providers += [(f"forgetkern-{b}", (lambda b=b: fisher_fused(b, fishers, grads))) for b in backends]
    for name, fn in providers:
        restore(fishers, f0)
        fn()
        check_close(name, "fishers", fishers, want, bounds)
    print(f"   verified {len(providers)} Fisher providers against the reference (t={time.perf_counter() - T0:.0f} s)",
          flush=True)
    del f0, want
    gc.collect()
    measure(res, args, device, FISHER, mode, size, providers, nbytes, probe, NOTES)
    for b in backends:
        prov = f"forgetkern-{b}"
        note = "pure-PyTorch reference fallback; goals target native kernels" if b == "torch" else ""
        ratio(res, FISHER, mode, prov, "python-loop", "speedup_vs_loop", size,
              GOALS["speedup_vs_loop"] if b != "torch" else None, note)
        ratio(res, FISHER, mode, prov, "torch-foreach-addcmul", "speedup_vs_foreach", size, None, note)


def runner_argv(quick: bool, device: str) -> list:
    """Arguments for ``benchmarks/run.py``: ``quick`` = 1 M parameters, 3 repeats, a 16 MiB copy probe."""
    base = ["--device", device]
    if quick:
        return base + ["--params", "1e6", "--repeat", "3", "--copy-mb", "16", "--budget-s", "1"]
    return base


def modelled_rows(quick: bool) -> list:
    """Modelled H100 rows (``benchmarks/_ewc_modelled.py``)."""
    from _ewc_modelled import modelled_rows as rows

    return rows(quick)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=100e6, help="total parameters (default 100e6)")
    ap.add_argument("--repeat", type=int, default=10, help="timed calls per provider, at most (default 10)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed calls before timing (default 0: every "
                    "provider has already run once, for the correctness check)")
    ap.add_argument("--budget-s", type=float, default=5.0, help="stop timing a provider after this many "
                    "seconds once it has 3 samples (default 5; 0 = always --repeat)")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: all usable cores)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(bc.RESULTS_DIR), help="output directory (default benchmarks/results)")
    ap.add_argument("--name", default="bench_ewc", help="output file stem (default bench_ewc)")
    ap.add_argument("--copy-mb", type=float, default=256, help="buffer size of the copy-bandwidth probe (MiB)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        args.budget_s = None
    threads = args.threads
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, threads))
    device = torch.device(args.device)
    backends, skipped = fused_backends(device)
    meta = bc.machine_info(device, backends=_backend.availability(device.type))
    meta.update({"params_target": args.params, "repeat": args.repeat, "warmup": args.warmup,
                 "budget_s": args.budget_s})
    res = bc.Results(args.name, meta)
    bc.print_header(f"bench_ewc: {args.params:.3g} parameters on {device}", meta)
    for b, why in skipped.items():
        print(f"   skip forgetkern-{b}: {why}")
        res.notes.append(f"skipped forgetkern-{b}: {why}")

    probe = bc.CopyProbe(int(args.copy_mb * 2**20), device)
    cb = bc.copy_bandwidth(device=device, repeat=max(5, args.repeat), probe=probe)
    meta["copy_bandwidth"] = cb
    res.add(bc.Row("copy", "torch-copy_", "start", "bandwidth", cb["bytes_per_buffer"] // 4, "GB/s",
                   cb["median_gbps"], note=f"dst.copy_(src), read+write bytes, median of {cb['repeat']}; "
                                           f"best {cb['best_gbps']:.2f} GB/s"))
    print(f"   copy bandwidth: best {cb['best_gbps']:.2f} GB/s, median {cb['median_gbps']:.2f} GB/s "
          f"({cb['threads']} threads, 2 x {cb['bytes_per_buffer'] / bc.MB:.0f} MiB)")

    shapes = llama_shapes(args.params)
    state = make_state(shapes, device, args.seed)
    size = sum(p.numel() for p in state[0])
    meta.update({"params": size, "tensors": len(shapes), "largest_tensor": max(p.numel() for p in state[0]),
                 "smallest_tensor": min(p.numel() for p in state[0])})
    print(f"   {size:,} parameters in {len(shapes)} tensors ({meta['smallest_tensor']:,} .. "
          f"{meta['largest_tensor']:,} elements)", flush=True)
    bench_ewc(res, args, device, [n for n, _ in shapes], state, backends, probe, size)
    bench_fisher(res, args, device, state, backends, probe, size)

    meta["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["wall_s"] = round(time.perf_counter() - T0, 1)
    res.notes.append("goals target the native fused kernels (cpp on CPU, cuda/triton on GPU); forgetkern-torch "
                     "is the pure-PyTorch reference fallback")
    csv_path, json_path = res.write(args.out)
    print()
    print(res.summary(SUMMARY + MEMORY_COLUMNS.get(device.type, MEMORY_COLUMNS["cpu"])))
    print()
    goals = [r for r in res.rows if r.status]
    for r in goals:
        print(f"   goal {r.op}/{r.mode} {r.provider} {r.metric} {r.goal}: {r.median:.3g} {r.status}")
    print(f"   load avg start {meta['load_avg_1_5_15']} end {meta['load_avg_end']}; wall {meta['wall_s']} s")
    print(f"   wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
