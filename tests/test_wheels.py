"""scripts/build_wheels.py: the CPU-only wheel builds (reusing the objects in build/), carries its build record,
installs into a fresh environment and works there outside the source tree; the tag scheme and the checks."""

from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_wheels", ROOT / "scripts" / "build_wheels.py")
bw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bw)


def test_version_tags_keep_cuda_majors_and_torch_minors_apart():
    v = bw.expected_version
    assert v("0.1.0", "cuda", "2.14.1+cu130", "13.0") == "0.1.0+cu130torch2.14"
    assert v("0.1.0", "cuda", "2.10.0+cu128", "12.8") == "0.1.0+cu128torch2.10"
    assert v("0.1.0", "cuda", "2.10.0+cu126", "12.6") == "0.1.0+cu126torch2.10"
    assert v("0.1.0", "cpu", "2.14.1+cu130", "13.0") == "0.1.0"
    tags = {v("0.1.0", "cuda", t, c) for t, c in [("2.14.1", "13.0"), ("2.14.0", "12.6"), ("2.13.0", "13.0"),
                                                    ("2.14.1", "12.8")]}
    assert len(tags) == 4
    with pytest.raises(ValueError, match="CPU-only"):
        v("0.1.0", "cuda", "2.14.1+cpu", None)
    from packaging.version import Version

    assert Version("0.1.0+cu130torch2.14").local == "cu130torch2.14"


def test_excluded_libraries_are_torch_cuda_and_openmp_only():
    needed = ["libc10.so", "libtorch.so", "libtorch_cpu.so", "libtorch_python.so", "libc10_cuda.so",
              "libcudart.so.13", "libgomp.so.1", "libstdc++.so.6", "libm.so.6", "libc.so.6", "libfoo.so.2"]
    assert bw.excluded_libs(needed) == sorted(["libc10.so", "libtorch.so", "libtorch_cpu.so", "libtorch_python.so",
                                               "libc10_cuda.so", "libcudart.so.13", "libgomp.so.1"])


def _fake_wheel(tmp_path, version, files):
    path = tmp_path / f"forgetkern-{version}-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_check_wheel_refuses_a_wrong_record_or_a_stray_extension(tmp_path):
    info = {"version": "0.1.0+cu130torch2.14", "torch_version": "2.14.1+cu130", "built_cuda": True,
            "cuda_version": "13.0", "cuda_archs": ["8.0", "9.0+PTX"]}
    good = {"forgetkern/_C.cpython-311-x86_64-linux-gnu.so": b"", "forgetkern/_cuda.cpython-311-x86_64-linux-gnu.so": b"",
            "forgetkern/_build_info.json": json.dumps(info)}
    kw = dict(flavor="cuda", version="0.1.0+cu130torch2.14", torch_version="2.14.1+cu130", cuda_version="13.0",
              archs="8.0;9.0+PTX")
    assert bw.check_wheel(_fake_wheel(tmp_path, "0.1.0+cu130torch2.14", good), **kw) == info
    with pytest.raises(SystemExit, match="cuda_archs"):
        bw.check_wheel(_fake_wheel(tmp_path, "0.1.0+cu130torch2.14", good), **{**kw, "archs": "9.0"})
    no_cuda = {k: v for k, v in good.items() if "_cuda" not in k}
    with pytest.raises(SystemExit, match="extensions"):
        bw.check_wheel(_fake_wheel(tmp_path, "0.1.0+cu130torch2.14", no_cuda), **kw)
    with pytest.raises(SystemExit, match="file name version"):
        bw.check_wheel(_fake_wheel(tmp_path, "0.1.0+cu130", good), **kw)
    cpu = {"forgetkern/_C.cpython-311-x86_64-linux-gnu.so": b"", "forgetkern/_cuda.cpython-311-x86_64-linux-gnu.so": b"",
           "forgetkern/_build_info.json": json.dumps({**info, "version": "0.1.0", "built_cuda": False,
                                                       "cuda_version": None, "cuda_archs": []})}
    with pytest.raises(SystemExit, match=r"extensions \['_C', '_cuda'\] != \['_C'\]"):
        bw.check_wheel(_fake_wheel(tmp_path, "0.1.0", cpu), flavor="cpu", version="0.1.0",
                       torch_version="2.14.1+cu130", cuda_version="13.0", archs="8.0;9.0+PTX")


CHECK = textwrap.dedent("""
    import json, sys
    import torch
    import forgetkern
    from forgetkern import _ext, cli
    print(json.dumps({"file": forgetkern.__file__, "info": _ext.build_info(),
                      "cpu_loaded": _ext.cpu_ops() is not None, "cpu_error": str(_ext.cpu_ext_error()),
                      "cuda_loaded": _ext.cuda_ops() is not None}))
    print(cli.env_report())
    g = torch.Generator().manual_seed(0)
    fishers = [torch.rand(37, generator=g), torch.rand(5, 3, generator=g)]
    grads = [torch.randn(37, generator=g), torch.randn(5, 3, generator=g)]
    want = [f + g * g for f, g in zip(fishers, grads)]
    with forgetkern.use_backend("cpp"):
        forgetkern.fisher_accumulate_(fishers, grads)
    for f, w in zip(fishers, want):
        torch.testing.assert_close(f, w, rtol=1e-6, atol=1e-7)
    print("CPP_OP_OK")
""")


def _built_flavor() -> str:
    """The flavor the source tree was built as (its objects in build/ are then reused, nothing recompiles):
    ``cuda`` after the set-up's CUDA build, else ``cpu``."""
    info = ROOT / "forgetkern" / "_build_info.json"
    return "cuda" if info.exists() and json.loads(info.read_text()).get("built_cuda") else "cpu"


@pytest.mark.slow
def test_wheel_builds_installs_in_a_fresh_venv_and_runs_outside_the_tree(tmp_path):
    """The wheel of the flavor this tree was built as (CUDA 13 + torch 2.14 after the set-up here), from the
    set-up's own objects (nothing recompiles: about 25 s to link and pack, 50 s in all), installed into a fresh
    venv and run outside the source tree. This is CI's wheel job."""
    flavor = _built_flavor()
    t0 = time.perf_counter()
    dist = tmp_path / "dist"
    # the toolkit the tree was built with, as its build record says (torch's guess without a CUDA runtime can be
    # another root, e.g. /usr/local, whose -I flags would make ninja recompile every object)
    built_home = json.loads((ROOT / "forgetkern" / "_build_info.json").read_text())["compiler"].get("cuda_home")
    cuda_home = ["--cuda-home", built_home or bw.find_cuda_home_for_test()] if flavor == "cuda" else []
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_wheels.py"), "--flavors", flavor, *cuda_home,
                           "--dist-dir", str(dist), "--auditwheel", os.environ.get("FK_TEST_AUDITWHEEL", "auto")],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    build_s = time.perf_counter() - t0
    (rec,) = json.loads((dist / "wheels.json").read_text())
    wheel = Path(rec["wheel"])
    want_version = bw.expected_version(bw.base_version(), flavor, torch.__version__, torch.version.cuda)
    assert wheel.exists() and rec["version"] == want_version
    assert rec["build_info"]["built_cuda"] is (flavor == "cuda")
    if isinstance(rec["auditwheel"], dict):                      # repaired: nothing of torch/OpenMP bundled
        assert "manylinux" in wheel.name and not any("torch" in b or "gomp" in b for b in rec["auditwheel"]["bundled"])
        assert set(rec["auditwheel"]["excluded"]) >= {"libc10.so", "libtorch_cpu.so"}

    # a fresh venv without pip; torch & co come from this environment's site-packages through a .pth file, which
    # (unlike --system-site-packages) does not run this environment's .pth files (the editable forgetkern)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    vsite = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in site.getsitepackages() if Path(p, "torch").is_dir()] or [sysconfig.get_paths()["purelib"]]
    (vsite / "zz_deps.pth").write_text("\n".join(deps) + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--target", str(vsite), str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FORGETKERN_BACKEND")}
    run = subprocess.run([str(vpy), "-c", CHECK], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    head = json.loads(run.stdout.splitlines()[0])
    assert Path(head["file"]).resolve().is_relative_to(vsite.resolve()), head["file"]
    assert head["cpu_loaded"], head["cpu_error"]
    assert head["cuda_loaded"] is (flavor == "cuda")  # the CUDA wheel's extension loads without a GPU
    assert head["info"]["built_cuda"] is (flavor == "cuda") and head["info"]["torch_version"] == torch.__version__
    assert head["info"]["version"] == rec["version"]
    assert "CPU extension  (forgetkern._C)    loaded" in run.stdout and "CPP_OP_OK" in run.stdout
    env_cli = subprocess.run([str(vpy), "-m", "forgetkern", "env"], cwd=outside, env=env, capture_output=True,
                             text=True, timeout=300)
    assert env_cli.returncode == 0 and f"forgetkern     {rec['version']}" in env_cli.stdout, env_cli.stderr[-2000:]
    # the CUDA wheel's tag, from setup.py's own logic (no CUDA build here: --version only)
    if torch.version.cuda and bw.find_cuda_home_for_test():
        ver = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "FORGETKERN_BUILD_CUDA": "1", "FORGETKERN_LOCAL_VERSION": "torch"},
                             timeout=300).stdout.strip().splitlines()[-1]
        assert ver == bw.expected_version(bw.base_version(), "cuda", torch.__version__, torch.version.cuda), ver
    print(f"\nwheel build {build_s:.0f} s ({rec['ninja_compiled']} objects compiled), total "
          f"{time.perf_counter() - t0:.0f} s")
