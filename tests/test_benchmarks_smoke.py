"""Smoke test of benchmarks/bench_ewc.py: a tiny run must verify every provider and write the expected rows."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from forgetkern import _backend

ROOT = Path(__file__).resolve().parent.parent
EWC, FISHER = "ewc_penalty_and_grad", "fisher_accumulate"


def _fused_providers() -> list:
    avail = _backend.availability("cpu")
    return [f"forgetkern-{b}" for b in ("cpp", "torch") if avail.get(b) is None]


def test_bench_ewc_tiny_run_writes_expected_rows(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_ewc.py"), "--params", "2e5", "--repeat", "1",
           "--copy-mb", "16", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench_ewc.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    with open(tmp_path / "bench_ewc.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["op"], r["provider"], r["mode"], r["metric"]): r for r in rows}
    assert len(by_key) == len(rows), "duplicate (op, provider, mode, metric) keys"

    fused = _fused_providers()
    want = {("copy", "torch-copy_", m, "bandwidth")
            for m in ("start", f"{EWC}/fp32-state", f"{EWC}/bf16-state", f"{FISHER}/fp32")}
    for prov in ["avalanche-loop", "torch-foreach"] + fused:
        want |= {(EWC, prov, "fp32-state", m) for m in ("time", "bandwidth", "copy_bw_frac")}
    for prov in fused:
        want |= {(EWC, prov, "fp32-state", "speedup_vs_avalanche"), (EWC, prov, "fp32-state", "speedup_vs_foreach"),
                 (FISHER, prov, "fp32", "speedup_vs_loop"), (FISHER, prov, "fp32", "speedup_vs_foreach")}
    for prov in [p for p in fused if p != "forgetkern-torch"] or fused:       # bf16 state: native backends
        want |= {(EWC, prov, "bf16-state", "time"), (EWC, prov, "bf16-state", "copy_bw_frac")}
    for prov in ["python-loop", "torch-foreach-addcmul"] + fused:
        want |= {(FISHER, prov, "fp32", m) for m in ("time", "bandwidth", "copy_bw_frac", "peak_mem:torch_alloc")}
    missing = want - set(by_key)
    assert not missing, f"missing rows: {sorted(missing)}"

    sizes = {int(r["size"]) for r in rows if r["op"] != "copy"}
    assert len(sizes) == 1 and 1.5e5 < sizes.pop() < 3e5
    for key in want:
        r = by_key[key]
        assert math.isfinite(float(r["median"])) and float(r["median"]) >= 0, (key, r["median"])
        if key[3] == "time":
            assert float(r["p20"]) <= float(r["median"]) <= float(r["p80"]) and float(r["median"]) > 0
    goals = {k: r for k, r in by_key.items() if r["goal"]}
    native = [p for p in fused if p != "forgetkern-torch"]   # goals are set on the native kernels only
    assert {(EWC, p, "fp32-state", "copy_bw_frac") for p in native} <= set(goals)
    assert not {k for k in goals if k[1] == "forgetkern-torch"}
    assert all(r["status"] in ("PASS", "MISS") for r in goals.values())

    doc = json.loads((tmp_path / "bench_ewc.json").read_text())
    assert doc["meta"]["torch"] == torch.__version__
    assert doc["meta"]["torch_threads"] == 1 and doc["meta"]["copy_bandwidth"]["best_gbps"] > 0
    assert len(doc["rows"]) == len(rows)
    assert "PASS" in proc.stdout or "MISS" in proc.stdout


def test_bench_lora_bytes_part_counts_the_tile_model(tmp_path):
    """The bytes part of bench_lora.py: interpreter counts equal to the tile model, outputs written once."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_lora.py"), "--part", "bytes", "--bytes-tokens", "40",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench_lora.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(tmp_path / "bench_lora.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    stores = [float(r["median"]) for r in rows if r["metric"] == "stores_vs_outputs"]
    assert len(stores) == 4 and all(s == 1.0 for s in stores)
    ratios = [float(r["median"]) for r in rows if r["metric"] == "min_vs_peft"]
    assert len(ratios) == 8 and all(0 < v < 1 for v in ratios)
