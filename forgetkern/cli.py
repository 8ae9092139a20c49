"""Command line: ``forgetkern env``, ``forgetkern demo`` and ``forgetkern bench`` (also ``python -m forgetkern ...``)."""

from __future__ import annotations

import argparse
import os
import platform
import sys

# The ops whose backend choice `forgetkern env` reports, as (public name, dispatch name).
REPORTED_OPS = (
    ("fisher_accumulate_", "fisher_accumulate_"),
    ("ewc_penalty / ewc_penalty_and_grad_", "ewc_fused"),
    ("lora_linear (forgetkern.patch)", "lora_linear"),
    ("linear_persample_sq_grad_", "linear_persample_sq_grad_"),
    ("ewc_delta_w / ewc_delta_w_and_grad_", "ewc_delta_w"),
    ("lwf_loss", "lwf_loss"),
)


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def _cpu_isa(ext) -> str:
    """The instruction set the CPU kernels run with, and why."""
    ops = ext.cpu_ops()
    if ops is None:
        return "n/a (CPU extension not loaded)"
    try:
        isa = ops.cpu_isa()
    except RuntimeError as e:
        return f"error: {e}"
    value = os.environ.get("FORGETKERN_CPU_ISA")
    if value:
        return f"{isa} (FORGETKERN_CPU_ISA={value})"
    return f"{isa} (best this CPU supports; FORGETKERN_CPU_ISA=baseline|avx2|avx512 lowers it)"


def env_report() -> str:
    import torch

    from forgetkern import __version__, _backend, _ext

    info = _ext.build_info()
    lines = [
        f"forgetkern     {info.get('version', __version__)}",
        f"python         {platform.python_version()} ({platform.machine()}, {platform.system()})",
        f"torch          {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton         {_version('triton')}",
        f"transformers   {_version('transformers')}",
        f"peft           {_version('peft')}",
        f"cuda device    {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}",
        "",
        "build",
        f"  built against torch {info.get('torch_version', '?')}, CUDA {info.get('cuda_version') or 'none'}, "
        f"archs {', '.join(info.get('cuda_archs') or []) or 'none'}",
        f"  CPU extension  (forgetkern._C)    "
        f"{'loaded' if _ext.cpu_ops() is not None else 'NOT loaded: ' + str(_ext.cpu_ext_error())}",
        f"  CPU ISA        {_cpu_isa(_ext)}",
        f"  CUDA extension (forgetkern._cuda) "
        f"{'loaded' if _ext.cuda_ops() is not None else 'NOT loaded: ' + str(_ext.cuda_ext_error())}",
        f"  Triton         {'available' if _backend.triton_available() else 'not installed'}"
        f"{' (interpreter: TRITON_INTERPRET=1)' if _backend.triton_interpreting() else ''}",
        "",
        f"backends (requested: {_backend.requested('*')}; FORGETKERN_BACKEND or forgetkern.use_backend)",
    ]
    devices = ["cpu", "cuda"]
    for public, op in REPORTED_OPS:
        for dev in devices:
            try:
                chosen = _backend.resolve(op, torch.device(dev))
            except _backend.BackendError as e:
                chosen = f"error: {e}"
            avail = _backend.availability(dev, op)
            has = _backend.SUPPORTED_BY_OP[op]
            usable = ", ".join(name for name, why in avail.items() if why is None and name in has)
            lines.append(f"  {public:<38} {dev:<5} -> {chosen:<7} (usable here: {usable})")
    return "\n".join(lines)


def _bench_main(argv) -> int:
    """``forgetkern bench``: the suite in ``benchmarks/`` of a source checkout (not shipped in the wheel)."""
    import importlib.util
    from pathlib import Path

    candidates = [Path(os.environ["FORGETKERN_BENCH_DIR"])] if os.environ.get("FORGETKERN_BENCH_DIR") else []
    candidates += [Path(__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"]
    for d in candidates:
        if (d / "run.py").is_file():
            spec = importlib.util.spec_from_file_location("forgetkern_bench_runner", d / "run.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod          # dataclasses look their module up there
            spec.loader.exec_module(mod)
            return mod.main(argv)
    print("forgetkern bench needs the benchmarks/ folder of a forgetkern source checkout (it is not part of the "
          "installed package): run it from the checkout's root, or set FORGETKERN_BENCH_DIR to that folder; "
          f"looked in {', '.join(str(c) for c in candidates)}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the runner owns its options (forgetkern bench --help)
        return _bench_main(argv[1:])
    if argv[:1] == ["demo"]:  # the demo owns its options (forgetkern demo --help)
        from forgetkern import demo

        return demo.main(argv[1:])
    parser = argparse.ArgumentParser(prog="forgetkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions, what was built, and which backend each op uses per device")
    sub.add_parser("demo", help="fine-tune SmolLM2 on code and measure forgetting for each method "
                                "(forgetkern demo --help)")
    sub.add_parser("bench", help="run the benchmark suite of a source checkout; data, SUMMARY.md, plots "
                                 "(forgetkern bench --help)")
    args = parser.parse_args(argv)
    if args.command == "env":
        print(env_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
