"""``forgetkern demo --sequential``: two tasks in a row on the embedded SmolLM2, and what each method keeps.

Task A is Python source of the standard library (the task of ``forgetkern demo``), task B the Python language
reference as ``help()`` shows it (:func:`forgetkern.corpora.python_reference`): code, then prose about code.
Every method of :mod:`forgetkern.training.sequential` runs with LoRA r=16 on every linear layer, the same steps
per task and three seeds: naive sequential LoRA at several learning rates (the baseline, tuned), uniform replay
of task A's windows and MSSR replay at the same replay-row budget, O-LoRA, and the merge of the two adapters
each trained alone (task arithmetic and TIES). Reported per method (seed means, min..max): the accuracy matrix
``R[i][j]`` (task ``j``'s relative perplexity gain after task ``i``), ACC, BWT and forgetting
(:mod:`forgetkern.eval`), and the general drop (multiple choice acc_norm, the primary metric, and perplexity)
after the last task. Written to ``sequential.json`` and ``sequential.md``.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Dict, List

import torch

QUICK = dict(seeds=(0,), length=64, batch_size=4, task_windows=192, eval_windows=16, mc=True, steps=8,
             naive_lrs=(1e-3,), methods=("naive", "olora", "merge"), mitigation_lr=1e-3)
FULL = dict(seeds=(0, 1, 2), length=64, batch_size=4, task_windows=192, eval_windows=16, mc=True, steps=16,
            naive_lrs=(3e-4, 1e-3, 3e-3), methods=("naive", "replay", "mssr", "olora", "merge"), mitigation_lr=1e-3)


def build_data(tokenizer, cfg: Dict):
    from forgetkern import corpora
    from forgetkern.data import text_windows
    from forgetkern.training.sequential import SeqData, Task

    L, n, ne = cfg["length"], cfg["task_windows"], cfg["eval_windows"]

    def task(name, fn):
        return Task(name, text_windows(tokenizer, fn("train"), length=L, max_windows=n),
                    text_windows(tokenizer, fn("eval"), length=L, max_windows=ne))

    return SeqData(tasks=[task("code", corpora.python_source), task("reference", corpora.python_reference)],
                   general_eval=text_windows(tokenizer, corpora.general_text("eval"), length=L, stride=L // 2),
                   general_mc=corpora.general_mc() if cfg["mc"] else None, tokenizer=tokenizer)


def configs(cfg: Dict) -> list:
    from forgetkern.training.sequential import SeqConfig

    out = []
    for seed in cfg["seeds"]:
        for m in cfg["methods"]:
            for lr in cfg["naive_lrs"] if m == "naive" else (cfg["mitigation_lr"],):
                out.append(SeqConfig(m, lr, cfg["steps"], seed=seed, batch_size=cfg["batch_size"]))
    return out


def _stats(vals: List[float]) -> Dict[str, float]:
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}


def summarize(runs: List[Dict], before: Dict[str, float], tasks: List[str]) -> List[Dict]:
    """Per (method, lr, merge method): seed means and spreads of R, ACC, BWT, forgetting and the general drops
    after the last task. ``runs``: ``[{"method", "lr", "seed", "rows"}]`` as :func:`run` records them."""
    from forgetkern.eval import average_accuracy, bwt, forgetting, relative_drop
    from forgetkern.training.sequential import matrix

    groups: Dict[tuple, List[Dict]] = {}
    for r in runs:
        stages = [x for x in r["rows"] if "merge" not in x]
        finals = [x for x in r["rows"] if "merge" in x] or [None]
        for f in finals:
            rows = stages if f is None else [x for x in stages if x["stage"] < len(tasks) - 1] + [f]
            name = r["method"] if f is None else f"merge:{f['merge']}"
            R = matrix(rows, before, tasks)
            last = rows[-1]["metrics"]
            rec = {"R": R, "acc": average_accuracy(R), "bwt": bwt(R), "forgetting": forgetting(R),
                   "general_ppl_drop": relative_drop(before["general_ppl"], last["general_ppl"]),
                   "replay_rows": sum(x.get("replay_rows", 0) for x in rows)}
            if "general_mc" in last:
                rec["mc_drop"] = relative_drop(before["general_mc"], last["general_mc"], higher_is_better=True)
            groups.setdefault((name, r["lr"]), []).append(rec)
    out = []
    for (name, lr), recs in groups.items():
        row = {"method": name, "lr": lr, "seeds": len(recs),
               "R": [[sum(x["R"][i][j] for x in recs) / len(recs) for j in range(len(tasks))]
                     for i in range(len(tasks))]}
        for k in ("acc", "bwt", "forgetting", "mc_drop", "general_ppl_drop", "replay_rows"):
            if all(k in x for x in recs):
                row[k] = _stats([x[k] for x in recs])
        out.append(row)
    return out


def format_summary(rows: List[Dict], tasks: List[str]) -> str:
    def pct(s):
        return f"{100 * s['mean']:+6.1f}% [{100 * s['min']:+.1f}, {100 * s['max']:+.1f}]"

    head = (f"| method | lr | seeds | {tasks[0]} after {tasks[0]} | {tasks[0]} after {tasks[-1]} | "
            f"{tasks[-1]} after {tasks[-1]} | ACC | BWT | general MC drop | general ppl drop | replay rows |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        R = r["R"]
        mc = pct(r["mc_drop"]) if "mc_drop" in r else "n/a"
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['seeds']} | {100 * R[0][0]:+.1f}% | {100 * R[-1][0]:+.1f}% "
                     f"| {100 * R[-1][-1]:+.1f}% | {pct(r['acc'])} | {pct(r['bwt'])} | {mc} | "
                     f"{pct(r['general_ppl_drop'])} | {r['replay_rows']['mean']:.0f} |")
    return "\n".join(lines)


def best_naive(rows: List[Dict]) -> Dict:
    """The tuned baseline: the naive learning rate with the highest mean ACC."""
    naive = [r for r in rows if r["method"] == "naive"]
    return max(naive, key=lambda r: r["acc"]["mean"]) if naive else {}


def run(cfg: Dict, out_dir: pathlib.Path, *, progress: bool = True, log=print):
    import forgetkern
    from forgetkern.testing.models import smollm2
    from forgetkern.training.sequential import evaluate_tasks, train_sequence
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    base, tok = smollm2()
    data = build_data(tok, cfg)
    tasks = [t.name for t in data.tasks]
    before = evaluate_tasks(base, data)
    log("before: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items()))
    cfgs = configs(cfg)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"model": "SmolLM2-135M-Instruct", "tasks": tasks, "before": before,
              "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
              "torch": torch.__version__, "forgetkern": forgetkern.__version__, "threads": torch.get_num_threads(),
              "runs": []}
    steps = sum(c.steps * len(tasks) for c in cfgs)
    bar = tqdm(total=steps, desc="training", unit="step", disable=not progress)
    for c in cfgs:
        bar.set_postfix_str(f"{c.method} lr={c.lr:g} seed={c.seed}")
        rows = train_sequence(base, data, c, on_step=bar.update)
        record["runs"].append({"method": c.method, "lr": c.lr, "seed": c.seed, "rows": rows})
        (out_dir / "sequential.json").write_text(json.dumps(record, indent=2))  # an interrupted run keeps its rows
    bar.close()
    record["summary"] = summarize(record["runs"], before, tasks)
    record["baseline"] = best_naive(record["summary"]).get("lr")
    record["seconds"] = time.perf_counter() - t_start
    (out_dir / "sequential.json").write_text(json.dumps(record, indent=2))
    md = ["# forgetkern demo --sequential", "",
          f"SmolLM2-135M-Instruct, LoRA r=16, task A = `{tasks[0]}` then task B = `{tasks[-1]}`, {cfg['steps']} steps "
          f"of batch {cfg['batch_size']} x {cfg['length']} tokens per task, seeds {list(cfg['seeds'])}. R[i][j]: "
          "task j's relative perplexity gain after task i; ACC, BWT: over the two tasks after the last; general "
          "drops after the last task; mean [min, max] over seeds. Tuned naive baseline (best ACC): "
          f"lr {record['baseline']}. {record['seconds'] / 60:.0f} min on {torch.get_num_threads()} threads.", "",
          format_summary(record["summary"], tasks), ""]
    (out_dir / "sequential.md").write_text("\n".join(md))
    return record, {"json": out_dir / "sequential.json", "markdown": out_dir / "sequential.md"}
