"""The CUDA project_out_ and olora_loss kernels, run on the host: a numeric check without a GPU.

csrc/cuda/project_out.cu and csrc/cuda/olora_loss.cu are compiled by the host compiler against a small emulation
of the CUDA pieces they use (tests/csrc/cuda_emu_shim.h: one std::thread per CUDA thread of a block, a barrier for
__syncthreads, statics for __shared__), after their launches are rewritten into calls of the emulator; the
harness (tests/csrc/cuda_emu_harness.cpp) compares the launchers' results with float64 loops. This checks the
index math, tiling, masking, the layer tables and the reductions of the very sources that ship; timing, memory
coalescing and register use are the GPU's (tests/test_cuda_build.py checks spills; the op tests run the
kernels on a GPU where there is one).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<([^,]+),\s*([^,]+),\s*0,\s*stream>>>\(([^;]*)\);")


def _cuda_include():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isfile(os.path.join(os.environ[var], "include", "cuda_runtime_api.h")):
            return os.path.join(os.environ[var], "include")
    for path in ("/usr/local/cuda/include", "/usr/local/cuda-13.0/include"):
        if os.path.isfile(os.path.join(path, "cuda_runtime_api.h")):
            return path
    return None


def emulated_source(cu: Path) -> str:
    src = cu.read_text().replace("#include <cuda_runtime.h>", '#include "cuda_emu_shim.h"')
    out, n = LAUNCH.subn(r"emu_launch(\2, \3, [&] { \1(\4); });", src)
    assert n > 0 and "<<<" not in out, f"{cu.name}: a kernel launch the rewrite does not know"
    return out


@pytest.mark.skipif(CXX is None or _cuda_include() is None,
                    reason="needs a host C++ compiler and the CUDA headers (cuda_runtime_api.h)")
def test_project_out_and_olora_kernels_match_float64_on_the_host(tmp_path):
    sources = []
    for name in ("project_out", "olora_loss"):
        path = tmp_path / f"{name}_emu.cpp"
        path.write_text(emulated_source(ROOT / "csrc" / "cuda" / f"{name}.cu"))
        sources.append(str(path))
    exe = tmp_path / "harness"
    cmd = [CXX, "-O1", "-std=c++20", "-pthread", "-ffp-contract=off", f"-I{ROOT / 'tests' / 'csrc'}",
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}", f"-I{_cuda_include()}",
           str(ROOT / "tests" / "csrc" / "cuda_emu_harness.cpp"), *sources, "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"{' '.join(cmd)}\n{build.stderr[-6000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "fails=0" in run.stdout, run.stdout + run.stderr
    assert run.stdout.count(" ok") == 9, run.stdout
