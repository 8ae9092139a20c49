"""The data side of ``forgetkern bench``: the history files (every row with its provenance), the markdown summary
of ratios against each benchmark's peers, and the plots drawn from the history alone (``benchmarks/run.py``
runs the benchmarks; this module only reads and writes their results)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import _common as bc

HISTORY_CSV, HISTORY_JSONL, SUMMARY_MD, PLOTS_DIR = "history.csv", "history.jsonl", "SUMMARY.md", "plots"
PROVENANCE = ("run_id", "bench", "quick", "date", "commit", "dirty", "forgetkern", "torch", "triton", "cuda",
              "cpu_model", "torch_threads", "device", "device_name")
ROW_FIELDS = [f.name for f in dataclasses.fields(bc.Row)]
NOT_PROVIDERS = {"copy-probe", "torch-copy_"}
MODELLED = "modelled"          # every modelled row carries this word in its mode and its note


# ---------------------------------------------------------------------------------------------- history


def provenance(run_id: str, bench: str, quick: bool, meta: dict) -> dict:
    p = {k: meta.get(k, "") for k in PROVENANCE}
    p.update(run_id=run_id, bench=bench, quick=quick)
    return p


def append_history(out_dir: Path, run_id: str, quick: bool, runs: list) -> int:
    """Append every row of ``runs`` to ``history.csv`` / ``history.jsonl``; return the number of rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, jsonl_path = out_dir / HISTORY_CSV, out_dir / HISTORY_JSONL
    fields = list(PROVENANCE) + ROW_FIELDS
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    if not new:
        with open(csv_path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise RuntimeError(f"{csv_path}: its columns differ from this runner's ({header} != {fields}); "
                               f"move it aside to start a new history")
    n = 0
    with open(csv_path, "a", newline="") as fc, open(jsonl_path, "a") as fj:
        w = csv.DictWriter(fc, fieldnames=fields)
        if new:
            w.writeheader()
        for run in runs:
            for doc in run.docs:
                meta = doc.get("meta", {})
                bench = doc.get("benchmark", run.name)
                prov = provenance(run_id, bench, quick, meta)
                for r in doc.get("rows", []):
                    w.writerow({**prov, **{k: r.get(k, "") for k in ROW_FIELDS}})
                    n += 1
                fj.write(json.dumps({"run_id": run_id, "bench": bench, "quick": quick, "argv": run.argv,
                                     "wall_s": round(run.wall_s, 1), "meta": meta, "notes": doc.get("notes", []),
                                     "rows": doc.get("rows", [])}, default=str) + "\n")
    return n


def read_history(out_dir: Path) -> list:
    """Every row of ``history.csv`` as a dict, numbers parsed (``median``/``p20``/``p80``/``size``)."""
    path = Path(out_dir) / HISTORY_CSV
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in ("median", "p20", "p80"):
                r[k] = _num(r[k])
            r["size"] = int(float(r["size"])) if r["size"] not in ("", None) else 0
            rows.append(r)
    return rows


def read_runs(out_dir: Path) -> list:
    path = Path(out_dir) / HISTORY_JSONL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def latest_run_rows(rows: list) -> dict:
    """``{bench: rows of its latest run}`` (runs ordered as appended)."""
    last: dict = {}
    for r in rows:
        last[r["bench"]] = r["run_id"]
    out: dict = {}
    for r in rows:
        if last[r["bench"]] == r["run_id"]:
            out.setdefault(r["bench"], []).append(r)
    return out


# ---------------------------------------------------------------------------------------------- summary


def is_memory(r: dict) -> bool:
    return r["metric"].startswith("peak") and r["unit"] == "MB"


def is_time(r: dict) -> bool:
    return r["metric"] == "time" and r["unit"] == "ms"


def is_forgetkern(provider: str) -> bool:
    return provider.startswith("forgetkern")


def ratios(rows: list, peers: set | None) -> list:
    """``[(op, mode, size, forgetkern provider, peer, metric, value)]``: speed ratio ``time(peer)/time(fk)``
    (``metric="speed"``) and, per memory metric, ``peak(fk)/peak(peer)``."""
    groups: dict = {}
    for r in rows:
        if MODELLED in r["mode"] or r["provider"] in NOT_PROVIDERS:
            continue
        if is_time(r) or is_memory(r):
            groups.setdefault((r["op"], r["mode"], r["size"]), {}).setdefault(r["metric"], {})[r["provider"]] = r
    out = []
    for (op, mode, size), by_metric in groups.items():
        for metric, by_prov in by_metric.items():
            fks = [p for p in by_prov if is_forgetkern(p)]
            base = [p for p in by_prov if not is_forgetkern(p) and (peers is None or p in peers)]
            for fk in fks:
                for peer in base:
                    a, b = by_prov[fk]["median"], by_prov[peer]["median"]
                    if metric == "time":
                        val = b / a if a > 0 else math.nan
                    else:
                        val = a / b if b > 0 else math.nan
                    out.append((op, mode, size, fk, peer, "speed" if metric == "time" else metric, val))
    return out


def _cell(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _md_escape(s) -> str:
    return str(s).replace("|", "\\|")


def write_summary(out_dir: Path, peers_by_bench: dict | None = None) -> Path:
    """``SUMMARY.md`` from the latest run of each benchmark in the history."""
    out_dir = Path(out_dir)
    rows = read_history(out_dir)
    runs = {(d["run_id"], d["bench"]): d for d in read_runs(out_dir)}
    peers_by_bench = peers_by_bench or {}
    lines = ["# Benchmark summary", "",
             "Generated by `forgetkern bench` (`benchmarks/run.py`) from `history.csv`: the latest run of each "
             "benchmark. Speed ratio = time(peer) / time(forgetkern) (> 1: forgetkern is faster); memory ratio = "
             "peak(forgetkern) / peak(peer) (< 1: forgetkern needs less). Medians of interleaved repeats.", ""]
    latest = latest_run_rows(rows)
    if not latest:
        lines.append("No results yet.")
    for bench, brs in latest.items():
        run_id = brs[0]["run_id"]
        meta = runs.get((run_id, bench), {}).get("meta", {})
        p = brs[0]
        lines += [f"## {bench}", "",
                  f"run `{run_id}` ({'quick' if p['quick'] == 'True' else 'full'} sizes), {p['date']}; "
                  f"commit `{p['commit']}`{' (dirty tree)' if p['dirty'] == 'True' else ''}; "
                  f"forgetkern {p['forgetkern']}, torch {p['torch']}, triton {p['triton']}, "
                  f"CUDA {p['cuda'] or 'none'}; {p['device_name']} ({p['device']}), "
                  f"{p['torch_threads']} threads"
                  + (f"; load avg {meta.get('load_avg_1_5_15')}" if meta.get("load_avg_1_5_15") else ""), ""]
        modelled = [r for r in brs if MODELLED in r["mode"]]
        measured = [r for r in brs if MODELLED not in r["mode"]]
        rat = ratios(measured, peers_by_bench.get(bench))
        if rat:
            lines += ["| op | mode | size | forgetkern | peer | speed x | memory ratio |",
                      "|---|---|---:|---|---|---:|---:|"]
            table: dict = {}
            for op, mode, size, fk, peer, metric, val in rat:
                table.setdefault((op, mode, size, fk, peer), {})[metric] = val
            for (op, mode, size, fk, peer), vals in table.items():
                mem = "; ".join(f"{_cell(v)} ({m.split(':', 1)[-1]})" for m, v in vals.items() if m != "speed")
                lines.append(f"| {_md_escape(op)} | {_md_escape(mode)} | {size:,} | {fk} | {peer} | "
                             f"{_cell(vals.get('speed'))} | {mem or 'n/a'} |")
            lines.append("")
        goals = [r for r in measured if r["status"]]
        if goals:
            lines += ["Goals set by the benchmark:", "", "| op | mode | provider | metric | value | goal | status |",
                      "|---|---|---|---|---:|---|---|"]
            lines += [f"| {_md_escape(r['op'])} | {_md_escape(r['mode'])} | {r['provider']} | {r['metric']} | "
                      f"{_cell(r['median'])} | {r['goal']} | {r['status']} |" for r in goals]
            lines.append("")
        if modelled:
            lines += modelled_table(modelled)
        if not (rat or goals or modelled):
            lines += ["(no forgetkern-vs-peer pairs in this run)", ""]
    path = out_dir / SUMMARY_MD
    path.write_text("\n".join(lines) + "\n")
    return path


def modelled_table(rows: list) -> list:
    """The modelled-GPU rows as a table: per (op, size) the roofline time of forgetkern and of each peer."""
    lines = ["**Modelled, not measured**: roofline time on an H100 SXM from bytes moved (3.0 TB/s) and "
             "matmul FLOPs (800 TFLOP/s bf16): max(bytes / 3.0 TB/s, FLOPs / 800 TFLOP/s). forgetkern's bytes "
             "come from its Triton kernel's loads and stores counted in the interpreter on a smaller problem, "
             "extended to this size by the kernel's byte model once that model matched the count (each row's "
             "note says how); a peer's are the minimum its sequence of torch ops must move (each op reads its "
             "inputs and writes its output once). Launch latency is not modelled. No GPU ran these.", "",
             "| op | size | provider | mode | modelled bytes (MB) | modelled H100 time (us) | peer time / "
             "forgetkern time |", "|---|---:|---|---|---:|---:|---:|"]
    by: dict = {}
    for r in rows:
        by.setdefault((r["op"], r["size"]), {}).setdefault((r["provider"], r["mode"]), {})[r["metric"]] = r["median"]
    for (op, size), provs in by.items():
        fk = [k for k in provs if is_forgetkern(k[0])]
        t_fk = provs[fk[0]].get("modelled_h100_time") if fk else None
        for (prov, mode), m in provs.items():
            t = m.get("modelled_h100_time")
            rel = "" if is_forgetkern(prov) or not t_fk or t is None else _cell(t / t_fk)
            lines.append(f"| {_md_escape(op)} | {size:,} | {prov} | {_md_escape(mode)} | "
                         f"{_cell(m.get('modelled_bytes'))} | {_cell(t)} | {rel} |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------- plots


def _series_key(op: str) -> str:
    """Plot family of an op: its first word (``lora_linear q_proj/o_proj 576->576 t=2048`` -> ``lora_linear``)."""
    return op.split(" ", 1)[0]


def write_plots(out_dir: Path) -> list:
    """PNG per (benchmark, op family): time and peak memory against size; one line per (provider, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    latest: dict = {}
    for r in read_history(out_dir):          # later rows replace earlier ones of the same key
        if MODELLED in r["mode"] or r["provider"] in NOT_PROVIDERS or not math.isfinite(r["median"]):
            continue
        if is_time(r) or is_memory(r):
            latest[(r["bench"], r["op"], r["provider"], r["mode"], r["metric"], r["size"], r["device_name"])] = r
    figs: dict = {}
    for (bench, op, prov, mode, metric, size, dev), r in latest.items():
        kind = "time" if metric == "time" else "memory"
        label = f"{prov} {mode}" + (f" [{metric.split(':', 1)[-1]}]" if kind == "memory" else "")
        if len({k[6] for k in latest}) > 1:
            label += f" ({dev})"
        figs.setdefault((bench, _series_key(op)), {}).setdefault(kind, {}).setdefault(label, []).append(
            (size, r["median"], r["p20"], r["p80"]))
    plot_dir = out_dir / PLOTS_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (bench, family), kinds in sorted(figs.items()):
        fig, axes = plt.subplots(1, 2, figsize=(13, 5), squeeze=False)
        for ax, kind, ylabel in ((axes[0][0], "time", "time per call (ms, median; bars p20-p80)"),
                                 (axes[0][1], "memory", "peak extra memory (MB)")):
            series = kinds.get(kind, {})
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
            for label, pts in sorted(series.items()):
                pts.sort()
                xs = [p[0] for p in pts]
                ys = [p[1] for p in pts]
                style = "-o" if is_forgetkern(label) else "--s"
                if kind == "time":
                    err = [[max(0.0, p[1] - p[2]) for p in pts], [max(0.0, p[3] - p[1]) for p in pts]]
                    ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=2, markersize=4, label=label)
                else:
                    ax.plot(xs, ys, style, markersize=4, label=label)
            if not series:
                ax.text(0.5, 0.5, f"no {kind} rows", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.set_xscale("log")
                if all(p[1] > 0 for pts in series.values() for p in pts):
                    ax.set_yscale("log")
                ax.legend(fontsize=6, loc="best")
            ax.set_xlabel("size (benchmark's size column)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"{bench}: {family} (measured; from {HISTORY_CSV})")
        fig.tight_layout()
        path = plot_dir / f"{bench}__{re.sub(r'[^A-Za-z0-9_.-]+', '_', family)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
