"""Modelled (not measured) GPU rows of every benchmark that has ``modelled_rows(quick)``: writes
``<out>/modelled_gpu.csv/.json``. Runs the Triton kernels in the interpreter to count their bytes, so
``TRITON_INTERPRET=1`` is set here before anything imports Triton kernels (``benchmarks/run.py`` starts this in
a child process).

    python benchmarks/modelled.py --quick --only ewc,lora --out /tmp/res
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import _common as bc  # noqa: E402
import run as runner  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(bc.RESULTS_DIR))
    args = ap.parse_args(argv)
    meta = bc.machine_info("cpu")
    meta.update(modelled=True, model={"device": "H100 SXM", "copy_bytes_per_s": bc.H100_COPY_BPS,
                                      "bf16_matmul_flops": bc.H100_BF16_FLOPS, "note": bc.MODELLED_NOTE},
                quick=args.quick)
    res = bc.Results("modelled_gpu", meta)
    res.notes.append(bc.MODELLED_NOTE)
    for name, path in runner.select(runner.discover(), args.only).items():
        fn = getattr(runner.load(name, path), "modelled_rows", None)
        if not callable(fn):
            continue
        for row in fn(quick=args.quick):
            if "modelled" not in row.mode or "modelled" not in row.note:
                raise AssertionError(f"bench_{name}.modelled_rows: row {row.key} is not labelled modelled")
            res.add(row)
        print(f"bench_{name}: modelled rows done", flush=True)
    paths = res.write(args.out)
    print(res.summary([("MB", "modelled_bytes"), ("H100 us (modelled)", "modelled_h100_time")]))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
