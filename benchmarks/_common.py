"""Shared benchmark utilities: timing, peak memory, copy bandwidth, machine metadata, result rows.

Every benchmark script produces :class:`Row` objects keyed by ``(op, provider, mode, metric, size)``, collects
them in a :class:`Results` (with the machine/version metadata of :func:`machine_info`), prints them as a table
and writes ``<out>/<name>.csv`` and ``<out>/<name>.json`` (default ``benchmarks/results/``).

Timing (:func:`time_fn`): ``warmup`` untimed calls, then ``repeat`` timed calls; each sample is the wall time
of one call (``time.perf_counter``), bracketed by ``torch.cuda.synchronize()`` on CUDA so that queued kernels
are counted. Reported: median and the 20th/80th percentiles (linear interpolation, as ``numpy.quantile``), in
milliseconds. An optional ``setup`` callable runs before each call, outside the timed region. With
``budget_s``, timing stops early once that many seconds were spent in timed calls and at least ``min_repeat``
samples exist (for slow baselines on large sizes); ``Stats.n`` says how many samples were taken.

Peak memory: :func:`peak_memory` (``benchmarks/_memory.py`` says exactly what each method measures).

Copy bandwidth (:func:`copy_bandwidth`): ``dst.copy_(src)`` on two large float32 buffers with the current
``torch.get_num_threads()``; bytes counted = read + write = ``2 * nbytes`` (the STREAM convention: the extra
read-for-ownership of ``dst`` that a cached store causes is not counted, so an in-place kernel, which reads
what it writes anyway, can exceed 100 % of this figure). Best of ``repeat`` calls; or, with
:class:`CopyProbe` timed in the same interleaved rounds as the ops, the median under the same conditions.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep torch.profiler's start-up log lines out of the output

import torch  # noqa: E402

from _memory import MEMORY_METHODS, peak_memory  # noqa: E402,F401  (re-exported: bc.peak_memory)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 2.0**20
GB = 1e9


# ---------------------------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Stats:
    """Timing samples of one benchmarked callable, in milliseconds."""

    median: float
    p20: float
    p80: float
    min: float
    n: int
    samples: list


def quantile(xs: Iterable[float], q: float) -> float:
    """Quantile with linear interpolation between order statistics (``numpy.quantile``'s default)."""
    s = sorted(xs)
    if not s:
        return math.nan
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats(samples_ms: list) -> Stats:
    return Stats(median=quantile(samples_ms, 0.5), p20=quantile(samples_ms, 0.2), p80=quantile(samples_ms, 0.8),
                 min=min(samples_ms), n=len(samples_ms), samples=list(samples_ms))


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, device="cpu", warmup: int = 2, repeat: int = 10,
            setup: Optional[Callable[[], None]] = None, budget_s: Optional[float] = None,
            min_repeat: int = 3) -> Stats:
    """Wall time of ``fn()`` per call: ``warmup`` untimed calls, then ``repeat`` timed ones (see module doc)."""
    return time_interleaved({"fn": fn}, device=device, warmup=warmup, repeat=repeat, setup=setup,
                            budget_s=budget_s, min_repeat=min_repeat)["fn"]


def time_interleaved(fns: dict, *, device="cpu", warmup: int = 0, repeat: int = 10,
                     setup: Optional[Callable[[], None]] = None, budget_s: Optional[float] = None,
                     min_repeat: int = 3) -> dict:
    """Like :func:`time_fn` for several callables ``{name: fn}`` timed in interleaved rounds (A, B, C, A, ...).

    Load from other processes on a shared machine then hits every provider alike. ``budget_s`` applies per
    callable: one that has spent that long in timed calls and has ``min_repeat`` samples drops out. ``setup``
    runs before every call (warm-up and timed), outside the timed region.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            if setup is not None:
                setup()
            fn()
    samples: dict = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    for _ in range(repeat):
        for name, fn in fns.items():
            if budget_s is not None and spent[name] >= budget_s and len(samples[name]) >= min_repeat:
                continue
            if setup is not None:
                setup()
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            dt = time.perf_counter() - t0
            spent[name] += dt
            samples[name].append(dt * 1e3)
    return {name: stats(s) for name, s in samples.items()}


# ---------------------------------------------------------------------------------------------- bandwidth


class CopyProbe:
    """``dst.copy_(src)`` on two float32 buffers of ``nbytes`` each; call it to copy once.

    Pass it as one more provider to :func:`time_interleaved` to get the copy bandwidth under the same
    conditions (load, threads) as the ops timed in the same rounds: :meth:`gbps` of its stats.
    """

    def __init__(self, nbytes: int = 256 * 2**20, device="cpu"):
        n = max(1, int(nbytes) // 4)
        self.src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
        self.dst = torch.empty(n, dtype=torch.float32, device=device).fill_(0.0)
        self.bytes_per_buffer, self.bytes_moved = n * 4, 2 * n * 4

    def __call__(self) -> None:
        self.dst.copy_(self.src)

    def gbps(self, st: Stats, which: str = "median") -> float:
        return self.bytes_moved / (getattr(st, which) * 1e-3) / GB


def copy_bandwidth(nbytes: int = 256 * 2**20, *, device="cpu", repeat: int = 10, warmup: int = 2,
                   probe: Optional[CopyProbe] = None) -> dict:
    """This machine's copy bandwidth: ``dst.copy_(src)``, float32, bytes = 2 * nbytes, best of ``repeat``."""
    probe = probe or CopyProbe(nbytes, device)
    st = time_fn(probe, device=device, warmup=warmup, repeat=repeat)
    return {"bytes_per_buffer": probe.bytes_per_buffer, "bytes_moved": probe.bytes_moved,
            "threads": torch.get_num_threads(), "repeat": repeat, "best_gbps": probe.gbps(st, "min"),
            "median_gbps": probe.gbps(st)}


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / GB


# ---------------------------------------------------------------------------------------------- metadata


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception as e:  # not installed, or broken install: record why
        return f"unavailable ({type(e).__name__})"


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else platform.machine()


def _git(*args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_info() -> dict:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit or "none (no commit or not a git checkout)",
            "dirty": bool(status) if commit and status is not None else None}


def machine_info(device="cpu", *, backends: Optional[dict] = None) -> dict:
    """Versions, machine and run conditions, stored with every result file."""
    device = torch.device(device)
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "forgetkern": _version("forgetkern"),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cuda": torch.version.cuda,
        **git_info(),
    }
    if backends is not None:
        info["backends"] = {k: (v if v is not None else "available") for k, v in backends.items()}
    return info


# ---------------------------------------------------------------------------------------------- results


@dataclasses.dataclass
class Row:
    """One measurement, keyed by ``(op, provider, mode, metric, size)``.

    ``median``/``p20``/``p80`` are equal for single-valued metrics (ratios, bandwidth from the median time,
    memory). ``goal`` is e.g. ``">= 4"`` and ``status`` ``PASS``/``MISS`` when the row carries a target.
    """

    op: str
    provider: str
    mode: str
    metric: str
    size: int
    unit: str
    median: float
    p20: float = math.nan
    p80: float = math.nan
    goal: str = ""
    status: str = ""
    note: str = ""

    def __post_init__(self):
        if math.isnan(self.p20):
            self.p20 = self.median
        if math.isnan(self.p80):
            self.p80 = self.median

    @property
    def key(self) -> tuple:
        return (self.op, self.provider, self.mode, self.metric, self.size)

    def set_goal(self, threshold: float, *, at_least: bool = True) -> "Row":
        self.goal = f"{'>=' if at_least else '<='} {threshold:g}"
        ok = self.median >= threshold if at_least else self.median <= threshold
        self.status = "PASS" if ok else "MISS"
        return self


def time_row(op, provider, mode, size, st: Stats, note: str = "") -> Row:
    return Row(op, provider, mode, "time", size, "ms", st.median, st.p20, st.p80, note=note)


class Results:
    """Rows of one benchmark run plus its metadata; a row added twice under the same key replaces the first."""

    def __init__(self, name: str, meta: dict):
        self.name, self.meta = name, meta          # shared: later updates of meta are written too
        self._rows: dict = {}
        self.notes: list = []

    def add(self, row: Row) -> Row:
        self._rows[row.key] = row
        return row

    def get(self, op, provider, mode, metric, size) -> Optional[Row]:
        return self._rows.get((op, provider, mode, metric, size))

    @property
    def rows(self) -> list:
        return list(self._rows.values())

    def _csv_fields(self) -> list:
        return [f.name for f in dataclasses.fields(Row)] + ["timestamp", "device_name", "commit"]

    def write(self, out_dir=RESULTS_DIR) -> tuple:
        """Write ``<name>.csv`` and ``<name>.json`` atomically (``.tmp`` then rename); return both paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = out_dir / f"{self.name}.csv", out_dir / f"{self.name}.json"
        extra = {"timestamp": self.meta.get("date", ""), "device_name": self.meta.get("device_name", ""),
                 "commit": self.meta.get("commit", "")}
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._csv_fields())
            w.writeheader()
            for r in self.rows:
                w.writerow({**dataclasses.asdict(r), **extra})
        os.replace(tmp, csv_path)
        tmp = json_path.with_name(json_path.name + ".tmp")
        doc = {"benchmark": self.name, "meta": self.meta, "notes": self.notes,
               "rows": [dataclasses.asdict(r) for r in self.rows]}
        tmp.write_text(json.dumps(doc, indent=2, default=str, allow_nan=True) + "\n")
        os.replace(tmp, json_path)
        return csv_path, json_path

    def summary(self, columns: list) -> str:
        """One line per ``(op, mode, provider)``; ``columns`` = ``[(header, metric), ...]``.

        A ``time`` cell shows ``median [p20, p80]``; a cell whose row carries a goal shows ``value (goal STATUS)``.
        """
        groups: dict = {}
        for r in self.rows:
            groups.setdefault((r.op, r.mode, r.provider), {})[r.metric] = r
        head = ["op", "mode", "provider"] + [h for h, _ in columns]
        body = []
        for (op, mode, prov), by_metric in groups.items():
            cells = [op, mode, prov]
            for _, metric in columns:
                r = by_metric.get(metric)
                if r is None:
                    cells.append("")
                elif metric == "time":
                    cells.append(f"{_fmt(r.median)} [{_fmt(r.p20)}, {_fmt(r.p80)}]")
                else:
                    cells.append(_fmt(r.median) + (f" ({r.goal} {r.status})" if r.status else ""))
            body.append(cells)
        return _render(head, body)


def _render(head, body) -> str:
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    return "\n".join([line, "-" * len(line)] +
                     ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body])


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.3g}" if ax < 10 else f"{x:.2f}"
    return f"{x:.3f}"


def print_header(title: str, meta: dict) -> None:
    print(f"== {title}")
    print(f"   {meta['device_name']} | cpus {meta['cpu_count']} (affinity {meta['cpu_affinity']}) | "
          f"torch threads {meta['torch_threads']} | load avg {meta.get('load_avg_1_5_15')}")
    print(f"   torch {meta['torch']} | triton {meta['triton']} | numpy {meta['numpy']} | "
          f"commit {meta['commit']} | {meta['date']}")


# ---------------------------------------------------------------------------------------------- modelled GPU

# Measured H100 SXM ceilings the modelled rows use (not this machine's): device-to-device copy bandwidth
# (read + write bytes) and dense bf16 matmul throughput.
H100_COPY_BPS = 3.0e12
H100_BF16_FLOPS = 800e12
MODELLED_NOTE = ("modelled, not measured: roofline max(bytes / 3.0 TB/s, matmul FLOPs / 800 TFLOP/s) of an "
                 "H100 SXM; launch latency and caches not modelled")


def roofline_us(nbytes: float, flops: float = 0.0) -> float:
    """Modelled H100 time (microseconds) of an op moving ``nbytes`` and doing ``flops`` matmul FLOPs."""
    return max(nbytes / H100_COPY_BPS, flops / H100_BF16_FLOPS) * 1e6


def modelled_rows(op: str, provider: str, mode: str, size: int, nbytes: float, flops: float = 0.0,
                  how: str = "") -> list:
    """Two rows, ``modelled_bytes`` (MB) and ``modelled_h100_time`` (us), for one provider; the mode and the
    note say "modelled"."""
    mode = mode if "modelled" in mode else f"modelled H100 {mode}"
    note = f"{MODELLED_NOTE}; {how}" if how else MODELLED_NOTE
    return [Row(op, provider, mode, "modelled_bytes", size, "MB", nbytes / MB, note=note),
            Row(op, provider, mode, "modelled_h100_time", size, "us", roofline_us(nbytes, flops), note=note)]
