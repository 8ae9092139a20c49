"""Ahead-of-time compile of Triton kernels for a GPU architecture, without a GPU.

``compile_for(kernel, signature, constexprs, arch)`` runs the full Triton pipeline (TTIR -> PTX -> cubin with
the ``ptxas`` shipped in the triton wheel) for ``sm_<arch>`` and returns a :class:`KernelReport`: registers,
spills and local memory read from the cubin (``cuobjdump --dump-resource-usage``), the shared memory the
launch requests (Triton metadata), and the PTX/cubin, with the SASS (``nvdisasm``) on demand.

Kernel modules in ``forgetkern.triton`` list their specialisations in ``AOT_SPECS`` (see
:class:`forgetkern.triton.AotSpec`); :func:`discover` collects them from every module of the package. A spec
states which arguments its launcher guarantees 16-divisible (``attrs``): the ``tt.divisibility`` hints the JIT
derives from the values at run time, which decide vectorisation, pipelining and so registers and spills.
:func:`recorded_launches` captures the specialisations a launcher really makes (no GPU, nothing compiled), to
check them against its specs (:func:`spec_key`).

Compiling needs the real ``@triton.jit`` functions: under ``TRITON_INTERPRET=1`` the kernels are interpreter
objects, so :func:`compile_all_subprocess` runs the compiles in a child process with the variable removed.

    python -m forgetkern.testing.aot [--arch 80 90] [--jobs N] [--filter REGEX] [--sass] [--json PATH]

prints the resource table of every kernel (registers / spills / shared memory per arch).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

ARCHS = (80, 90)


def _bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found in the triton wheel ({path})")
    return path


def _run_tool(tool: str, cubin: bytes, *args: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_bin(tool), *args, f.name], capture_output=True, text=True, check=True)
    return res.stdout


@dataclasses.dataclass
class KernelReport:
    name: str
    arch: int
    n_regs: int
    n_spills: int       # spilled 32-bit words, as Triton counts them: local memory bytes / 4
    local_bytes: int    # per-thread local memory + stack frame (spills and stack arrays) from the cubin
    shared_bytes: int   # shared memory the launch requests (Triton metadata)
    ptx: str = dataclasses.field(repr=False)
    cubin: bytes = dataclasses.field(repr=False)

    @functools.cached_property
    def sass(self) -> str:
        return _run_tool("nvdisasm", self.cubin, "-c")

    def sass_has(self, pattern: str) -> bool:
        """True if the SASS contains ``pattern`` (a regular expression, e.g. ``r"LDG\\.E\\.128"``)."""
        return re.search(pattern, self.sass) is not None

    @property
    def mma(self) -> str:
        """The tensor-core instruction of the SASS: ``"HGMMA"`` (wgmma, sm_90), ``"HMMA"``, or ``""``."""
        return next((op for op in ("HGMMA", "HMMA") if self.sass_has(op + r"\.")), "")

    def summary(self, sass: bool = False) -> dict:
        """The numbers (JSON-friendly); with ``sass``, whether the SASS has 128-bit global loads/stores, its
        tensor-core instruction (:attr:`mma`) and whether global loads go to shared memory asynchronously
        (``cp.async``/TMA: a pipelined loop) and its number of local-memory instructions (``local_ops``, STL/LDL:
        spills to the stack frame, which the cubin's LOCAL figure does not count) (disassembly costs more than the
        compile, so it is opt-in)."""
        out = {k: getattr(self, k) for k in ("name", "arch", "n_regs", "n_spills", "local_bytes", "shared_bytes")}
        if sass:
            out.update(ldg128=self.sass_has(r"LDG\.E\.128"), stg128=self.sass_has(r"STG\.E\.128"), mma=self.mma,
                       async_copy=self.sass_has(r"LDGSTS|UTMALDG"),
                       local_ops=len(re.findall(r"\b(?:STL|LDL)\b", self.sass)))
        return out


def _parse_resource_usage(text: str) -> dict:
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump --dump-resource-usage output:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}


def _check_jit(kernel) -> None:
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{getattr(kernel, '__name__', kernel)!r} is not a @triton.jit function (it is "
            f"{type(kernel).__name__}); with TRITON_INTERPRET=1 set, kernels cannot be compiled: use "
            "compile_all_subprocess() or unset the variable")


def jit_attrs(kernel, signature: Dict[str, str], attrs) -> dict:
    """``ASTSource`` attrs as the JIT builds them (``{(arg index,): [["tt.divisibility", 16]]}``) from the
    names of the arguments known 16-divisible (see :class:`forgetkern.triton.AotSpec`), or a dict passed
    through (keys: argument names or index paths)."""
    from triton.backends.compiler import BaseBackend

    def path(name):
        return (kernel.arg_names.index(name),) if isinstance(name, str) else tuple(name)

    if isinstance(attrs, dict):
        return {path(k): [list(a) for a in v] for k, v in attrs.items()}
    out = {}
    for name in attrs or ():
        ty = signature.get(name)
        if ty is None or not (ty.startswith("*") or re.fullmatch(r"[iu](8|16|32|64)", ty)):
            raise ValueError(f"{kernel.__name__}: divisibility of {name!r} (type {ty!r}): only pointer and "
                             "integer arguments are specialised on alignment")
        out[path(name)] = BaseBackend.parse_attr("D")  # what the JIT gives a 16-divisible value
    return out


def compile_for(kernel, signature: Dict[str, str], constexprs: Dict[str, object], arch: int,
                options: Optional[dict] = None, attrs=None) -> KernelReport:
    """Compile ``kernel`` for ``sm_<arch>`` (no GPU needed) and read its resource usage from the cubin.

    ``attrs``: the arguments known 16-byte aligned / divisible by 16 (see :func:`jit_attrs`); none: the
    specialisation the JIT makes when no argument is."""
    import triton
    from triton.backends.compiler import GPUTarget

    _check_jit(kernel)
    src = triton.compiler.ASTSource(fn=kernel, signature=dict(signature), constexprs=dict(constexprs),
                                    attrs=jit_attrs(kernel, signature, attrs))
    compiled = triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options=dict(options or {}))
    cubin = compiled.asm["cubin"]
    usage = _parse_resource_usage(_run_tool("cuobjdump", cubin, "--dump-resource-usage"))
    return KernelReport(name=compiled.metadata.name, arch=int(arch), n_regs=usage["regs"],
                        # ptxas may place spills in the stack frame (STACK) rather than LOCAL: count both
                        n_spills=(usage["local"] + usage["stack"]) // 4,
                        local_bytes=usage["local"] + usage["stack"],
                        shared_bytes=max(int(compiled.metadata.shared), usage["static_shared"]),
                        ptx=compiled.asm["ptx"], cubin=cubin)


def spec_key(kernel, signature: Dict[str, str], constexprs: Dict, options: Optional[dict], attrs=None) -> tuple:
    """A comparable form of one specialisation: kernel, signature, constexprs and ``tt.divisibility`` attrs by
    argument index, num_warps / num_stages (Triton's defaults when absent)."""
    options = options or {}
    paths = {(kernel.arg_names.index(k),) if isinstance(k, str) else tuple(k): v for k, v in constexprs.items()}
    attrs = jit_attrs(kernel, signature, attrs)
    return (kernel, tuple(sorted(signature.items())), tuple(sorted(paths.items())),
            tuple(sorted((k, repr(v)) for k, v in attrs.items() if v)),
            options.get("num_warps", 4), options.get("num_stages", 3))


@contextlib.contextmanager
def recorded_launches(arch: int = 90):
    """Within the block, launching a ``@triton.jit`` kernel compiles and runs nothing: the :func:`spec_key` of
    the specialisation the JIT would compile for ``sm_<arch>`` from the argument values (CPU tensors will do)
    is appended to the list yielded, to check that a launcher only makes launches its ``AOT_SPECS`` list."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend, out, original = make_backend(GPUTarget("cuda", int(arch), 32)), [], JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        out.append(spec_key(self, signature, constexprs, vars(options), attrs))

    JITFunction.run = run
    try:
        yield out
    finally:
        JITFunction.run = original


def discover(package: str = "forgetkern.triton", errors: Optional[list] = None) -> List[tuple]:
    """``[(spec_id, AotSpec-like tuple), ...]`` from ``AOT_SPECS`` of every module of ``package``.

    ``spec_id`` is ``"<module>:<index>"`` (stable for a given source tree). A module that fails to import is
    skipped and ``(module, error message)`` appended to ``errors`` (raised if ``errors`` is None). A list
    re-exported by another module is listed once.
    """
    pkg = importlib.import_module(package)
    out, seen = [], set()
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        try:
            mod = importlib.import_module(f"{package}.{info.name}")
        except Exception as e:
            if errors is None:
                raise
            errors.append((info.name, f"{type(e).__name__}: {e}"))
            continue
        specs = getattr(mod, "AOT_SPECS", None)
        if specs is None or id(specs) in seen:
            continue
        seen.add(id(specs))
        out.extend((f"{info.name}:{i}", spec) for i, spec in enumerate(specs))
    return out


def _unpack(spec) -> tuple:
    kernel, signature, constexprs, description = spec[:4]
    options = spec[4] if len(spec) > 4 else {}
    attrs = spec[5] if len(spec) > 5 else ()
    return kernel, signature, constexprs, description, options, attrs


def _compile_one(job: tuple) -> dict:
    spec_id, arch, package, sass = job
    spec = dict(discover(package, errors=[]))[spec_id]
    kernel, signature, constexprs, description, options, attrs = _unpack(spec)
    row = {"id": spec_id, "arch": arch, "description": description}
    try:
        row.update(compile_for(kernel, signature, constexprs, arch, options, attrs).summary(sass), ok=True)
    except Exception as e:  # reported per kernel, the table goes on
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    return row


def compile_all(archs: Sequence[int] = ARCHS, jobs: int = 1, filter_text: str = "",
                package: str = "forgetkern.triton", sass: bool = False, sass_filter: str = "") -> List[dict]:
    """Compile every discovered spec for every arch; one result dict per (spec, arch).

    ``sass`` reads the SASS of every spec; ``sass_filter`` (a regex on ``"id description"``) of the matching
    ones only, in the same pass (disassembly costs more than the compile). A module that does not import gives
    one failed row per arch with id ``"<module>:import"``.
    """
    errors: list = []
    work = [(sid, arch, package, sass or bool(sass_filter and re.search(sass_filter, f"{sid} {_unpack(spec)[3]}")))
            for sid, spec in discover(package, errors) for arch in archs
            if re.search(filter_text, f"{sid} {_unpack(spec)[3]}")]
    failed = [{"id": f"{mod}:import", "arch": arch, "description": "import of the module", "ok": False,
               "error": msg} for mod, msg in errors for arch in archs]
    return failed + _run_jobs(work, jobs)


def _run_jobs(work: list, jobs: int) -> List[dict]:
    if jobs <= 1 or len(work) <= 1:
        return [_compile_one(w) for w in work]
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(_compile_one, work, chunksize=4))


def compile_all_subprocess(archs: Sequence[int] = ARCHS, jobs: Optional[int] = None, timeout: float = 900,
                           package: str = "forgetkern.triton", filter_text: str = "",
                           sass: bool = False, sass_filter: str = "") -> List[dict]:
    """:func:`compile_all` in a fresh interpreter with ``TRITON_INTERPRET`` removed (usable from tests)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    jobs = jobs or min(4, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "aot.json")
        cmd = [sys.executable, "-m", "forgetkern.testing.aot", "--quiet", "--json", out, "--jobs", str(jobs),
               "--package", package, "--filter", filter_text, "--arch", *map(str, archs)]
        cmd += ["--sass"] if sass else []
        cmd += ["--sass-filter", sass_filter] if sass_filter else []
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode not in (0, 1) or not os.path.exists(out):
            raise RuntimeError(f"AOT compile subprocess failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        with open(out) as f:
            return json.load(f)


def format_table(rows: List[dict]) -> str:
    """Resource table: one line per kernel variant, one column group per arch (when the compile looked at the
    SASS: L/S, it has 128-bit global loads/stores; its tensor-core instruction, HGMMA or HMMA)."""
    archs = sorted({r["arch"] for r in rows})
    by = {}
    for r in rows:
        by.setdefault((r["id"], r["description"]), {})[r["arch"]] = r
    head = f"{'kernel':<22} {'variant':<52}" + "".join(f" | sm_{a}: regs spills smem" for a in archs)
    lines = [head, "-" * len(head)]
    for (sid, desc), per in by.items():
        cols = []
        for a in archs:
            r = per.get(a)
            if r is None:
                cols.append(f" | {'-':>24}")
            elif not r["ok"]:
                cols.append(f" | {'COMPILE FAILED':>24}")
            else:
                v128 = "" if "ldg128" not in r else " " + "L"[:r["ldg128"]] + "S"[:r["stg128"]]
                v128 += f" {r['mma']}" if r.get("mma") else ""
                cols.append(f" | {r['n_regs']:>12} {r['n_spills']:>6} {r['shared_bytes']:>4}{v128}")
        name = next((r.get("name") for r in per.values() if r.get("name")), sid.split(":")[0])
        lines.append(f"{name:<22} {desc:<52}" + "".join(cols))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forgetkern.testing.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--filter", default="", help="only specs whose 'id description' matches this regex")
    ap.add_argument("--package", default="forgetkern.triton")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--quiet", action="store_true", help="no table on stdout")
    ap.add_argument("--sass", action="store_true", help="also look for 128-bit LDG/STG in the SASS (slower)")
    ap.add_argument("--sass-filter", default="", help="read the SASS of the specs matching this regex only")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: compiling in a subprocess without it", file=sys.stderr)
        rows = compile_all_subprocess(args.arch, args.jobs, package=args.package, filter_text=args.filter,
                                      sass=args.sass, sass_filter=args.sass_filter)
    else:
        rows = compile_all(args.arch, args.jobs, args.filter, args.package, args.sass, args.sass_filter)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not args.quiet:
        print(format_table(rows))
    bad = [r for r in rows if not r["ok"] or r["n_spills"]]
    for r in bad:
        print(f"FAIL {r['id']} sm_{r['arch']} {r['description']}: "
              f"{r.get('error') or str(r['n_spills']) + ' spilled words'}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
