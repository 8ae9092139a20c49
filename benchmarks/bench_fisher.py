"""Benchmark: per-sample Fisher of Linear weights (forgetkern) against BackPACK and torch.func.vmap, one run.

    .venv/bin/python benchmarks/bench_fisher.py                    # layer + model parts (~10 min, 2 cores)
    .venv/bin/python benchmarks/bench_fisher.py --part layer --shapes smollm2 --repeat 3

Layer level (``--part layer``): one ``nn.Linear`` (no bias, fp32), input ``x`` [N, T, in] and output gradient
``g`` [N, T, out] given; every provider produces ``F = sum_n (sum_t g_nt x_nt^T)^2`` (checked against
forgetkern before timing):

* ``forgetkern``: ``linear_persample_sq_grad_(F, x, g)`` (backend ``auto``: the chunked PyTorch path on CPU);
* ``backpack``: BackPACK's ``SumGradSquared`` extension. It runs inside a backward, so the time reported is
  (forward + backward with the extension) minus (forward + plain backward) of the same extended layer, i.e.
  only the extension's own cost; its memory is the peak of the backward with the extension. For sequence
  inputs BackPACK evaluates ``einsum("nmi,nmj,nki,nkj->ij")``, which materialises [N, T, out, in] (5 GB for
  576x576 at N=8, T=512; 10 GB peak measured): it is compared with forgetkern on a reduced problem (N=1 and
  the tokens that fit in ``--backpack-mb``), reported in separate rows;
* ``vmap``: ``torch.func.vmap(torch.func.grad(...))`` per-sample gradients [N, out, in], squared and summed.

Shapes: SmolLM2-135M's q/o (576x576) and gate/up (576->1536) at N=8, T=512, and 4096x4096 at a reduced
N=2, T=256 on this CPU (``--n-big``/``--t-big``). Goals: time >= 2x faster than the best peer; peak extra
memory <= 2x the fp32 weight size. Memory: ``_common.peak_memory`` (torch allocator peak from profiler events,
and the RSS high-water-mark rise).

Model level (``--part model``): ``FisherEstimator.estimate`` over the LoRA factors (r=16 on q/k/v/o/gate/up/
down) of SmolLM2-135M (offline copy; ``tiny`` Llama fallback) on ``--batches`` batches of ``--batch`` x
``--seq`` tokens, against the batched Avalanche way (per batch: zero_grad, mean loss, backward, F += grad^2)
and the per-sample loop (one backward per sample: the exact per-sample Fisher without fused kernels).
``forgetkern-sample-patched`` runs the estimator on a copy patched by ``forgetkern.patch``, where the LoRA
Fisher is added by the fused op's backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import _common as bc  # noqa: E402
from forgetkern.ops.linear_persample_sq_grad import linear_persample_sq_grad_  # noqa: E402

SHAPES = {"smollm2": [("q/o_proj 576x576", 576, 576), ("gate/up 576->1536", 576, 1536)],
          "big": [("4096x4096", 4096, 4096)]}
OP = "linear_persample_sq_grad"
PEERS = ("vmap", "backpack", "avalanche-batched", "per-sample-loop")   # baselines (benchmarks/run.py)


def runner_argv(quick: bool, device: str) -> list:
    """Arguments for ``benchmarks/run.py`` (CPU only: ``device`` is not used). ``quick``: the SmolLM2 layer shapes
    at N=2, T=64 and the model part on the tiny Llama."""
    if quick:
        return ["--shapes", "smollm2", "--n", "2", "--t", "64", "--repeat", "3", "--budget", "2",
                "--backpack-mb", "64", "--tiny", "--batches", "1", "--batch", "2", "--seq", "32",
                "--model-repeat", "2"]
    return []


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- providers
def _forgetkern(x, g):
    f = torch.zeros(g.shape[-1], x.shape[-1])
    return lambda: linear_persample_sq_grad_(f, x, g), lambda: f


def _vmap(x, g):
    from torch.func import grad, vmap

    w = torch.zeros(g.shape[-1], x.shape[-1])
    out = {}

    def loss(w_, xn, gn):
        return ((xn @ w_.t()) * gn).sum()

    def run():
        per = vmap(grad(loss), in_dims=(None, 0, 0))(w, x, g)
        out["f"] = (per * per).sum(0)
    return run, lambda: out["f"]


def _backpack(x, g, extension=True):
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    lin = extend(torch.nn.Linear(x.shape[-1], g.shape[-1], bias=False))

    def run():
        lin.zero_grad(set_to_none=True)
        y = lin(x)
        if extension:
            with backpack(SumGradSquared()):
                y.backward(g)
        else:
            y.backward(g)
    return run, lambda: lin.weight.sum_grad_squared


def bench_layer(res, args) -> None:
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook")
    shapes = [s for key in args.shapes for s in SHAPES[key]]
    for name, d_in, d_out in shapes:
        big = d_in * d_out >= 4096 * 4096
        n, t = (args.n_big, args.t_big) if big else (args.n, args.t)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, t, d_in, generator=gen)
        g = torch.randn(n, t, d_out, generator=gen) / t ** 0.5
        size = d_in * d_out
        wbytes = size * 4
        mode = f"{name} N={n} T={t}"
        log(f"-- {mode}")
        times = _compare(res, mode, size, wbytes, x, g, {"forgetkern": _forgetkern(x, g), "vmap": _vmap(x, g)},
                         args)
        best = min(v for k, v in times.items() if k != "forgetkern")
        res.add(bc.Row(OP, "forgetkern", mode, "speedup_vs_best_peer", size, "x", best / times["forgetkern"],
                       note="peers: vmap (BackPACK cannot hold this problem: see its reduced rows)")).set_goal(2.0)
        if args.backpack:  # BackPACK's einsum holds [N, T, out, in]: same comparison on a problem that fits
            t_sub = max(8, min(t, int(args.backpack_mb * bc.MB) // (2 * wbytes)))
            xs, gs = x[:1, :t_sub].contiguous(), g[:1, :t_sub].contiguous()
            sub = f"{name} N=1 T={t_sub} (BackPACK-sized)"
            log(f"-- {sub}")
            times = _compare(res, sub, size, wbytes, xs, gs,
                             {"forgetkern": _forgetkern(xs, gs), "backpack": _backpack(xs, gs)}, args)
            res.add(bc.Row(OP, "forgetkern", sub, "speedup_vs_best_peer", size, "x",
                           times["backpack"] / times["forgetkern"])).set_goal(2.0)


def _compare(res, mode, size, wbytes, x, g, providers, args) -> dict:
    ref_run, ref_get = _forgetkern(x, g)
    ref_run()
    want = ref_get().clone()
    times = {}
    for prov, (run, get) in providers.items():
        if prov != "forgetkern":
            run()
            torch.testing.assert_close(get(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
        st = bc.time_fn(run, warmup=1, repeat=args.repeat, budget_s=args.budget)
        note = ""
        if prov == "backpack":  # only the extension's cost: subtract the plain backward of the same layer
            plain = bc.time_fn(_backpack(x, g, extension=False)[0], warmup=1, repeat=args.repeat,
                               budget_s=args.budget)
            res.add(bc.time_row(OP, "backpack-fwd+bwd-plain", mode, size, plain))
            res.add(bc.time_row(OP, "backpack-fwd+bwd+ext", mode, size, st))
            ext = max(st.median - plain.median, 1e-6)
            st = bc.Stats(ext, ext, ext, ext, st.n, [])
            note = "extension cost = (fwd+bwd+ext) - (fwd+bwd)"
        times[prov] = st.median
        res.add(bc.time_row(OP, prov, mode, size, st, note=note))
        mem = bc.peak_memory(run)
        for method, val in mem.items():
            if val is None:
                continue
            res.add(bc.Row(OP, prov, mode, f"peak_mem:{method}", size, "MB", val / bc.MB,
                           note=bc.MEMORY_METHODS[method]))
            row = res.add(bc.Row(OP, prov, mode, f"peak_{method}/weight", size, "x", val / wbytes,
                                 note=f"{val / bc.MB:.1f} MB; weight {wbytes / bc.MB:.1f} MB (fp32)"))
            if prov == "forgetkern":
                row.set_goal(2.0, at_least=False)
        log(f"   {prov:<12} {times[prov]:9.1f} ms   peak torch_alloc {mem['torch_alloc'] / bc.MB:8.1f} MB")
    return times


# ---------------------------------------------------------------------------------------------- model level
def _model(args):
    import peft

    from forgetkern.testing import models

    try:
        if args.tiny:
            raise models.ModelUnavailable("--tiny")
        model, _ = models.smollm2()
        label = "SmolLM2-135M"
    except Exception as e:  # offline copy missing: a small random Llama of the same structure
        log(f"   (SmolLM2 unavailable: {e}; using a tiny Llama)")
        model = models.tiny_llama(hidden=192, layers=4, intermediate=512, vocab=2048, heads=6, kv_heads=2)
        label = "tiny-llama"
    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"])
    torch.manual_seed(0)
    return peft.get_peft_model(model, cfg).eval(), label


def _avalanche(model, batches, names):
    """Avalanche's EWCPlugin.compute_importances: per batch zero_grad, mean loss, backward, imp += grad^2."""
    params = dict(model.named_parameters())
    imp = {k: torch.zeros_like(params[k]) for k in names}
    for b in batches:
        model.zero_grad()
        model(**b, labels=b["input_ids"]).loss.backward()
        for k in names:
            imp[k] += params[k].grad.detach() ** 2
    return {k: v / len(batches) for k, v in imp.items()}


def _per_sample_loop(model, batches, names):
    params = dict(model.named_parameters())
    ps = [params[k] for k in names]
    f = {k: torch.zeros_like(params[k]) for k in names}
    count = 0
    for b in batches:
        logits = model(**b).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                b["input_ids"][:, 1:].reshape(-1), reduction="none")
        losses = nll.view(logits.shape[0], -1).sum(1)
        for i in range(losses.shape[0]):
            for k, gr in zip(names, torch.autograd.grad(losses[i], ps, retain_graph=True)):
                f[k] += gr ** 2
            count += 1
    return {k: v / count for k, v in f.items()}


def bench_model(res, args) -> None:
    from forgetkern.fisher import FisherEstimator

    model, label = _model(args)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, vocab, (args.batch, args.seq), generator=gen),
                "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)} for _ in range(args.batches)]
    names = [n for n, p in model.named_parameters() if "lora_" in n]
    nparams = sum(model.get_parameter(n).numel() for n in names)
    mode = f"{label} LoRA r=16 B={args.batch} T={args.seq} x{args.batches}"
    log(f"-- model: {mode}, {nparams:,} LoRA parameters")
    import copy

    import forgetkern

    patched = copy.deepcopy(model)
    forgetkern.patch(patched)  # the LoRA Fisher then rides on the fused op's backward (LoraFisher)
    providers = {
        "forgetkern-sample": lambda: FisherEstimator(model, normalize="sample", params="lora").estimate(batches, progress=False),
        "forgetkern-sample-patched": lambda: FisherEstimator(patched, normalize="sample", params="lora").estimate(
            batches, progress=False),
        "forgetkern-batch": lambda: FisherEstimator(model, normalize="sample", params="lora", granularity="batch").estimate(
            batches, progress=False),
        "avalanche-batched": lambda: _avalanche(model, batches, names),
    }
    if args.per_sample_loop:
        providers["per-sample-loop"] = lambda: _per_sample_loop(model, batches, names)
    out = {k: fn() for k, fn in providers.items()}  # warm-up + correctness
    for k in names:
        torch.testing.assert_close(out["forgetkern-sample-patched"][k], out["forgetkern-sample"][k], rtol=1e-4,
                                   atol=1e-4 * float(out["forgetkern-sample"][k].abs().max()))
    if "per-sample-loop" in out:
        for k in names:
            torch.testing.assert_close(out["forgetkern-sample"][k], out["per-sample-loop"][k], rtol=2e-3,
                                       atol=2e-3 * float(out["per-sample-loop"][k].abs().max()))
    times = {}
    for prov, fn in providers.items():
        st = bc.time_fn(fn, warmup=0, repeat=args.model_repeat)
        times[prov] = st.median
        res.add(bc.time_row("fisher_estimate", prov, mode, nparams, st))
        mem = bc.peak_memory(fn)
        res.add(bc.Row("fisher_estimate", prov, mode, "peak_mem:torch_alloc", nparams, "MB",
                       mem["torch_alloc"] / bc.MB))
        log(f"   {prov:<18} {st.median:9.1f} ms   peak torch_alloc {mem['torch_alloc'] / bc.MB:8.1f} MB")
    res.add(bc.Row("fisher_estimate", "forgetkern-sample", mode, "cost_vs_avalanche", nparams, "x",
                   times["forgetkern-sample"] / times["avalanche-batched"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("layer", "model", "all"), default="all")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--t", type=int, default=512)
    ap.add_argument("--n-big", type=int, default=2)
    ap.add_argument("--t-big", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls per provider at most")
    ap.add_argument("--no-backpack", dest="backpack", action="store_false")
    ap.add_argument("--backpack-mb", type=float, default=1024.0,
                    help="memory for BackPACK's [N, T, out, in] einsum: its problem is cut to N=1 and the tokens "
                         "that fit")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model-repeat", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="model part on a tiny random Llama")
    ap.add_argument("--no-per-sample-loop", dest="per_sample_loop", action="store_false")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(bc.RESULTS_DIR))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backpack:
        try:
            import backpack  # noqa: F401
        except ImportError:
            log("BackPACK not installed (pip install --no-deps backpack-for-pytorch einops unfoldNd): skipped")
            args.backpack = False
    meta = bc.machine_info("cpu")
    res = bc.Results("bench_fisher", meta)
    bc.print_header("bench_fisher: per-sample Fisher of Linear layers", meta)
    if args.part in ("layer", "all"):
        bench_layer(res, args)
    if args.part in ("model", "all"):
        bench_model(res, args)
    print()
    print(res.summary([("time", "time"), ("speedup", "speedup_vs_best_peer"),
                       ("alloc/weight", "peak_torch_alloc/weight"), ("rss/weight", "peak_rss_hwm/weight"),
                       ("peak MB", "peak_mem:torch_alloc"), ("vs avalanche", "cost_vs_avalanche")]))
    paths = res.write(args.out)
    print(f"\nwrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
