"""Benchmark: the orthogonal-projection ops (O-LoRA loss, GPM / OPLoRA projections) vs their published formulations.

    .venv/bin/python benchmarks/bench_projection.py                   # SmolLM2-135M adapter shapes, < 2 min
    .venv/bin/python benchmarks/bench_projection.py --layers 4 --repeat 3 --out /tmp/res

Shapes: SmolLM2-135M's LoRA sites written out (no model load): 30 layers x q, k, v, o, gate, up, down (hidden
576, kv dim 192, intermediate 1536), rank r = 16: 210 adapted layers, A (16 x in), B (out x 16).

Providers, each checked against a float64 reference before it is timed:

O-LoRA loss + backward (``sum_i |A_past_i A_i^T|``, one past task: A_past 16 x in):

* ``olora-repo-loop`` (re-implemented from the O-LoRA code's ``compute_loss``, labelled so): a Python loop over
  ``model.named_parameters()`` that, for every ``lora_A`` parameter, scans ``named_parameters()`` again for
  the matching ``loranew_A`` and adds ``torch.abs(torch.mm(param, param_.T)).sum()``, then logs the loss with
  ``.item()`` (a host sync) before ``backward()``. The model holds the base weights too (on the ``meta``
  device: their names are scanned, no memory is used), as a real PEFT model's ``named_parameters()`` does;
* ``forgetkern-<backend>``: ``forgetkern.olora_loss(past, cur)`` + ``backward()`` (fused backward).

GPM gradient projection of the A gradients (``g <- g - g U U^T``, basis k = 96 for in = 576, 256 for 1536):

* ``gpm-dense-projector`` (re-implemented from GPM's training loop, labelled so): per layer a precomputed dense
  ``feature_mat = U U^T`` (in x in) and ``g <- g - g @ feature_mat`` in a Python loop over the parameters;
* ``torch-loop-skinny``: the same loop with the skinny products ``g - (g U) U^T`` (no in x in matrix);
* ``forgetkern-<backend>``: ``forgetkern.project_out_(grads, bases, side="right")``, one call (argument checks
  included); ``forgetkern-<backend>-prechecked``: the same op without the per-call checks, as ``GPM.project_()``
  calls it once it has checked its layers.

OPLoRA projection of both factors (``B <- B - U_k U_k^T B``, ``A <- A - A V_k V_k^T``, k = 16):
``torch-loop-skinny`` (per-layer skinny products) vs ``forgetkern-<backend>`` (two calls). Memory of the
dense projectors GPM keeps is reported as ``state_MB`` rows.

Time per call: interleaved rounds of the providers (``benchmarks/_common.py``), median and 20/80 percentiles.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import forgetkern  # noqa: E402
from forgetkern import _backend  # noqa: E402
from forgetkern.ops.project_out import project_out_prechecked_  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bc  # noqa: E402

T0 = time.perf_counter()
HIDDEN, KV, INTER, R = 576, 192, 1536, 16
PROJ = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}  # (out, in)


def smollm2_sites(layers: int):
    return [(f"model.layers.{i}.{name}", out, inn) for i in range(layers) for name, (out, inn) in PROJ.items()]


class _Proj(torch.nn.Module):
    """A LoRA site as the O-LoRA code's model holds it: base weight, the past ``lora_A`` and the new ``loranew_A``."""

    def __init__(self, out, inn, past, cur):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out, inn, device="meta"), requires_grad=False)
        self.lora_A = torch.nn.Parameter(past, requires_grad=False)
        self.loranew_A = torch.nn.Parameter(cur)


class _Model(torch.nn.Module):
    def __init__(self, sites, past, cur):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        per_layer = len(PROJ)
        for start in range(0, len(sites), per_layer):
            block = torch.nn.Module()
            for j, (name, out, inn) in enumerate(sites[start:start + per_layer]):
                block.add_module(name.rsplit(".", 1)[1], _Proj(out, inn, past[start + j], cur[start + j]))
            self.layers.append(block)


def olora_repo_loop(model):
    """The O-LoRA code's loss loop (re-implemented): nested ``named_parameters()`` scan, ``.item()`` logging."""
    orthogonal_loss = 0.0
    for name, param in model.named_parameters():
        if "lora_A" in name:
            for name_, param_ in model.named_parameters():
                if "loranew_A" in name_ and name.split("lora_A")[0] == name_.split("loranew_A")[0]:
                    orthogonal_loss += torch.abs(torch.mm(param, param_.T)).sum()
                    break
    _logged = orthogonal_loss.item()  # the code logs the loss every step
    return orthogonal_loss


def _bases(sites, k_of, gen, device):
    out = []
    for _, _, inn in sites:
        out.append(torch.linalg.qr(torch.randn(inn, k_of(inn), generator=gen, dtype=torch.float64))[0].float()
                   .to(device).contiguous())
    return out


def _check(name, got, want, rtol):
    err = max(float((g.double() - w).abs().max()) / max(float(w.abs().max()), 1e-30) for g, w in zip(got, want))
    if err > rtol:
        raise SystemExit(f"{name}: result off by {err:.3g} relative (> {rtol:g}); not timing a wrong provider")
    return err


def bench_olora(res, args, device, sites, backends, size):
    gen = torch.Generator().manual_seed(args.seed)
    past = [(torch.randn(R, inn, generator=gen) * 0.05).to(device) for _, _, inn in sites]
    cur = [(torch.randn(R, inn, generator=gen) * 0.05).to(device).requires_grad_() for _, _, inn in sites]
    model = _Model(sites, [p.clone() for p in past], [c.detach().clone() for c in cur])
    loop_params = [m.loranew_A for m in model.modules() if isinstance(m, _Proj)]
    want = sum(float((p.double() @ c.detach().double().t()).abs().sum()) for p, c in zip(past, cur))
    want_g = [torch.sign(p.double() @ c.detach().double().t()).t() @ p.double() for p, c in zip(past, cur)]

    def run_loop():
        for p in loop_params:
            p.grad = None
        loss = olora_repo_loop(model)
        loss.backward()
        return loss

    fns = {"olora-repo-loop": run_loop}
    got = run_loop()
    assert abs(got.item() - want) <= 1e-4 * want, (got.item(), want)
    _check("olora-repo-loop", [p.grad for p in loop_params], want_g, 1e-4)
    for b in backends:
        def run(b=b):
            for c in cur:
                c.grad = None
            with forgetkern.use_backend(b):
                loss = forgetkern.olora_loss(past, cur)
            loss.backward()
            return loss
        got = run()
        assert abs(got.item() - want) <= 1e-4 * want, (b, got.item(), want)
        _check(f"forgetkern-{b}", [c.grad for c in cur], want_g, 1e-4)
        fns[f"forgetkern-{b}"] = run
    _time(res, args, device, "olora_loss+backward", "fp32-r16-p16", size, fns, "olora-repo-loop")


def bench_gpm(res, args, device, sites, backends, size):
    gen = torch.Generator().manual_seed(args.seed + 1)
    bases = _bases(sites, lambda inn: 96 if inn == HIDDEN else 256, gen, device)
    grads0 = [torch.randn(R, inn, generator=gen).to(device) for _, _, inn in sites]
    want = [g.double() - (g.double() @ u.double()) @ u.double().t() for g, u in zip(grads0, bases)]
    feature_mat = [u @ u.t() for u in bases]  # GPM keeps these (in x in per layer)
    dense_mb = sum(f.numel() * 4 for f in feature_mat) / bc.MB
    basis_mb = sum(u.numel() * 4 for u in bases) / bc.MB
    grads = [g.clone() for g in grads0]

    def reset():
        torch._foreach_copy_(grads, grads0)

    def dense():
        for kk, g in enumerate(grads):
            g.sub_(torch.mm(g.view(g.shape[0], -1), feature_mat[kk]).view(g.size()))

    def skinny():
        for g, u in zip(grads, bases):
            g.sub_((g @ u) @ u.t())

    fns = {"gpm-dense-projector": dense, "torch-loop-skinny": skinny}
    for b in backends:
        def fused(b=b):
            with forgetkern.use_backend(b):
                forgetkern.project_out_(grads, bases, side="right")
        fns[f"forgetkern-{b}"] = fused

        def prechecked(b=b):  # what GPM.project_() calls once the structure was checked
            with forgetkern.use_backend(b):
                project_out_prechecked_(grads, bases, "right")
        fns[f"forgetkern-{b}-prechecked"] = prechecked
    for name, fn in fns.items():
        reset()
        fn()
        _check(name, grads, want, 1e-4)
    _time(res, args, device, "gpm_project_grads", "fp32-r16-k96/256", size, fns, "gpm-dense-projector", setup=reset)
    res.add(bc.Row("gpm_project_grads", "gpm-dense-projector", "fp32-r16-k96/256", "state_MB", size, "MB", dense_mb,
                   note="dense in x in projectors U U^T, fp32"))
    for b in backends:
        res.add(bc.Row("gpm_project_grads", f"forgetkern-{b}", "fp32-r16-k96/256", "state_MB", size, "MB", basis_mb,
                       note="bases U (in x k), fp32"))


def bench_oplora(res, args, device, sites, backends, size):
    gen = torch.Generator().manual_seed(args.seed + 2)
    k = 16
    us = [torch.linalg.qr(torch.randn(out, k, generator=gen, dtype=torch.float64))[0].float().to(device).contiguous()
          for _, out, _ in sites]
    vs = _bases(sites, lambda inn: k, gen, device)
    b0 = [torch.randn(out, R, generator=gen).to(device) for _, out, _ in sites]
    a0 = [torch.randn(R, inn, generator=gen).to(device) for _, _, inn in sites]
    want = ([b.double() - u.double() @ (u.double().t() @ b.double()) for b, u in zip(b0, us)]
            + [a.double() - (a.double() @ v.double()) @ v.double().t() for a, v in zip(a0, vs)])
    bs, as_ = [b.clone() for b in b0], [a.clone() for a in a0]

    def reset():
        torch._foreach_copy_(bs, b0)
        torch._foreach_copy_(as_, a0)

    def skinny():
        for b, u in zip(bs, us):
            b.sub_(u @ (u.t() @ b))
        for a, v in zip(as_, vs):
            a.sub_((a @ v) @ v.t())

    fns = {"torch-loop-skinny": skinny}
    for bk in backends:
        def fused(bk=bk):
            with forgetkern.use_backend(bk):
                forgetkern.project_out_(bs, us, side="left")
                forgetkern.project_out_(as_, vs, side="right")
        fns[f"forgetkern-{bk}"] = fused

        def prechecked(bk=bk):  # what OPLoRA.project_() calls once the structure was checked
            with forgetkern.use_backend(bk):
                project_out_prechecked_(bs, us, "left")
                project_out_prechecked_(as_, vs, "right")
        fns[f"forgetkern-{bk}-prechecked"] = prechecked
    for name, fn in fns.items():
        reset()
        fn()
        _check(name, bs + as_, want, 1e-4)
    _time(res, args, device, "oplora_project", "fp32-r16-k16", size, fns, "torch-loop-skinny", setup=reset)


def _time(res, args, device, op, mode, size, fns, baseline, setup=None):
    st = bc.time_interleaved(fns, device=device, warmup=1, repeat=args.repeat, setup=setup, budget_s=args.budget_s)
    for name, s in st.items():
        res.add(bc.time_row(op, name, mode, size, s, note=f"{s.n} samples"))
        print(f"   {op:22s} {name:22s} {s.median:9.3f} ms [{s.p20:.3f}, {s.p80:.3f}]", flush=True)
    for name, s in st.items():
        if name.startswith("forgetkern-"):
            res.add(bc.Row(op, name, mode, f"speedup_vs_{baseline}", size, "x", st[baseline].median / s.median,
                           note=f"time({baseline}) / time"))


PEERS = ("olora-repo-loop", "gpm-dense-projector", "torch-loop-skinny")   # re-implementations, labelled


def runner_argv(quick: bool, device: str) -> list:
    """Arguments for ``benchmarks/run.py``: ``quick`` uses 4 layers."""
    return ["--layers", "4", "--repeat", "3"] if quick else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30, help="transformer layers (default 30, SmolLM2-135M)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=10.0, help="stop timing a provider after this many seconds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default="auto", help="comma-separated forgetkern backends (default: the ones "
                                                        "that run here, triton only on CUDA)")
    ap.add_argument("--out", default=str(bc.RESULTS_DIR))
    ap.add_argument("--name", default="bench_projection")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    if args.backends == "auto":
        avail = _backend.availability(device.type)
        backends = [b for b in ("torch", "triton") if avail.get(b) is None
                    and not (b == "triton" and device.type == "cpu")]  # the interpreter is not a speed
    else:
        backends = args.backends.split(",")
    meta = bc.machine_info(device, backends=_backend.availability(device.type))
    sites = smollm2_sites(args.layers)
    size = len(sites)
    meta.update({"layers": args.layers, "adapted_layers": size, "rank": R, "repeat": args.repeat,
                 "providers_fused": backends})
    res = bc.Results(args.name, meta)
    bc.print_header(f"bench_projection: {size} LoRA sites (SmolLM2-135M shapes, r={R}) on {device}", meta)
    bench_olora(res, args, device, sites, backends, size)
    bench_gpm(res, args, device, sites, backends, size)
    bench_oplora(res, args, device, sites, backends, size)
    meta["wall_s"] = round(time.perf_counter() - T0, 1)
    res.notes.append("olora-repo-loop and gpm-dense-projector are re-implementations of the published "
                     "formulations (O-LoRA compute_loss; GPM's dense feature_mat projection), not the original code")
    csv_path, json_path = res.write(args.out)
    for r in res.rows:
        if r.metric.startswith("speedup"):
            print(f"   {r.op}/{r.provider}: {r.metric} = {r.median:.2f}x")
    print(f"   wall {meta['wall_s']} s; wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
