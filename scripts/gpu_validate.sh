#!/usr/bin/env bash
# Validate forgetkern on a machine with a CUDA GPU: set up the dev environment (scripts/dev_setup.sh, CUDA
# extension included), print the backend table, then run the op tests with every backend on CUDA tensors
# (torch, cuda, triton compiled for the GPU) besides the CPU ones, and time lora_linear per backend (the numbers
# behind `auto`'s choice of triton over cuda for that op). Without a GPU the test run would be the ordinary
# CPU/interpreter one, so the script refuses instead.
#
#   bash scripts/gpu_validate.sh                 # setup + tests, about 10 minutes on a 16-core machine
#   SKIP_SETUP=1 bash scripts/gpu_validate.sh    # environment already set up: tests only
#
# Environment: VENV (default .venv), SKIP_SETUP (1: do not run dev_setup.sh), TEST_TIMEOUT (seconds for the
# test run, default 480), REPORT_DIR (where the JUnit XML and the log go, default gpu_validate/), PYTEST_ARGS
# (extra pytest arguments, e.g. "-x" or "-k lora"). Exit status: pytest's; 124 if the test run timed out;
# 2 if no CUDA device is visible.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TEST_TIMEOUT=${TEST_TIMEOUT:-480}
REPORT_DIR=${REPORT_DIR:-gpu_validate}
mkdir -p "$REPORT_DIR"

if [ "${SKIP_SETUP:-0}" != "1" ]; then
    # the CUDA extension is the point of the exercise: build it (dev_setup.sh's auto-detection would skip it
    # silently where nvcc is missing; forcing it makes that an error)
    FORGETKERN_BUILD_CUDA=${FORGETKERN_BUILD_CUDA:-1} MAX_JOBS=${MAX_JOBS:-$(nproc)} bash scripts/dev_setup.sh
fi
PY="$VENV/bin/python"

"$PY" - <<'EOF' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda}); "
             "run this script on a GPU machine")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}")
EOF

echo "== backend table (forgetkern env) =="
"$VENV/bin/forgetkern" env

# The op tests: every backend against its oracle on CPU tensors and on CUDA tensors (tests/_helpers.py
# backend_devices). TRITON_INTERPRET must not leak in from the caller: Triton has to compile for the GPU.
OP_TESTS=(
    tests/test_backend.py
    tests/test_ewc_penalty.py
    tests/test_ewc_delta_w.py
    tests/test_fisher_accumulate.py
    tests/test_linear_persample_sq_grad.py
    tests/test_lora_linear.py
    tests/test_lora_linear_eager.py
    tests/test_lora_dropout.py
    tests/test_lwf_loss.py
    tests/test_triton_ops.py
)
echo "== op tests on the GPU (timeout ${TEST_TIMEOUT}s) =="
set +e
env -u TRITON_INTERPRET -u FORGETKERN_TEST_INTERPRET -u FORGETKERN_BACKEND \
    timeout --signal=INT --kill-after=30 "$TEST_TIMEOUT" \
    "$PY" -m pytest -q -m "not slow" -rs --durations=15 -p no:cacheprovider \
    --junitxml="$REPORT_DIR/gpu_validate.xml" ${PYTEST_ARGS:-} "${OP_TESTS[@]}" 2>&1 | tee "$REPORT_DIR/gpu_validate.log"
rc=${PIPESTATUS[0]}
set -e
# how many tests ran on CUDA tensors (ids torch-cuda, triton-cuda, cuda, or a cuda device parameter;
# tests/test_triton_ops.py runs on the GPU as a whole, without such ids)
"$PY" - "$REPORT_DIR/gpu_validate.xml" <<'EOF' || true
import re, sys, xml.etree.ElementTree as ET
try:
    cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
except (OSError, ET.ParseError):
    sys.exit(0)
on_gpu = {"passed": 0, "failed": 0, "skipped": 0}
for c in cases:
    if not re.search(r"\[(.*-)?(cuda|torch-cuda|triton-cuda)(-.*)?\]", c.get("name", "")):
        continue
    kind = "failed" if c.find("failure") is not None or c.find("error") is not None else \
        "skipped" if c.find("skipped") is not None else "passed"
    on_gpu[kind] += 1
print("tests on CUDA tensors:", ", ".join(f"{v} {k}" for k, v in on_gpu.items()))
EOF
echo "== lora_linear on the GPU: fwd+bwd per backend (median of CUDA-event timings) =="
env -u TRITON_INTERPRET -u FORGETKERN_BACKEND timeout 120 "$PY" - <<'EOF' || echo "(timing failed or timed out)"
import torch, forgetkern
from forgetkern.ops.lora_linear import LoraAdapter, lora_linear
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
for m, k, n, p in ((4096, 4096, 4096, 0.0), (4096, 4096, 4096, 0.1), (4096, 4096, 11008, 0.1)):
    x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
    w = torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
    a = (torch.randn(16, k, device=dev, dtype=dt) / k ** 0.5).requires_grad_()
    b = (torch.randn(n, 16, device=dev, dtype=dt) / 4).requires_grad_()
    ad, g, row = [LoraAdapter(a, b, 2.0, p)], torch.randn(m, n, device=dev, dtype=dt), []
    for backend in ("torch", "cuda", "triton"):
        try:
            with forgetkern.use_backend(backend):
                times = []
                for i in range(12):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    lora_linear(x, w, None, ad, training=True, seed=i).backward(g)
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e))
            row.append(f"{backend} {sorted(times[2:])[len(times[2:]) // 2]:.3f} ms")
        except Exception as exc:  # report, keep going
            row.append(f"{backend} failed: {type(exc).__name__}: {str(exc)[:80]}")
    print(f"bf16 M={m} K={k} N={n} r=16 p={p}: " + " | ".join(row))
EOF
echo "== backend table after the run =="
"$VENV/bin/forgetkern" env
exit "$rc"
