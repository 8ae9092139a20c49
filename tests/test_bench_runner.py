"""benchmarks/run.py (``forgetkern bench``): discovery, the runner interface, history with provenance, SUMMARY.md
and the plots; one real benchmark (bench_ewc, tiny) through the runner and the console script."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as runner  # noqa: E402  (benchmarks/run.py)

TOY = '''
"""A toy benchmark: forgetkern-toy vs peer-a (and a lower bound that is not a peer) at sizes given by --sizes."""
import argparse, sys
sys.path.insert(0, {bench_dir!r})
import _common as bc

PEERS = ("peer-a",)


def runner_argv(quick, device):
    return ["--sizes", "10,100" if quick else "10,100,1000", "--device", device]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    res = bc.Results("bench_toy", bc.machine_info(a.device))
    for s in map(int, a.sizes.split(",")):
        for prov, ms, mb in (("forgetkern-toy", 1.0 * a.scale, 2.0), ("peer-a", 4.0 * a.scale, 8.0),
                             ("frozen-bound", 0.5, 1.0)):
            res.add(bc.Row("toy_op", prov, "fp32", "time", s, "ms", ms * s, 0.9 * ms * s, 1.1 * ms * s))
            res.add(bc.Row("toy_op", prov, "fp32", "peak_mem:torch_alloc", s, "MB", mb))
    res.write(a.out)
    return 0
'''

BROKEN = '''
def main(argv=None):
    raise RuntimeError("this benchmark is broken on purpose")
'''


def _history(out):
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def bench_dir(tmp_path):
    d = tmp_path / "benches"
    d.mkdir()
    (d / "bench_toy.py").write_text(TOY.format(bench_dir=str(ROOT / "benchmarks")))
    (d / "bench_broken.py").write_text(BROKEN)
    (d / "not_a_bench.py").write_text("raise SystemExit('must not be imported')\n")
    yield d
    for name in ("bench_toy", "bench_broken"):
        sys.modules.pop(name, None)


def test_runner_discovers_runs_appends_history_and_summarises(bench_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert list(runner.discover(bench_dir)) == ["broken", "toy"]
    base = ["--bench-dir", str(bench_dir), "--out", str(out), "--device", "cpu"]

    # a failing benchmark is reported (exit 1) without losing the other's results
    assert runner.main(base + ["--quick", "--args", "toy=--scale 2"]) == 1
    assert "this benchmark is broken on purpose" in capsys.readouterr().out
    rows = _history(out)
    assert {r["bench"] for r in rows} == {"bench_toy"}
    assert {int(r["size"]) for r in rows} == {10, 100}                     # runner_argv(quick=True)
    assert {r["quick"] for r in rows} == {"True"}
    for field in ("commit", "torch", "triton", "cpu_model", "torch_threads", "date", "device_name"):
        assert all(r[field] not in ("", None) for r in rows), field
    assert rows[0]["torch"] == torch.__version__
    assert (out / "quick" / "bench_toy.json").exists() and not (out / "bench_toy.json").exists()

    # a second (full) run of the toy only is appended; the summary shows its latest run, ratios vs PEERS only
    assert runner.main(base + ["--only", "toy", "--no-plot"]) == 0
    rows = _history(out)
    runs = sorted({r["run_id"] for r in rows})
    assert len(runs) == 2 and {int(r["size"]) for r in rows if r["quick"] == "False"} == {10, 100, 1000}
    assert (out / "bench_toy.json").exists() and (out / "bench_toy.csv").exists()          # full: the snapshot
    jl = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [d["quick"] for d in jl] == [True, False] and jl[1]["meta"]["torch"] == torch.__version__
    summary = (out / "SUMMARY.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("| toy_op")]
    assert len(table) == 3                                  # one line per size of the latest run
    for line in table:                                      # 4 ms * s / 1 ms * s; 2 MB / 8 MB
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3:7] == ["forgetkern-toy", "peer-a", "4", "0.25 (torch_alloc)"], cells
    assert "frozen-bound" not in summary and "(full sizes)" in summary

    # --plot-only redraws from the data alone
    (out / "SUMMARY.md").unlink()
    assert runner.main(["--plot-only", "--bench-dir", str(bench_dir), "--out", str(out), "--only", "toy"]) == 0
    png = out / "plots" / "bench_toy__toy_op.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "SUMMARY.md").exists()

    with pytest.raises(SystemExit, match="unknown benchmark"):
        runner.main(base + ["--only", "nope"])


def test_bench_ewc_through_the_runner_writes_rows_with_provenance(tmp_path):
    """The real bench_ewc, tiny, through `forgetkern bench`'s entry point (in process)."""
    from forgetkern import cli

    out = tmp_path / "res"
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["bench", "--quick", "--only", "ewc", "--out", str(out), "--device", "cpu", "--no-modelled",
                       "--args", "ewc=--params 3e4 --repeat 1 --copy-mb 1 --threads 1 --no-memory"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rows = _history(out)
    assert rows and {r["bench"] for r in rows} == {"bench_ewc"}
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert {r["commit"] for r in rows} == {git or "none (no commit or not a git checkout)"}
    assert {r["torch_threads"] for r in rows} == {"1"} and {r["cuda"] for r in rows} == {str(torch.version.cuda)}
    times = {(r["op"], r["provider"]): float(r["median"]) for r in rows
             if r["metric"] == "time" and r["mode"] in ("fp32-state", "fp32")}
    assert ("ewc_penalty_and_grad", "avalanche-loop") in times
    summary = (out / "SUMMARY.md").read_text()
    m = re.search(r"\| ewc_penalty_and_grad \| fp32-state \| [\d,]+ \| (forgetkern-\w+) \| avalanche-loop \| "
                  r"([\d.e+-]+) \|", summary)
    assert m, summary
    want = times[("ewc_penalty_and_grad", "avalanche-loop")] / times[("ewc_penalty_and_grad", m.group(1))]
    assert math.isclose(float(m.group(2)), want, rel_tol=2e-3)
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["bench_ewc__ewc_penalty_and_grad.png", "bench_ewc__fisher_accumulate.png"]


def test_every_benchmark_offers_the_runner_interface():
    for name, path in runner.discover().items():
        mod = runner.load(name, path)
        for quick in (True, False):
            argv = runner.bench_argv(mod, quick=quick, device="cpu")
            assert all(isinstance(a, str) for a in argv) and "--out" not in argv, (name, argv)
        assert runner.peers_of(mod), f"bench_{name}.py: declare PEERS (its baseline providers)"
    assert {"ewc", "fisher", "lora"} <= set(runner.discover())


def test_modelled_rows_are_labelled_and_summarised_apart(tmp_path):
    import _common as bc

    assert bc.roofline_us(3.0e12) == pytest.approx(1e6)                       # 3 TB at 3 TB/s: one second
    assert bc.roofline_us(1.0, 800e12) == pytest.approx(1e6)                  # compute-bound
    rows = (bc.modelled_rows("toy_op", "forgetkern-triton", "fp32", 1000, 20e6)
            + bc.modelled_rows("toy_op", "peer-a", "fp32", 1000, 68e6))
    assert all("modelled" in r.mode and r.note.startswith("modelled, not measured") for r in rows)
    doc = {"benchmark": "modelled_gpu", "meta": bc.machine_info("cpu"), "notes": [],
           "rows": [__import__("dataclasses").asdict(r) for r in rows]}
    runner.append_history(tmp_path, "r1", True, [runner.BenchRun("modelled_gpu", [], True, 0.0, [doc])])
    text = runner.write_summary(tmp_path).read_text()
    assert "**Modelled, not measured**" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| toy_op") and "peer-a" in ln)
    assert line.rstrip(" |").endswith("3.4")                                  # 68 MB / 20 MB, both bandwidth-bound
    assert "| toy_op | modelled" not in text.split("**Modelled")[0]           # not in the measured ratio table


def test_gpu_script_plans_without_a_gpu(capsys, tmp_path):
    import gpu

    files = gpu.op_test_files()
    assert "tests/test_ewc_penalty.py" in files and "tests/test_fisher_accumulate.py" in files
    assert all((ROOT / f).is_file() for f in files)
    assert gpu.test_env({"TRITON_INTERPRET": "1"}) == {"TRITON_INTERPRET": "0", "FORGETKERN_TEST_DEVICE": "cuda"}
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/>'
                   '<testsuite tests="3" failures="0" errors="1" skipped="0"/></testsuites>')
    assert gpu.junit_counts(xml) == {"tests": 8, "failures": 1, "errors": 1, "skipped": 2}
    assert gpu.main(["--plan", "--quick"]) == 0
    assert "tests/test_ewc_penalty.py" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert gpu.main(["--quick", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit, match="--only"):
        gpu.main(["--only", "nope", "--plan"])
