"""Build of forgetkern's compiled extensions (the Python package itself is plain setuptools metadata in
pyproject.toml).

Extensions:
  forgetkern._C     csrc/module_init.cpp + csrc/cpu/*.cpp       always (C++, OpenMP)
  forgetkern._cuda  csrc/module_init.cpp + csrc/cuda/*.cu + csrc/cuda/*.cpp (the torch glue, compiled as ONE
                    translation unit, see unity_glue()),
                    when FORGETKERN_BUILD_CUDA=1, or by default when nvcc is found and torch is a CUDA build;
                    FORGETKERN_BUILD_CUDA=0 skips it.

Install (torch must already be installed, the extensions compile against it):
  pip install --no-build-isolation -e ".[dev]"       # development
  pip install --no-build-isolation .                 # regular install

Environment:
  FORGETKERN_BUILD_CUDA  1 / 0 / unset (auto)
  TORCH_CUDA_ARCH_LIST   CUDA archs, default "8.0;9.0+PTX" (sm_80, sm_90 and compute_90 PTX)
  MAX_JOBS               parallel compile jobs (ninja)
  NVCC_THREADS           nvcc --threads (archs compiled in parallel inside one nvcc), default 2
  FORGETKERN_DEBUG       1: keep debug info (-g, nvcc -lineinfo)
  CUDA_HOME              CUDA toolkit root (default: found from nvcc)
  FORGETKERN_LOCAL_VERSION  the version's local part: "auto" (default: +cuXYZ for a CUDA build, none for a
                         CPU-only one), "torch" (+cuXYZtorchM.N / +cputorchM.N: the release wheels of
                         scripts/build_wheels.py, which keeps cu12x/cu13x and torch versions apart), "none"
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
PACKAGE = "forgetkern"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
BUILD_INFO = "_build_info.json"


def base_version() -> str:
    text = (ROOT / PACKAGE / "_version.py").read_text()
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    if not match:
        raise RuntimeError(f"cannot find __version__ in {PACKAGE}/_version.py")
    return match.group(1)


def _is_cuda_root(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH, else the toolkit that `nvcc` on PATH belongs to (also when PATH holds a wrapper
    script), else /usr/local/cuda. Set before torch.utils.cpp_extension is imported (it reads it on import)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script (e.g. /usr/local/bin/nvcc -> exec /opt/cuda/bin/nvcc): ask nvcc itself
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if match:
                candidates.append(os.path.realpath(match.group(1)))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append("/usr/local/cuda")
    for path in candidates:
        if _is_cuda_root(path):
            return path
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - build environment problem
    raise RuntimeError(
        "forgetkern compiles C++/CUDA extensions against the installed torch: install torch first, then "
        "`pip install --no-build-isolation -e .` (without --no-build-isolation pip builds in a fresh environment "
        f"without your torch). Import error: {exc}"
    ) from exc


def want_cuda() -> bool:
    flag = os.environ.get("FORGETKERN_BUILD_CUDA", "").strip().lower()
    nvcc_ok = CUDA_HOME is not None
    torch_cuda = torch.version.cuda is not None
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not torch_cuda:
            raise RuntimeError(f"FORGETKERN_BUILD_CUDA=1 but torch {torch.__version__} is not a CUDA build")
        if not nvcc_ok:
            raise RuntimeError("FORGETKERN_BUILD_CUDA=1 but no CUDA toolkit was found: put nvcc on PATH or set "
                               "CUDA_HOME")
        return True
    if flag:
        raise RuntimeError(f"FORGETKERN_BUILD_CUDA must be 0 or 1, got {flag!r}")
    return nvcc_ok and torch_cuda


BUILD_CUDA = want_cuda()


def cuda_tag() -> str:
    return "cu" + torch.version.cuda.replace(".", "")


def torch_tag() -> str:
    """``torchM.N`` of the torch compiled against (its C++ ABI changes between minor versions)."""
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return f"torch{major}.{minor}"


def local_version() -> str:
    mode = os.environ.get("FORGETKERN_LOCAL_VERSION", "auto").strip().lower() or "auto"
    if mode == "auto":
        return cuda_tag() if BUILD_CUDA else ""
    if mode == "torch":
        return (cuda_tag() if BUILD_CUDA else "cpu") + torch_tag()
    if mode == "none":
        return ""
    raise RuntimeError(f"FORGETKERN_LOCAL_VERSION must be auto, torch or none, got {mode!r}")


def package_version() -> str:
    local = local_version()
    return base_version() + (f"+{local}" if local else "")


def _first_line(cmd: list) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in (out.stdout or out.stderr).splitlines() if line.strip()]
    return lines[0].strip() if lines else None


def _nvcc_version() -> str | None:
    if not CUDA_HOME:
        return None
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release [^\n]+", out)
    return match.group(0) if match else None


def sources(pattern: str) -> list:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


# -ffp-contract=off: no FMA contraction, every multiply/add rounds as written (same results as the CUDA kernels
# and the PyTorch reference). -fno-trapping-math: lets gcc if-convert (select) the branch-free element code so
# the loops vectorise; it changes no result. -fno-math-errno: sqrt never sets errno, so it vectorises (sqrtps);
# it changes no result. No -march: portable binaries; the CPU kernels also exist as
# AVX2 / AVX-512 versions (GCC target attributes) chosen at run time, see csrc/cpu/cpu_isa.h.
# C++20: the torch headers require it (the .cu files include no torch header and stay C++17).
# -g0 (unless FORGETKERN_DEBUG=1) drops the -g of Python's default CFLAGS: ~25% less compile time, 20x smaller
# objects.
DEBUG = os.environ.get("FORGETKERN_DEBUG", "0") not in ("", "0")
CXX_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fvisibility=hidden",
             "-g" if DEBUG else "-g0"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-DFK_CUDA", "--threads", os.environ.get("NVCC_THREADS", "2"),
              "-Xcompiler", "-fvisibility=hidden"] + (["-lineinfo"] if DEBUG else [])
INCLUDE_DIRS = [str(ROOT / "csrc" / "include")]


def unity_glue() -> str:
    """The CUDA extension's torch glue (csrc/cuda/*.cpp, one file per op) compiled as one translation unit: each
    glue file is small, but each one parses the ATen / dispatcher headers, ~25 s of the ~30 s it takes to
    compile; one unit that includes them all parses them once (about 9 x 27 s -> 60 s of CPU on a 2-core
    machine). The unit is generated here (build/generated/, so a new glue file joins it by existing) and ninja's
    depfile tracks the included files, so editing any of them rebuilds it. The glue files keep their helpers
    in anonymous namespaces with distinct names (the unit fails to compile on a clash)."""
    out = ROOT / "build" / "generated" / "cuda_glue.cpp"
    text = "// generated by setup.py (unity_glue): the torch glue of every CUDA op, one translation unit\n" + "".join(
        f'#include "{ROOT / src}"\n' for src in sources("csrc/cuda/*.cpp"))
    if not out.exists() or out.read_text() != text:  # unchanged content keeps its mtime: no needless rebuild
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return str(out.relative_to(ROOT))


def extensions() -> list:
    exts = [
        CppExtension(
            name=f"{PACKAGE}._C",
            sources=["csrc/module_init.cpp"] + sources("csrc/cpu/*.cpp"),
            include_dirs=INCLUDE_DIRS,
            extra_compile_args={"cxx": CXX_FLAGS + ["-fopenmp", "-DFK_MODULE_NAME=_C"]},
            extra_link_args=["-fopenmp"],
        )
    ]
    if BUILD_CUDA:
        ext = CUDAExtension(
            name=f"{PACKAGE}._cuda",
            sources=["csrc/module_init.cpp"] + sources("csrc/cuda/*.cu") + [unity_glue()],
            include_dirs=INCLUDE_DIRS,
            extra_compile_args={"cxx": CXX_FLAGS + ["-DFK_CUDA", "-DFK_MODULE_NAME=_cuda"], "nvcc": NVCC_FLAGS},
        )
        # The glue needs the dispatcher, ATen's empty() and c10::cuda streams only: no libtorch_cuda or
        # libtorch_python (the module has no pybind11 bindings).
        ext.libraries = ["c10", "torch_cpu", "c10_cuda", "cudart"]
        exts.append(ext)
    return exts


def build_info() -> dict:
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if BUILD_CUDA else []
    return {
        "version": package_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if BUILD_CUDA else None,
        "cuda_archs": [a for a in archs if a],
        "built_cpu": True,
        "built_cuda": BUILD_CUDA,
        "compiler": {
            "cxx": _first_line([os.environ.get("CXX", "c++"), "--version"]),
            "cxx_flags": CXX_FLAGS,
            "nvcc": _nvcc_version() if BUILD_CUDA else None,
            "nvcc_flags": NVCC_FLAGS if BUILD_CUDA else None,
            "cuda_home": CUDA_HOME if BUILD_CUDA else None,
        },
        "python": sys.version.split()[0],
    }


class BuildExt(BuildExtension):
    """torch's BuildExtension (ninja) + one temp dir per extension + forgetkern/_build_info.json."""

    def build_extension(self, ext):
        # A kernel and its glue share a stem (csrc/cuda/x.cu + csrc/cuda/x.cpp): name .cu objects x.cu.o.
        if not getattr(self.compiler, "_fk_patched", False):
            object_filenames = self.compiler.object_filenames

            def cu_aware_object_filenames(source_filenames, *args, **kwargs):
                objects = object_filenames(source_filenames, *args, **kwargs)
                return [os.path.splitext(o)[0] + ".cu" + os.path.splitext(o)[1] if s.endswith(".cu") else o
                        for s, o in zip(source_filenames, objects)]

            self.compiler.object_filenames = cu_aware_object_filenames
            self.compiler._fk_patched = True
        # csrc/module_init.cpp is compiled into both extensions with a different -DFK_MODULE_NAME: give each
        # extension its own object directory so the two builds never share (or overwrite) an object file.
        temp = self.build_temp
        self.build_temp = os.path.join(temp, ext.name.split(".")[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = temp

    def run(self):
        if getattr(self, "editable_mode", False):
            # pip install -e (PEP 660) builds in a throw-away temp folder; keep the objects in the folder that
            # `setup.py build_ext --inplace` and scripts/build_wheels.py use, so that ninja only recompiles
            # what changed, in later editable installs and in wheel builds alike.
            import sysconfig

            self.build_temp = str(ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")
        super().run()
        text = json.dumps(build_info(), indent=2, sort_keys=True) + "\n"
        targets = set()
        if self.inplace or getattr(self, "editable_mode", False):  # the package is imported from the source tree
            targets.add(ROOT / PACKAGE / BUILD_INFO)
        if self.build_lib and not self.inplace:
            targets.add(Path(self.build_lib).resolve() / PACKAGE / BUILD_INFO)  # wheel contents
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def get_outputs(self):
        outputs = super().get_outputs()
        if self.build_lib and not self.inplace:
            outputs.append(os.path.join(self.build_lib, PACKAGE, BUILD_INFO))
        return outputs


setup(
    version=package_version(),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
