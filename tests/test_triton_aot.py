"""Every Triton kernel variant (``AOT_SPECS`` of every module in ``forgetkern.triton``) compiles ahead of
time for sm_80 and sm_90 without spilling.

No GPU is needed: ``triton.compile`` runs TTIR -> PTX -> cubin with the ptxas of the triton wheel, and the
resource usage is read from the cubin. The session runs with ``TRITON_INTERPRET=1`` (kernels are interpreter
objects then), so the compiles run in one child process without it; the resource table is printed (``-s``).
"""

import os
import re

import pytest

pytest.importorskip("triton")

from forgetkern.testing import aot  # noqa: E402

_IMPORT_ERRORS: list = []
SPECS = aot.discover(errors=_IMPORT_ERRORS)
IDS = [sid for sid, _ in SPECS] + [f"{mod}:import" for mod, _ in _IMPORT_ERRORS]
DESCRIPTIONS = {sid: spec[3] for sid, spec in SPECS}
JOBS = max(1, min(4, os.cpu_count() or 1))


# the specialisations whose SASS the tensor-core tests read (disassembled in the same pass as the compile)
TENSOR_CORE_SPECS = r"^lora_linear:\d+ (\w+ bf16|fwd fp32)"
PERSAMPLE_SPECS = r"^linear_persample_sq_grad:"


@pytest.fixture(scope="module")
def compiled():
    rows = aot.compile_all_subprocess(aot.ARCHS, jobs=JOBS, sass_filter=f"{TENSOR_CORE_SPECS}|{PERSAMPLE_SPECS}")
    print("\n" + aot.format_table(rows))
    return {(r["id"], r["arch"]): r for r in rows}


def test_discovery_finds_the_multi_tensor_kernels():
    modules = {sid.split(":")[0] for sid in IDS}
    assert {"ewc_penalty", "fisher_accumulate"} <= modules
    from forgetkern.triton import ewc_penalty, fisher_accumulate

    # every (param, anchor, fisher) dtype triple x 3 modes; every (state, grad) dtype pair
    assert len(ewc_penalty.AOT_SPECS) == 4 * 4 * 4 * 3
    assert len(fisher_accumulate.AOT_SPECS) == 3 * 4


@pytest.mark.slow
@pytest.mark.parametrize("arch", aot.ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("spec_id", IDS)
def test_compiles_without_spills(compiled, spec_id, arch):
    row = compiled.get((spec_id, arch))
    assert row is not None, f"{spec_id} was not compiled for sm_{arch}"
    assert row["ok"], f"{spec_id} ({row['description']}) failed for sm_{arch}: {row.get('error')}"
    assert row["n_spills"] == 0, f"{spec_id} ({row['description']}) spills on sm_{arch}: {row}"
    assert row["local_bytes"] == 0 and row["n_regs"] <= 255
    # the launchers use 4 warps: a block must fit the register file and 227 KB of shared memory
    assert row["n_regs"] * 128 <= 65536 and row["shared_bytes"] <= 227 * 1024


# 16-byte-aligned chunks take the path with alignment hints: 128-bit global loads (and stores when writing)
_VECTOR = r"p=(fp32 a=fp32 F=fp32|bf16 a=bf16 F=bf16)|F=(fp32 g=fp32|bf16 g=bf16)"


def test_aligned_path_uses_128_bit_accesses():
    rows = aot.compile_all_subprocess((90,), jobs=JOBS, filter_text=_VECTOR, sass=True)
    rows = [r for r in rows if r["id"].split(":")[0] in ("ewc_penalty", "fisher_accumulate")]
    assert len(rows) == 8
    for r in rows:
        assert r["ok"], r
        writes = "write_grad=0" not in r["description"]
        assert r["ldg128"] and (r["stg128"] or not writes), f"{r['id']} {r['description']}: {r}"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="interpreter not enabled")
def test_compile_for_explains_the_interpreter():
    kernel, signature, constexprs = SPECS[0][1][:3]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_for(kernel, signature, constexprs, 90)


@pytest.mark.slow
def test_lora_matmuls_use_tensor_cores(compiled):
    """Every bf16 LoRA kernel specialisation (aligned and unaligned, every kind) runs its products on HGMMA
    (wgmma) on sm_90 and HMMA on sm_80; the fp32 forward takes exact IEEE FMA products. fp16 compiles the same
    tiles with another element type, so its disassembly (a minute on 2 cores) is left to
    ``python -m forgetkern.testing.aot --filter lora_linear --sass``."""
    rows = [r for r in compiled.values() if re.search(TENSOR_CORE_SPECS, f"{r['id']} {r['description']}")]
    want = sum(bool(re.search(TENSOR_CORE_SPECS, f"{sid} {DESCRIPTIONS.get(sid, '')}")) for sid in IDS)
    assert want >= 48 and len(rows) == 2 * want
    for r in rows:
        fp32 = r["description"].split()[1].startswith("fp32")
        assert r["ok"] and r["mma"] == ("" if fp32 else "HGMMA" if r["arch"] == 90 else "HMMA"), r


@pytest.mark.slow
def test_persample_fisher_kernels_use_tensor_cores_without_local_memory(compiled):
    """Every per-sample Fisher variant runs its products on HGMMA on sm_90 and HMMA on sm_80 (the finish kernel
    has none) with no local-memory traffic in the SASS (STL/LDL: stack-frame spills the cubin's LOCAL figure
    does not count)."""
    rows = [r for r in compiled.values() if re.search(PERSAMPLE_SPECS, r["id"])]
    assert len(rows) >= 2 * 10
    for r in rows:
        assert r["ok"] and r["local_ops"] == 0 and r["local_bytes"] == 0, r
        if not r["description"].startswith("finish"):
            assert r["mma"] == ("HGMMA" if r["arch"] == 90 else "HMMA"), r


def test_jit_attrs_mirror_the_jit():
    """A spec's ``attrs`` (argument names) become the ``tt.divisibility=16`` the JIT gives 16-divisible values,
    keyed by argument index; only pointer and integer arguments can carry it; a dict passes through."""
    kernel, signature = SPECS[0][1][:2]
    ptr = next(n for n, t in signature.items() if t.startswith("*"))
    want = {(kernel.arg_names.index(ptr),): [["tt.divisibility", 16]]}
    assert aot.jit_attrs(kernel, signature, [ptr]) == want
    assert aot.jit_attrs(kernel, signature, {ptr: [["tt.divisibility", 16]]}) == want
    assert aot.jit_attrs(kernel, signature, ()) == {}
    for bad in [n for n, t in signature.items() if t == "constexpr" or t.startswith("fp")][:2]:
        with pytest.raises(ValueError, match="divisibility"):
            aot.jit_attrs(kernel, signature, [bad])


def test_resource_usage_parser():
    text = "\nResource usage:\n Function k:\n  REG:40 STACK:8 SHARED:1024 LOCAL:16 CONSTANT[0]:560 TEXTURE:0\n"
    assert aot._parse_resource_usage(text) == {"regs": 40, "stack": 8, "static_shared": 1024, "local": 16}
    assert re.search("ewc", aot.format_table([{"id": "ewc_penalty:0", "arch": 90, "description": "d", "ok": True,
                                               "name": "ewc", "n_regs": 1, "n_spills": 0, "shared_bytes": 0}]))
