#!/usr/bin/env bash
# GPU check and benchmark on a fresh NVIDIA machine (H100/H200), bounded to ~10 minutes:
#   1. a venv with torch (the package index's CUDA build) and the test/benchmark dependencies;
#   2. forgetkern built in place (CPU extension; the CUDA extension too when nvcc is found, else the cuda
#      backend is reported unavailable and the Triton kernels are what runs on the GPU);
#   3. forgetkern env, then `python -m benchmarks.run --gpu`: the op tests on the device, then the timings
#      against the same peers (triton.testing.do_bench, alternating rounds), results in $OUT_DIR.
#
#   scripts/gpu_bench.sh                 # quick sizes (default; fits the 10-minute bound)
#   QUICK=0 scripts/gpu_bench.sh         # full sizes (up to 1e9 parameters; ~15 min)
# Environment: TORCH_VERSION (default 2.14.1), PYTHON (python3), VENV (.venv-gpu), OUT_DIR
# (benchmarks/results/gpu), MAX_JOBS (nproc), TORCH_CUDA_ARCH_LIST (8.0;9.0+PTX), BUDGET_S (570).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
OUT_DIR=${OUT_DIR:-benchmarks/results/gpu}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
QUICK=${QUICK:-1}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || {
  echo "gpu_bench.sh: no NVIDIA GPU (nvidia-smi failed)" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
timeout "$(left)" "$PY" -m pip install --quiet --upgrade pip
timeout "$(left)" "$PY" -m pip install --quiet "torch==${TORCH_VERSION}" triton ninja "setuptools>=77" wheel \
  numpy tqdm transformers peft pytest hypothesis expecttest matplotlib
if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null; then
  for d in /usr/local/cuda /usr/local/cuda-*; do [ -x "$d/bin/nvcc" ] && export CUDA_HOME="$d" && break; done
fi
if [ -n "${CUDA_HOME:-}" ] || command -v nvcc >/dev/null; then
  echo "gpu_bench.sh: building the CPU and CUDA extensions (archs $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
else
  echo "gpu_bench.sh: no CUDA toolkit (nvcc) on this machine: CPU extension only; the cuda backend will be" \
       "reported unavailable, the Triton kernels run on the GPU"
  export FORGETKERN_BUILD_CUDA=0
fi
if ! timeout "$(left)" "$PY" setup.py -q build_ext --inplace; then
  # e.g. a toolkit whose CUDA major differs from torch's: keep going with the CPU extension + Triton
  echo "gpu_bench.sh: the CUDA extension did not build; CPU extension only (cuda backend unavailable)" >&2
  FORGETKERN_BUILD_CUDA=0 timeout "$(left)" "$PY" setup.py -q build_ext --inplace
fi
"$PY" -m forgetkern env
ARGS=(--gpu --out "$OUT_DIR")
[ "$QUICK" = "1" ] && ARGS+=(--quick)
timeout "$(left)" "$PY" -m benchmarks.run "${ARGS[@]}"
echo "gpu_bench.sh: done in $(( $(date +%s) - START )) s; results in $OUT_DIR (SUMMARY.md, gpu_bench.csv)"
