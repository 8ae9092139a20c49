"""Build checks that need no GPU.

* Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 (-Xptxas -v), and ptxas reports 0 bytes of
  spill stores and spill loads for every function on both archs; the registers per kernel are recorded (printed
  with -s, and as junit properties).
* The CUDA LoRA backend (csrc/cuda/lora_linear.cu) holds only the rank-r kernels (shrink, expand, dropout dA):
  no tensor-core GEMM of its own (the frozen GEMM is cuBLAS's), no local memory, in the SASS of both archs.
* Its torch glue (csrc/cuda/lora_linear.cpp) built for the host against host versions of those kernels
  (tests/csrc/lora_linear_host.cpp) matches the reference op within the suite's earned tolerance.
* The CUDA merge_task_vectors launch plan and kernel body (csrc/cuda/merge_task_vectors.cu), run block by block
  on the CPU (tests/csrc/merge_task_vectors_host.cu), are bit-identical to the per-element math.
* forgetkern._cuda imports without a GPU, and the build metadata says CUDA when the extension exists.
* forgetkern._ext refuses extensions built against another torch / CUDA, with one actionable warning.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgetkern import _ext

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isfile(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.path.join(os.environ[var], "bin", "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None)


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")

# ---- ptxas -v parsing ----------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_ARCH = re.compile(r"for '(sm_\w+)'")


def parse_ptxas(text: str) -> list:
    """Records of `nvcc -Xptxas -v` output, one per (function, arch): function, arch, kernel (an entry
    function), registers (entries only), stack, spill_stores, spill_loads."""
    records: dict = {}
    arch = None
    current = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            arch = m.group(2)
            current = records.setdefault((m.group(1), arch), {"function": m.group(1), "arch": arch, "kernel": True})
            continue
        m = _ARCH.search(line)  # e.g. "Compiling device function ... for 'sm_90'" or "... info for 'sm_80'"
        if m and "Compiling" in line:
            arch = m.group(1)
        m = _PROPS.search(line)
        if m:
            current = records.setdefault((m.group(1), arch), {"function": m.group(1), "arch": arch,
                                                              "kernel": False})
            continue
        m = _SPILL.search(line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _REGS.search(line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
    return list(records.values())


def test_parse_ptxas_sample():
    sample = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
ptxas info    : Function properties for _Z1kPf
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 3512 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 38 registers, used 1 barriers
"""
    recs = {(r["function"], r["arch"]): r for r in parse_ptxas(sample)}
    assert recs[("_Z1kPf", "sm_80")] == {"function": "_Z1kPf", "arch": "sm_80", "kernel": True, "stack": 0,
                                         "spill_stores": 8, "spill_loads": 4, "registers": 40}
    assert recs[("_Z1kPf", "sm_90")]["registers"] == 38 and recs[("_Z1kPf", "sm_90")]["spill_stores"] == 0


def demangle(names: list) -> dict:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


@functools.lru_cache(maxsize=None)
def compile_cu(path: str, tmp: str) -> tuple:
    cmd = [NVCC, "-std=c++17", "-O3", "-DFK_CUDA", "-I", str(ROOT / "csrc" / "include"), "-Xptxas", "-v"]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    cmd += ["-c", path, "-o", os.path.join(tmp, Path(path).stem + ".o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, " ".join(cmd)


@pytest.fixture(scope="module")
def nvcc_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("nvcc"))


# ---- the kernels as built: read from forgetkern._cuda when it is newer than every CUDA source ----------------
# The set-up already compiled every .cu for sm_80 and sm_90 (TORCH_CUDA_ARCH_LIST); reading the resource usage
# of the cubins in the built extension (cuobjdump, milliseconds) checks exactly what ships, instead of
# compiling every file a second time (minutes on 2 cores). A source edited after the build is compiled here.

_KERNEL_DECL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(")
_RES_ARCH = re.compile(r"^arch = (sm_\d+)", re.M)
_RES_FUN = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuda_sources() -> list:
    return CU_FILES + sorted((ROOT / "csrc").rglob("*.cuh")) + sorted((ROOT / "csrc" / "include").rglob("*.h"))


def built_cuda_so():
    """Path of the built forgetkern._cuda if it exists and is newer than every CUDA source, else None."""
    sos = sorted((ROOT / "forgetkern").glob("_cuda*.so"))
    if not sos:
        return None
    newest = max(p.stat().st_mtime for p in _cuda_sources())
    return sos[0] if sos[0].stat().st_mtime >= newest else None


def kernel_names(cu: Path) -> set:
    return set(_KERNEL_DECL.findall(cu.read_text()))


def _of_file(mangled: str, names: set) -> bool:
    return any(f"{len(n)}{n}" in mangled for n in names)  # Itanium mangling: <length><name>


@functools.lru_cache(maxsize=None)
def built_resources(so: str) -> list:
    """Records (function, arch, registers, stack, local, shared) of every kernel in the built extension."""
    tool = _cuobjdump()
    out = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, check=True).stdout
    records = []
    arch_at = [(m.start(), m.group(1)) for m in _RES_ARCH.finditer(out)]
    for m in _RES_FUN.finditer(out):
        arch = [a for pos, a in arch_at if pos < m.start()][-1]
        records.append({"function": m.group(1), "arch": arch, "kernel": True, "registers": int(m.group(2)),
                        "stack": int(m.group(3)), "shared": int(m.group(4)), "local": int(m.group(5)),
                        "spill_stores": int(m.group(5)), "spill_loads": int(m.group(5))})
    return records


def cu_records(cu: Path, nvcc_tmp: str) -> tuple:
    """(records, source): the kernels of ``cu`` from the built extension when it is current, else from
    compiling ``cu`` with nvcc -Xptxas -v."""
    so = built_cuda_so()
    if so is not None and _cuobjdump() is not None:
        names = kernel_names(cu)
        records = [r for r in built_resources(str(so)) if _of_file(r["function"], names)]
        if records:  # none: the build predates this file's kernels (e.g. a file merged in after it): compile it
            return records, f"built {so.name}"
    if NVCC is None:
        pytest.skip("nvcc not found and no current forgetkern._cuda build (set CUDA_HOME or put nvcc on PATH)")
    rc, out, cmd = compile_cu(str(cu), nvcc_tmp)
    assert rc == 0, f"nvcc failed ({cmd}):\n{out[-6000:]}"
    return parse_ptxas(out), "nvcc -Xptxas -v"


@pytest.mark.skipif(not CU_FILES, reason="no csrc/cuda/*.cu")
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles_without_spills(cu, nvcc_tmp, record_property):
    records, source = cu_records(cu, nvcc_tmp)
    kernels = [r for r in records if r["kernel"]]
    assert kernels, f"no kernels of {cu.name} found ({source})"
    for name in {r["function"] for r in kernels}:
        assert {r["arch"] for r in kernels if r["function"] == name} == set(ARCHS), f"{name}: not built for {ARCHS}"
    missing = [r["function"] for r in records if "spill_stores" not in r]
    assert not missing, f"no spill line parsed for {missing[:3]}"
    names = demangle(sorted({r["function"] for r in records}))
    spills = [f"{names[r['function']]} [{r['arch']}]: {r['spill_stores']} B spill stores, {r['spill_loads']} B "
              f"spill loads, {r.get('stack', 0)} B stack" for r in records
              if r["spill_stores"] or r["spill_loads"] or r.get("stack")]
    table = sorted((names[r["function"]], r["arch"], r.get("registers")) for r in kernels)
    print(f"\n{cu.name} ({source}): {len(table) // len(ARCHS)} kernels x {len(ARCHS)} archs")
    for arch in ARCHS:
        regs = [t[2] for t in table if t[1] == arch]
        print(f"  {arch}: registers min {min(regs)} max {max(regs)}")
    for name, arch, regs in table:
        print(f"  {regs:4d} regs  {arch}  {name}")
        record_property(f"{cu.name}:{arch}:{name}", regs)
    assert not spills, "register spills:\n" + "\n".join(spills)


@needs_nvcc
def test_built_resources_agree_with_ptxas(nvcc_tmp):
    """The two sources of the spill check agree: the smallest .cu compiled with nvcc -Xptxas -v reports the same
    kernels and registers as the built extension's cubins (when the build is current)."""
    so = built_cuda_so()
    if so is None or _cuobjdump() is None:
        pytest.skip("no current forgetkern._cuda build to compare with")
    cu = min(CU_FILES, key=lambda p: p.stat().st_size)
    rc, out, cmd = compile_cu(str(cu), nvcc_tmp)
    assert rc == 0, out[-3000:]
    ptxas = {(r["function"], r["arch"]): r["registers"] for r in parse_ptxas(out) if r["kernel"]}
    names = kernel_names(cu)
    built = {(r["function"], r["arch"]): r["registers"] for r in built_resources(str(so))
             if _of_file(r["function"], names)}
    assert ptxas and set(ptxas) == set(built), (sorted(ptxas), sorted(built))
    assert ptxas == built


# ---- the CUDA LoRA backend: rank-r kernels only, and its glue checked on the host ---------------------------

LORA_KERNELS = {"lora_shrink_kernel", "lora_expand_kernel", "lora_drop_tgemm_kernel"}


def _cuobjdump():
    cands = [os.path.join(os.path.dirname(NVCC), "cuobjdump")] if NVCC else []
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:  # Triton's wheel carries one
        cands.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in cands if os.path.isfile(c)), None) or shutil.which("cuobjdump")


def _sass_by_function(text: str) -> dict:
    """{(mangled function, arch): SASS text} from cuobjdump -sass output."""
    out, arch, fun = {}, None, None
    for line in text.splitlines():
        m = _RES_ARCH.match(line.strip())
        if m:
            arch, fun = m.group(1), None
            continue
        if "Function : " in line:
            fun = line.split("Function : ", 1)[1].strip()
            out[(fun, arch)] = []
            continue
        if fun is not None:
            out[(fun, arch)].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def test_lora_cu_is_rank_r_kernels_only(nvcc_tmp):
    """punica / S-LoRA design: the big GEMMs go to cuBLAS, so the .cu has the three rank-r kernels (x 3 dtypes),
    no HMMA/HGMMA (no hand-written tensor-core GEMM), and no local-memory traffic (LDL/STL) on sm_80 and sm_90."""
    cu = ROOT / "csrc" / "cuda" / "lora_linear.cu"
    assert kernel_names(cu) == LORA_KERNELS
    records, source = cu_records(cu, nvcc_tmp)
    kernels = [r for r in records if r["kernel"]]
    names = {n for n in LORA_KERNELS for r in kernels if n in r["function"]}
    assert names == LORA_KERNELS and len(kernels) == 3 * 3 * len(ARCHS), [r["function"] for r in kernels]
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0 for r in kernels)
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    so = built_cuda_so()
    binary = str(so) if source.startswith("built") else os.path.join(nvcc_tmp, "lora_linear.o")
    only = ["-fun", ",".join(sorted({r["function"] for r in kernels}))]  # the whole extension's SASS is ~1M lines
    sass = subprocess.run([tool, "-sass", *only, binary], capture_output=True, text=True)
    assert sass.returncode == 0, sass.stderr[-2000:]
    funs = {k: v for k, v in _sass_by_function(sass.stdout).items() if _of_file(k[0], LORA_KERNELS)}
    assert {arch for _, arch in funs} == set(ARCHS)
    code = "\n".join(funs.values())
    assert "FFMA" in code
    for op in ("HMMA", "HGMMA", "LDL", "STL"):
        assert not re.search(rf"\b{op}\b", code), op


@functools.lru_cache(maxsize=None)
def _host_glue():
    """csrc/cuda/lora_linear.cpp + tests/csrc/lora_linear_host.cpp as a CPU extension (ops in
    torch.ops.forgetkern_cuda_host); the build is cached by torch.utils.cpp_extension across runs."""
    from torch.utils.cpp_extension import load

    load(name="forgetkern_lora_host_glue", is_python_module=False,
         sources=[str(ROOT / "csrc" / "cuda" / "lora_linear.cpp"), str(ROOT / "tests" / "csrc" / "lora_linear_host.cpp")],
         extra_cflags=["-O1", "-std=c++20", "-DFK_LORA_HOST_GLUE"], extra_include_paths=[str(ROOT / "csrc" / "include")])
    return torch.ops.forgetkern_cuda_host


# (dtype, M, K, outs per layer, ranks, dropout_p, layer of each adapter, bias): dropout and plain adapters mixed,
# siblings, a rank above one shrink item (70 > 64), adjacent adapters without dropout sharing shrink items,
# more adapters than one launch holds (20 > 16), rank-0 adapters and an empty batch
GLUE_CASES = {
    "mixed": ((37, 45), [29], [5, 20], [0.3, 0.0], [0, 0], True),
    "siblings-rank70": ((300, 33), [40, 17], [8, 70, 3], [0.5, 0.0, 0.2], [0, 1, 0], False),
    "plain-run-siblings": ((40, 24), [10, 13], [4, 0, 70, 8], [0.0] * 4, [0, 0, 1, 1], True),  # one x read: 82 ranks
    "empty-batch": ((0, 12), [6], [3], [0.3], [0], True),
    "rank0": ((9, 20), [12], [0, 4], [0.5, 0.0], [0, 0], True),
    "20-adapters": ((70, 16), [8], [1] * 20, [0.1 * (i % 3) for i in range(20)], [0] * 20, True),
}


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None,
                    reason="no C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_lora_cuda_glue_on_host_matches_reference(dtype):
    """Every output of lora_linear_fwd / _bwd of the CUDA backend's glue (cuBLAS calls through ATen + the
    kernels' launch descriptions, run by host versions of the kernels) against the fp64 oracle, within twice the
    reference backend's own error plus one ulp (tests/test_lora_linear.py's tolerance)."""
    from forgetkern.reference import lora_linear as ref

    ops = _host_glue()
    eps = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    for name, ((m, k), ns, ranks, ps, layer, bias) in GLUE_CASES.items():
        g = torch.Generator().manual_seed(0)

        def t(*shape, sc=1.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * sc).to(dtype)

        x, ws = t(m, k), [t(n, k, sc=k ** -0.5) for n in ns]
        bs, bl = ([t(n) for n in ns], list(range(len(ns)))) if bias else ([], [])
        a = [t(r, k, sc=k ** -0.5) for r in ranks]
        b = [t(ns[layer[i]], r, sc=max(r, 1) ** -0.5) for i, r in enumerate(ranks)]
        sc, keys = [0.5 + 0.25 * i for i in range(len(ranks))], ref.dropout_keys(7, len(ranks))
        dys = [t(m, n) for n in ns]

        def run(f, up=False):
            cv = (lambda v: [u.double() for u in v]) if up else (lambda v: v)
            xx = x.double() if up else x
            ys, xa = f.lora_linear_fwd(xx, cv(ws), cv(bs), bl, cv(a), cv(b), layer, sc, ps, keys)
            xa_in = xa_ref.double() if up else xa_ref
            dx, da, db = f.lora_linear_bwd(cv(dys), xx, cv(ws), cv(a), cv(b), xa_in, layer, sc, ps, keys,
                                           True, True, True)
            return list(ys) + [xa, dx] + list(da) + list(db)

        xa_ref = ref.lora_linear_fwd(x, ws, bs, bl, a, b, layer, sc, ps, keys)[1]
        got, plain, want = run(ops), run(ref), run(ref, up=True)
        assert len(got) == len(want)
        for i, (gt, pl, wt) in enumerate(zip(got, plain, want)):
            assert gt.dtype == pl.dtype and gt.shape == wt.shape, (name, i)
            if wt.numel() == 0:
                continue
            err = (gt.double() - wt).abs().max().item()
            base = (pl.double() - wt).abs().max().item()
            tol = 2 * base + eps * wt.abs().max().item() + 1e-300
            assert err <= tol, f"{name} output {i}: error {err:.3e} > {tol:.3e} (reference {base:.3e})"


# ---- host-side multi-tensor packing (csrc/include/forgetkern/multi_tensor.h), checked without a GPU ----------

_MTA_HARNESS = r"""
#include <cstdio>
#include <cstdint>
#include <vector>
#include <random>
#include "forgetkern/multi_tensor.h"
using namespace forgetkern;

template <int DEPTH>
int check(const std::vector<int64_t>& numels) {
  const int64_t n = (int64_t)numels.size();
  std::vector<std::vector<void*>> lists(DEPTH, std::vector<void*>(n));
  for (int d = 0; d < DEPTH; ++d)
    for (int64_t t = 0; t < n; ++t) lists[d][t] = (void*)(uintptr_t)(((uint64_t)(d + 1) << 40) + 16 * (t + 1));
  void* const* ptrs[DEPTH];
  for (int d = 0; d < DEPTH; ++d) ptrs[d] = lists[d].data();
  std::vector<std::vector<int>> seen(n);
  for (int64_t t = 0; t < n; ++t) seen[t].assign((size_t)ceil_div(numels[t], kCudaChunk), 0);
  int64_t next_slot = 0;
  int bad = 0;
  int err = multi_tensor_apply<DEPTH>(n, ptrs, numels.data(), [&](const TensorListMeta<DEPTH>& m, int blocks) {
    if (blocks <= 0 || blocks > kMaxBlocksPerLaunch || m.block_offset != next_slot) ++bad;
    for (int b = 0; b < blocks; ++b) {
      const int slot = m.block_to_tensor[b];
      if (slot >= max_tensors(DEPTH)) { ++bad; continue; }
      const int64_t t = (int64_t)(((uintptr_t)m.addresses[0][slot] & 0xFFFFFFFFFFull) / 16) - 1;
      for (int d = 0; d < DEPTH; ++d) if (m.addresses[d][slot] != lists[d][t]) ++bad;
      if (m.numel[slot] != numels[t]) ++bad;
      seen[t][m.block_to_chunk[b]] += 1;
    }
    next_slot += blocks;
    return 0;
  });
  for (int64_t t = 0; t < n; ++t) for (int v : seen[t]) if (v != 1) ++bad;
  if (next_slot != count_chunks(n, numels.data(), kCudaChunk)) ++bad;
  return bad + err;
}

int main() {
  std::mt19937_64 rng(0);
  std::vector<std::vector<int64_t>> cases = {{}, {0}, {1}, {0, 0, 7}, {65536}, {65537}, {65536 * 700 + 3}};
  for (int c = 0; c < 20; ++c) {
    std::vector<int64_t> v(rng() % 400);
    for (auto& x : v) {
      const uint64_t r = rng() % 10;
      x = r < 2 ? 0 : r < 8 ? (int64_t)(rng() % 5000) : (int64_t)(rng() % 3000000);
    }
    cases.push_back(v);
  }
  int bad = 0;
  for (const auto& v : cases) bad += check<2>(v) + check<3>(v) + check<4>(v);
  std::printf("%s %d\n", bad ? "FAIL" : "OK", bad);
  return bad != 0;
}
"""


def test_multi_tensor_apply_covers_every_chunk_once(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "mta.cpp"
    src.write_text(_MTA_HARNESS)
    exe = tmp_path / "mta"
    proc = subprocess.run([cxx, "-std=c++17", "-O1", "-I", str(ROOT / "csrc" / "include"), str(src), "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("OK"), run.stdout + run.stderr


# ---- the built extension ---------------------------------------------------------------------------------------

HAS_CUDA_EXT = importlib.util.find_spec("forgetkern._cuda") is not None


@pytest.mark.skipif(not HAS_CUDA_EXT, reason="forgetkern._cuda is not built")
def test_build_info_reports_cuda():
    info = _ext.build_info()
    assert info["built_cuda"] is True and info["built_cpu"] is True
    assert info["cuda_version"] and info["cuda_archs"]
    assert info["version"].endswith("+cu" + info["cuda_version"].replace(".", ""))
    assert info["compiler"]["nvcc"]
    if _ext.compat_error("cuda", info, torch.__version__, torch.version.cuda) is None:
        assert _ext.cuda_ops() is not None, _ext.cuda_ext_error()
        assert _ext.cuda_ext_error() is None


def test_build_info_is_valid_json_or_absent():
    path = _ext.BUILD_INFO_PATH
    if not path.exists():
        assert _ext.build_info() == {}
        return
    info = json.loads(path.read_text())
    for key in ("version", "torch_version", "cuda_version", "cuda_archs", "built_cpu", "built_cuda", "compiler"):
        assert key in info, key


@pytest.mark.skipif(not HAS_CUDA_EXT, reason="forgetkern._cuda is not built")
def test_cuda_extension_imports_without_a_gpu():
    code = ("import torch, forgetkern._cuda\n"
            "assert not torch.cuda.is_available()\n"
            "ops = torch.ops.forgetkern_cuda\n"
            "print(ops.ewc_fused.default._schema)\n"
            "print(ops.fisher_accumulate_.default._schema)\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "forgetkern_cuda::ewc_fused(Tensor[] params" in proc.stdout


@pytest.mark.skipif(not HAS_CUDA_EXT, reason="forgetkern._cuda is not built")
def test_cuda_schemas_match_cpu_schemas():
    if _ext.cpu_ops() is None or _ext.cuda_ops() is None:
        pytest.skip("an extension is not loaded")
    for op in ("ewc_fused", "fisher_accumulate_"):
        cpu = str(getattr(torch.ops.forgetkern_cpu, op).default._schema).split("::", 1)[1]
        cuda = str(getattr(torch.ops.forgetkern_cuda, op).default._schema).split("::", 1)[1]
        assert cpu == cuda


# ---- forgetkern._ext compatibility checks -------------------------------------------------------------------


def test_compat_error_cases():
    info = {"torch_version": "2.14.1+cu130", "cuda_version": "13.0", "built_cuda": True}
    assert _ext.compat_error("cpu", info, "2.14.1+cu130", "13.0") is None
    assert _ext.compat_error("cpu", info, "2.14.1+cpu", None) is None  # local tag ignored
    assert _ext.compat_error("cuda", info, "2.14.1+cu130", "13.1") is None  # same CUDA major
    err = _ext.compat_error("cpu", info, "2.15.0", "13.0")
    assert "built against torch 2.14.1+cu130" in err and "2.15.0" in err and "--no-build-isolation" in err
    err = _ext.compat_error("cuda", info, "2.14.1+cu126", "12.6")
    assert "CUDA 13.0" in err and "12.6" in err
    assert "CPU-only" in _ext.compat_error("cuda", info, "2.14.1+cpu", None)
    assert "without CUDA" in _ext.compat_error("cuda", dict(info, built_cuda=False), "2.14.1", "13.0")
    assert _ext.compat_error("cpu", {}, "2.14.1", None) is None  # no metadata: nothing to check


def _run_ext_with_info(tmp_path, info) -> subprocess.CompletedProcess:
    path = tmp_path / "_build_info.json"
    path.write_text(json.dumps(info))
    code = (
        "import warnings, json\n"
        "from pathlib import Path\n"
        "from forgetkern import _ext\n"
        f"_ext.BUILD_INFO_PATH = Path({str(path)!r})\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    r = [_ext.cpu_ops(), _ext.cuda_ops(), _ext.cpu_ops(), _ext.cuda_ops()]\n"
        "print(json.dumps({'ops': [x is not None for x in r], 'cpu_error': _ext.cpu_ext_error(),\n"
        "                  'cuda_error': _ext.cuda_ext_error(),\n"
        "                  'warnings': [(c.category.__name__, str(c.message)) for c in w]}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_mismatched_torch_is_not_loaded_and_warns_once(tmp_path):
    info = {"version": "0.1.0", "torch_version": "1.13.0+cu117", "cuda_version": "11.7", "cuda_archs": ["8.0"],
            "built_cpu": True, "built_cuda": True, "compiler": {}}
    proc = _run_ext_with_info(tmp_path, info)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["ops"] == [False, False, False, False]
    assert "built against torch 1.13.0+cu117" in res["cpu_error"]
    assert len(res["warnings"]) == 1
    category, message = res["warnings"][0]
    assert category == "ForgetkernBuildWarning"
    assert "falling back" in message and "torch" in message and "pip install --no-build-isolation" in message


def test_matching_build_info_loads_without_warning(tmp_path):
    if _ext.cpu_ops() is None:
        pytest.skip(f"CPU extension not loaded here: {_ext.cpu_ext_error()}")
    info = dict(_ext.build_info())
    proc = _run_ext_with_info(tmp_path, info)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["ops"][0] and res["cpu_error"] is None
    assert [w for w in res["warnings"] if w[0] == "ForgetkernBuildWarning"] == []


@needs_nvcc
def test_merge_task_vectors_plan_on_host(tmp_path):
    """csrc/cuda/merge_task_vectors.cu's multi-tensor launch plan and kernel body, every block and thread run on
    the CPU (tests/csrc/merge_task_vectors_host.cu): bit-identical to the per-element math of
    merge_task_vectors.h for every prune / consensus / normalisation, aligned and unaligned tensors, empties,
    chunk tails, offsets past 2^32 and more tensors than one launch holds."""
    exe = tmp_path / "merge_host"
    cmd = [NVCC, "-std=c++17", "-O2", "-DFK_CUDA", "-I", str(ROOT / "csrc" / "include"), "-I",
           str(ROOT / "csrc" / "cuda"), "-o", str(exe), str(ROOT / "tests" / "csrc" / "merge_task_vectors_host.cu")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout + run.stderr
