"""On an NVIDIA GPU: the op tests on the device, then GPU timings of the ops against the same peers, the report.

    python benchmarks/gpu.py [--quick] [--out DIR]      # also: forgetkern bench --gpu; scripts/gpu_bench.sh
    python benchmarks/gpu.py --plan                      # print what would run (no GPU needed)

1. Tests: ``pytest`` on every op's test file (``tests/test_<op>.py`` for each ``forgetkern/ops/<op>.py``) with
   ``TRITON_INTERPRET=0`` and ``FORGETKERN_TEST_DEVICE=cuda``; the pass/fail/skip counts (junit XML) are stored
   with the results. Failing tests stop the run before any timing (``--keep-going`` times anyway, and says so).
2. Timings, every case checked before it is timed, providers timed in alternating rounds: each round calls
   ``triton.testing.do_bench`` (CUDA events; L2 flushed before each call; its median) once per provider; the
   row is the median over ``--rounds`` rounds, p20/p80 over rounds. Peak memory: ``_common.peak_memory`` on
   CUDA (``max_memory_allocated`` above what was live before).

   * EWC penalty + gradient (fp32 state, Llama-shaped lists of 1e6 .. 1e9 parameters, ``bench_ewc``'s shapes):
     ``avalanche-loop`` and ``torch-foreach`` vs ``forgetkern-cuda`` / ``forgetkern-triton``;
   * Fisher accumulation: ``python-loop``, ``torch-foreach-addcmul`` vs the same backends;
   * LoRA linear (bf16 base and adapters, r=16, SmolLM2 and 7B shapes, fwd+bwd): ``peft`` vs ``forgetkern``
     (``forgetkern.patch``), with ``frozen-linear`` as the lower bound.
3. The rows go to ``<out>/gpu_bench.csv/.json`` and, like any run of ``benchmarks/run.py``, to the history,
   ``SUMMARY.md`` and the plots.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(ROOT))

import _common as bc  # noqa: E402

EWC_SIZES = {"quick": [1e6, 10e6], "full": [1e6, 10e6, 100e6, 1e9]}
LORA_TOKENS = {"quick": [2048], "full": [2048, 8192]}
LORA_SHAPES = [("q_proj/o_proj", 576, 576), ("gate/up_proj", 576, 1536), ("attn 4096x4096", 4096, 4096),
               ("mlp 4096->11008", 4096, 11008)]
PEERS = ("avalanche-loop", "torch-foreach", "python-loop", "torch-foreach-addcmul", "peft")


def op_test_files(root: Path = ROOT) -> list:
    """``tests/test_<op>.py`` of every ``forgetkern/ops/<op>.py`` that has one (private modules excluded)."""
    ops = sorted(p.stem for p in (root / "forgetkern" / "ops").glob("*.py") if not p.stem.startswith("_"))
    return [f"tests/test_{op}.py" for op in ops if (root / "tests" / f"test_{op}.py").is_file()]


def test_env(base=None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(TRITON_INTERPRET="0", FORGETKERN_TEST_DEVICE="cuda")
    return env


def junit_counts(path: Path) -> dict:
    """``{tests, failures, errors, skipped}`` summed over the test suites of a junit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for s in suites:
        for k in out:
            out[k] += int(s.get(k, 0))
    return out


def run_tests(files: list, out_dir: Path, timeout_s: float) -> dict:
    xml = out_dir / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
    print(f"== op tests on the GPU: {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=test_env(), timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    counts = junit_counts(xml) if xml.exists() else {}
    return {"files": files, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1), **counts}


# ---------------------------------------------------------------------------------------------- timing


def alternate(fns: dict, rounds: int, rep_ms: int = 100) -> dict:
    """``{name: Stats}``: per round, ``do_bench`` of every provider (order reversed every other round)."""
    from triton.testing import do_bench

    samples = {n: [] for n in fns}
    names = list(fns)
    for i in range(rounds):
        for n in (names if i % 2 == 0 else names[::-1]):
            samples[n].append(float(do_bench(fns[n], warmup=25, rep=rep_ms, return_mode="median")))
    return {n: bc.stats(s) for n, s in samples.items()}


def gpu_backends() -> list:
    from forgetkern import _backend

    avail = _backend.availability("cuda")
    return [b for b in ("cuda", "triton") if avail.get(b) is None]


def bench_ewc_fisher(res, sizes, rounds) -> None:
    import torch

    import bench_ewc as be

    dev = torch.device("cuda")
    backends = gpu_backends()
    for target in sizes:
        shapes = be.llama_shapes(target)
        state = be.make_state(shapes, dev)
        params, anchors, fishers, grads = state
        n = sum(p.numel() for p in params)
        lam = 0.4
        g0 = [g.clone() for g in grads]
        ref = be.ewc_reference(params, anchors, fishers, g0, lam)
        model = be.AvalancheModel([s for s, _ in shapes], params, grads)
        keys = [k for k, _ in model.named_parameters()]
        saved, imp = dict(zip(keys, anchors)), dict(zip(keys, fishers))
        ewc = {"avalanche-loop": lambda: be.avalanche_step(model, saved, imp, lam / 2, dev),
               "torch-foreach": lambda: be.foreach_step(params, anchors, fishers, grads, lam)}
        ewc.update({f"forgetkern-{b}": (lambda b=b: be.fused_step(b, params, anchors, fishers, grads, lam))
                    for b in backends})
        for name, fn in ewc.items():
            be.restore(grads, g0)
            be.check_ewc(name, fn(), grads, ref)
        _record(res, be.EWC, "fp32-state", n, ewc, rounds, nbytes=20 * n)
        f0 = [f.clone() for f in fishers]
        want, bounds = be.fisher_reference(f0, grads)
        fis = {"python-loop": lambda: be.fisher_loop(fishers, grads),
               "torch-foreach-addcmul": lambda: torch._foreach_addcmul_(fishers, grads, grads)}
        fis.update({f"forgetkern-{b}": (lambda b=b: be.fisher_fused(b, fishers, grads)) for b in backends})
        for name, fn in fis.items():
            be.restore(fishers, f0)
            fn()
            be.check_close(name, "fishers", fishers, want, bounds)
        _record(res, be.FISHER, "fp32", n, fis, rounds, nbytes=12 * n)
        del state, params, anchors, fishers, grads, g0, f0, model, saved, imp, ref, want, ewc, fis
        torch.cuda.empty_cache()


def bench_lora(res, tokens_list, rounds) -> None:
    import copy

    import torch

    import bench_lora as bl
    from forgetkern.patching import patch

    for tokens in tokens_list:
        for label, k, n in LORA_SHAPES:
            pf = bl._peft_layer(k, n, 0.0).to("cuda", torch.bfloat16)
            fk = copy.deepcopy(pf)
            patch(fk)
            w = pf.base_model.model.proj.base_layer.weight.detach()
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
            g = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16) * 0.01
            y0, y1 = pf(x), fk(x)
            torch.testing.assert_close(y1.float(), y0.float(), rtol=2e-2, atol=2e-2 * float(y0.abs().max()))
            layers = {"frozen-linear": lambda inp: torch.nn.functional.linear(inp, w), "peft": pf, "forgetkern": fk}
            fns = {name: (lambda m=m: m(x).backward(g)) for name, m in layers.items()}
            _record(res, f"lora_linear {label} {k}->{n} t={tokens} bf16", "fwd+bwd", tokens * k * n, fns, rounds)
            del pf, fk, x, g, y0, y1
            torch.cuda.empty_cache()


def _record(res, op, mode, size, fns, rounds, nbytes=None) -> None:
    sts = alternate(fns, rounds)
    for name, st in sts.items():
        res.add(bc.time_row(op, name, mode, size, st, note=f"triton.testing.do_bench median per round; "
                                                            f"{st.n} rounds"))
        if nbytes:
            res.add(bc.Row(op, name, mode, "bandwidth", size, "GB/s", bc.gbps(nbytes, st.median),
                           note="minimum bytes of the op / time"))
        mem = bc.peak_memory(fns[name], "cuda")
        res.add(bc.Row(op, name, mode, "peak_mem:cuda_alloc", size, "MB", mem["cuda_alloc"] / bc.MB,
                       note=bc.MEMORY_METHODS["cuda_alloc"]))
    for name in fns:
        if name.startswith("forgetkern"):
            for peer in fns:
                if peer in PEERS:
                    res.add(bc.Row(op, name, mode, f"speedup_vs_{peer}", size, "x",
                                   sts[peer].median / sts[name].median, note=f"time({peer}) / time"))
    print(f"   {op} {mode} size {size:,}: " + ", ".join(f"{k} {v.median:.3f} ms" for k, v in sts.items()), flush=True)


# ---------------------------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(bc.RESULTS_DIR))
    ap.add_argument("--only", default="ewc,lora", help="comma list of ewc (EWC + Fisher), lora")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5, quick 3)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--keep-going", action="store_true", help="time the ops even if a test failed")
    ap.add_argument("--tests-timeout", type=float, default=300)
    ap.add_argument("--plan", action="store_true", help="print the test files and cases; run nothing")
    args = ap.parse_args(argv)
    kind = "quick" if args.quick else "full"
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if parts - {"ewc", "lora"}:
        raise SystemExit(f"--only: ewc, lora; got {args.only!r}")
    rounds = args.rounds or (3 if args.quick else 5)
    files = op_test_files()
    if args.plan:
        print("tests:", " ".join(files))
        print("ewc/fisher sizes:", EWC_SIZES[kind] if "ewc" in parts else "-")
        print("lora tokens:", LORA_TOKENS[kind] if "lora" in parts else "-", "shapes:", LORA_SHAPES)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs an NVIDIA GPU visible to torch (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tests = {"skipped": "--skip-tests"}
    if not args.skip_tests:
        tests = run_tests(files, out, args.tests_timeout)
        print(f"== tests: {tests}", flush=True)
        if tests["rc"] != 0 and not args.keep_going:
            print("op tests failed on the GPU: no timings (--keep-going times anyway)", file=sys.stderr)
            return 1
    os.environ["TRITON_INTERPRET"] = "0"
    meta = bc.machine_info("cuda")
    meta.update(gpu_tests=tests, rounds=rounds, timer="triton.testing.do_bench (CUDA events, median)",
                driver=_driver())
    res = bc.Results("gpu_bench", meta)
    if tests.get("rc") not in (0, None):
        res.notes.append(f"op tests failed on this GPU ({tests}); timed with --keep-going")
    torch.manual_seed(0)
    if "ewc" in parts:
        bench_ewc_fisher(res, EWC_SIZES[kind], rounds)
    if "lora" in parts:
        bench_lora(res, LORA_TOKENS[kind], rounds)
    csv_path, json_path = res.write(out)
    print(f"wrote {csv_path} and {json_path}")
    import run as runner

    doc = __import__("json").loads(json_path.read_text())
    rec = runner.BenchRun("gpu_bench", list(argv or []), True, 0.0, [doc])
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    runner.append_history(out, run_id, args.quick, [rec])
    print(f"wrote {runner.write_summary(out, {'gpu_bench': set(PEERS)})}")
    for p in runner.write_plots(out):
        print(f"wrote {p}")
    return 0


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi unavailable"


if __name__ == "__main__":
    sys.exit(main())
