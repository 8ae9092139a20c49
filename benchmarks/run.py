"""Run the benchmark suite: every ``benchmarks/bench_<op>.py``, results appended as data, a summary and plots.

    python -m benchmarks.run                       # every benchmark at its default (full) sizes
    python -m benchmarks.run --quick --only ewc,lora
    python -m benchmarks.run --plot-only           # redraw SUMMARY.md and the PNGs from the data files
    forgetkern bench ...                           # the same (from a source checkout)

The interface a benchmark script offers the runner (all but ``main`` optional, so a new ``bench_<op>.py`` that
only has ``main(argv) -> int`` and an ``--out DIR`` option is run too, at its defaults):

* ``main(argv) -> int``: its own command line; it must accept ``--out DIR`` and write ``DIR/<stem>.json``
  (``_common.Results.write``). The runner calls it in this process, so the providers of each case keep being
  timed in the same process, alternating, medians of repeats (``_common.time_interleaved``).
* ``runner_argv(quick: bool, device: str) -> list``: the arguments for a run of the suite: small sizes with
  ``quick``; ``device`` is ``"cpu"`` or ``"cuda"``.
* ``PEERS``: provider names that are baselines. The summary gives each ``forgetkern*`` provider's speed ratio
  ``time(peer) / time(forgetkern)`` and memory ratio ``peak(forgetkern) / peak(peer)`` against each of them, for
  the same ``(op, mode, size)``. Without it, every provider not named ``forgetkern*`` counts as a peer.
* ``modelled_rows(quick: bool) -> list[Row]``: modelled (not measured) GPU figures, computed in a separate
  process with ``TRITON_INTERPRET=1`` (``benchmarks/modelled.py``).

Data (``--out``, default ``benchmarks/results/``): each script still writes its latest ``<stem>.csv/.json``
there (``quick/<stem>.*`` for ``--quick`` runs, so that they never replace a full-size snapshot);
the runner appends every row of every run, with the run's provenance (forgetkern commit and dirty flag,
torch/triton/CUDA versions, CPU model, threads, device, date, quick or full), to ``history.csv`` (one line per
row) and ``history.jsonl`` (one line per benchmark run, with its full metadata). ``SUMMARY.md`` is written from
the latest run of each benchmark in the history; the plots (``plots/<stem>__<op>.png``: time and peak memory
against size, one line per provider and mode, log axes) from the latest value of every
``(op, provider, mode, metric, size, device)`` in the history.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import _common as bc  # noqa: E402

HISTORY_CSV, HISTORY_JSONL, SUMMARY_MD, PLOTS_DIR = "history.csv", "history.jsonl", "SUMMARY.md", "plots"
PROVENANCE = ("run_id", "bench", "quick", "date", "commit", "dirty", "forgetkern", "torch", "triton", "cuda",
              "cpu_model", "torch_threads", "device", "device_name")
ROW_FIELDS = [f.name for f in dataclasses.fields(bc.Row)]
NOT_PROVIDERS = {"copy-probe", "torch-copy_"}
MODELLED = "modelled"          # every modelled row carries this word in its mode and its note


# ---------------------------------------------------------------------------------------------- discovery


def discover(bench_dir=BENCH_DIR) -> dict:
    """``{short name: path}`` of every ``bench_<op>.py`` (short name = ``<op>``), sorted by name."""
    return {p.stem[len("bench_"):]: p for p in sorted(Path(bench_dir).glob("bench_*.py"))}


def select(available: dict, only) -> dict:
    if not only:
        return dict(available)
    names = [n.strip().removeprefix("bench_") for n in (only.split(",") if isinstance(only, str) else only)]
    unknown = [n for n in names if n and n not in available]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {', '.join(unknown)}; "
                         f"available: {', '.join(available) or 'none'}")
    return {n: available[n] for n in names if n}


def load(name: str, path: Path):
    """Import ``bench_<name>.py`` as module ``bench_<name>`` (as when the script is run directly)."""
    mod_name = path.stem
    if mod_name in sys.modules and getattr(sys.modules[mod_name], "__file__", None) == str(path):
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "main", None)):
        raise TypeError(f"{path.name} has no main(argv) entry point")
    return mod


def bench_argv(mod, *, quick: bool, device: str) -> list:
    fn = getattr(mod, "runner_argv", None)
    return list(fn(quick=quick, device=device)) if callable(fn) else []


def peers_of(mod) -> set | None:
    peers = getattr(mod, "PEERS", None)
    return set(peers) if peers is not None else None


# ---------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class BenchRun:
    name: str
    argv: list
    ok: bool
    wall_s: float
    docs: list                 # the JSON documents the script wrote
    error: str = ""


def run_one(name: str, path: Path, *, quick: bool, device: str, extra_argv=(), out_dir: Path,
            quiet: bool = False) -> BenchRun:
    """Run one benchmark in this process; its files go to a staging folder, then to ``out_dir``."""
    t0 = time.perf_counter()
    mod = load(name, path)
    argv = bench_argv(mod, quick=quick, device=device) + list(extra_argv)
    with tempfile.TemporaryDirectory(prefix=f"fk-bench-{name}-") as stage:
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log) if quiet else contextlib.nullcontext():
                rc = mod.main(argv + ["--out", stage])
            ok, err = rc in (0, None), "" if rc in (0, None) else f"main returned {rc}"
        except SystemExit as e:                         # argparse errors
            ok, err = e.code in (0, None), f"exit {e.code}"
        except Exception:  # one failing benchmark must not lose the others' results
            ok, err = False, traceback.format_exc(limit=8)
        docs = []
        dest = out_dir / "quick" if quick else out_dir
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted(Path(stage).iterdir()):
            if f.suffix == ".json":
                docs.append(json.loads(f.read_text()))
            if f.is_file():
                shutil.move(str(f), dest / f.name)
    if ok and not docs:
        ok, err = False, "wrote no <stem>.json (does its main accept --out DIR and call Results.write?)"
    return BenchRun(name, argv, ok, time.perf_counter() - t0, docs, err)


def run_modelled(names: list, *, quick: bool, out_dir: Path, timeout_s: float = 900) -> BenchRun:
    """The modelled-GPU rows of ``names`` (those with ``modelled_rows``), in a child process (interpreter)."""
    t0 = time.perf_counter()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out_dir = out_dir / "quick" if quick else out_dir
    cmd = [sys.executable, str(BENCH_DIR / "modelled.py"), "--out", str(out_dir), "--only", ",".join(names)]
    if quick:
        cmd.append("--quick")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        ok, err = proc.returncode == 0, "" if proc.returncode == 0 else (proc.stdout[-2000:] + proc.stderr[-4000:])
    except subprocess.TimeoutExpired:
        ok, err = False, f"timed out after {timeout_s:.0f} s"
    path = out_dir / "modelled_gpu.json"
    docs = [json.loads(path.read_text())] if ok and path.exists() else []
    return BenchRun("modelled_gpu", cmd[2:], ok, time.perf_counter() - t0, docs, err)


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


# ---------------------------------------------------------------------------------------------- driver


def _progress(items, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="bench", file=sys.stderr, dynamic_ncols=True)


def parse_extra(values) -> dict:
    """``--args NAME="ARGS"`` (repeatable): extra arguments for one benchmark's main, after runner_argv's."""
    import shlex

    out: dict = {}
    for v in values or ():
        name, sep, rest = v.partition("=")
        if not sep:
            raise SystemExit(f"--args expects NAME=\"ARGS\" (e.g. ewc=\"--params 1e6\"), got {v!r}")
        out.setdefault(name.strip().removeprefix("bench_"), []).extend(shlex.split(rest))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="forgetkern bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma list of benchmarks (ewc,fisher,lora; default: all found)")
    ap.add_argument("--quick", action="store_true", help="small sizes (each script's runner_argv(quick=True))")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--out", default=str(bc.RESULTS_DIR), help="results folder (default benchmarks/results)")
    ap.add_argument("--bench-dir", default=str(BENCH_DIR), help="where bench_<op>.py live")
    ap.add_argument("--args", action="append", metavar='NAME="ARGS"',
                    help='extra arguments for one benchmark, e.g. --args ewc="--params 1e6" (repeatable)')
    ap.add_argument("--plot-only", action="store_true", help="run nothing: redraw SUMMARY.md and the plots "
                                                            "from the data files in --out")
    ap.add_argument("--no-plot", action="store_true", help="do not draw the PNG plots after the run")
    ap.add_argument("--no-modelled", action="store_true", help="skip the modelled-GPU rows")
    ap.add_argument("--gpu", action="store_true", help="on an NVIDIA GPU: the op tests on the device, then "
                                                       "the GPU timings (benchmarks/gpu.py); see scripts/gpu_bench.sh")
    ap.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    ap.add_argument("--quiet", action="store_true", help="keep the scripts' own output off stdout")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    available = discover(args.bench_dir)
    if args.list:
        for name, path in available.items():
            print(f"{name:<12} {path}")
        return 0
    if args.gpu:
        import gpu  # benchmarks/gpu.py

        return gpu.main((["--quick"] if args.quick else []) + ["--out", str(out_dir)]
                        + (["--only", args.only] if args.only else []))
    chosen = select(available, args.only)
    peers = {}
    for name, path in chosen.items():
        try:
            peers[f"bench_{name}"] = peers_of(load(name, path))
        except Exception as e:
            print(f"cannot import {path.name}: {e}", file=sys.stderr)
    if args.plot_only:
        return _render(out_dir, peers, plot=True)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = parse_extra(args.args)
    unknown = set(extra) - set(chosen)
    if unknown:
        raise SystemExit(f"--args for benchmark(s) not selected: {', '.join(sorted(unknown))}")
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    runs = []
    bar = _progress(list(chosen.items()), "benchmarks")
    for name, path in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(name)
        print(f"\n=== bench_{name} ({'quick' if args.quick else 'full'}, {device})", flush=True)
        run = run_one(name, path, quick=args.quick, device=device, extra_argv=extra.get(name, ()),
                      out_dir=out_dir, quiet=args.quiet)
        print(f"=== bench_{name}: {'ok' if run.ok else 'FAILED'} in {run.wall_s:.0f} s"
              + ("" if run.ok else f"\n{run.error}"), flush=True)
        runs.append(run)
    with_model = [n for n, p in chosen.items() if callable(getattr(load(n, p), "modelled_rows", None))]
    if with_model and not args.no_modelled:
        run = run_modelled(with_model, quick=args.quick, out_dir=out_dir)
        print(f"=== modelled GPU rows ({', '.join(with_model)}): {'ok' if run.ok else 'FAILED'} in "
              f"{run.wall_s:.0f} s" + ("" if run.ok else f"\n{run.error}"), flush=True)
        runs.append(run)
    n = append_history(out_dir, run_id, args.quick, [r for r in runs if r.docs])
    print(f"appended {n} rows (run {run_id}) to {out_dir / HISTORY_CSV} and {out_dir / HISTORY_JSONL}")
    rc = _render(out_dir, peers, plot=not args.no_plot)
    failed = [r.name for r in runs if not r.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return rc


def _render(out_dir: Path, peers: dict, plot: bool) -> int:
    if not (Path(out_dir) / HISTORY_CSV).exists():
        print(f"no {HISTORY_CSV} in {out_dir}: run the benchmarks first", file=sys.stderr)
        return 1
    print(f"wrote {write_summary(out_dir, peers)}")
    if plot:
        for p in write_plots(out_dir):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
