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
import dataclasses
import importlib.util
import io
import json
import os
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

from _report import (  # noqa: E402  (re-exported: the runner's data side)
    HISTORY_CSV, HISTORY_JSONL, SUMMARY_MD, PLOTS_DIR, PROVENANCE, ROW_FIELDS, NOT_PROVIDERS, MODELLED, provenance,
    append_history, read_history, read_runs, _num, latest_run_rows, is_memory, is_time, is_forgetkern, ratios,
    _cell, _md_escape, write_summary, modelled_table, _series_key, write_plots,
)


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
