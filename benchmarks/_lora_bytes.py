"""The bytes part of ``bench_lora.py``: what the Triton LoRA forward loads and stores, counted in the Triton
interpreter and required to equal the kernels' tile model, and the modelled (not measured) GPU rows built on it.
``shapes`` are ``[(label, in_features, out_features)]``, ``rank`` the LoRA rank."""

from __future__ import annotations

import torch

import _common as bc


def bench_bytes(res: bc.Results, tokens: int, shapes, rank: int, log) -> None:
    """Bytes the Triton forward loads and stores, counted in the interpreter (32x32 tiles) and checked against the
    tile model; the compulsory minimum; modelled: the tile model with the sm_90 tiles and PEFT's op-by-op
    traffic (no GPU ran any of this)."""
    from forgetkern.testing import bytes_moved as bm
    from forgetkern.triton import lora_linear as tri

    dt, esz, r = torch.bfloat16, 2, rank
    g = torch.Generator().manual_seed(0)
    for label, k, n in shapes:
        x, w = torch.randn(tokens, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt)
        a, b = torch.randn(r, k, generator=g).to(dt), torch.randn(n, r, generator=g).to(dt)
        with bm.count_bytes() as moved:
            tri.lora_linear_fwd(x, [w], [], [], [a], [b], [0], [2.0], [0.0], [0])
        interp = tri._BIG["interp"][:2] + (tri._SKINNY["interp"][0], 16)
        loads, stores = bm.lora_forward_tile_bytes(tokens, k, n, r, esz, False, interp)
        assert (moved.loads, moved.stores) == (loads, stores), (label, moved.loads, loads, moved.stores, stores)
        sm90 = tri._BIG[("sm90", True)][:2] + (tri._SKINNY[("sm90", True)][0], 16)
        l90, s90 = bm.lora_forward_tile_bytes(tokens, k, n, r, esz, False, sm90)
        minimum = bm.lora_forward_min_bytes(tokens, k, n, r, esz, False)
        op, size = f"lora_linear fwd bytes {label} {k}->{n} t={tokens} bf16", tokens * k
        res.add(bc.Row(op, "forgetkern", "interpreter", "bytes_moved", size, "MB", moved.total / bc.MB,
                       note="interpreter count (32x32 tiles), equal to the tile model"))
        res.add(bc.Row(op, "forgetkern", "interpreter", "stores_vs_outputs", size, "x",
                       moved.stores / ((tokens * n + tokens * r) * esz), note="y and xa written exactly once"))
        res.add(bc.Row(op, "forgetkern", "minimum", "bytes_moved", size, "MB", minimum / bc.MB,
                       note="compulsory: inputs read once, outputs written once"))
        res.add(bc.Row(op, "forgetkern", "modelled sm90 tiles", "bytes_moved", size, "MB", (l90 + s90) / bc.MB,
                       note="modelled: tile model with the sm_90 tiles (re-reads mostly L2 hits)"))
        for p in (0.0, 0.1):
            peft_min = bm.peft_forward_min_bytes(tokens, k, n, r, esz, False, p > 0)
            res.add(bc.Row(op, "peft", f"modelled dropout={p:g}", "bytes_moved", size, "MB", peft_min / bc.MB,
                           note="modelled: PEFT's ops, each reading its inputs and writing its output once"))
            res.add(bc.Row(op, "forgetkern", f"modelled dropout={p:g}", "min_vs_peft", size, "x",
                           minimum / peft_min, note="modelled: compulsory bytes, fused / PEFT"))
        log(f"{op}: interpreter {moved.total / bc.MB:.2f} MB (= tile model), minimum {minimum / bc.MB:.2f} MB, "
            f"PEFT modelled {bm.peft_forward_min_bytes(tokens, k, n, r, esz, False, False) / bc.MB:.2f} MB")


def modelled_rows(quick: bool, shapes, rank: int) -> list:
    """Modelled H100 times of the LoRA forward (bf16, one adapter, no bias) on the SmolLM2 shapes at the token
    count ``runner_argv`` times (128 quick / 2048): forgetkern's Triton forward from its tile model with the
    sm_90 tiles, after checking in the interpreter that the model equals the counted bytes (at 16 / 64
    tokens, 32x32 tiles); PEFT from the compulsory bytes of its op-by-op forward, dropout 0 and 0.1. FLOPs of
    both: 2 m (k n + k r + r n)."""
    from forgetkern.testing import bytes_moved as bm
    from forgetkern.triton import lora_linear as tri

    dt, esz, r = torch.bfloat16, 2, rank
    count_tokens, tokens = (16, 128) if quick else (64, 2048)
    g = torch.Generator().manual_seed(0)
    interp = tri._BIG["interp"][:2] + (tri._SKINNY["interp"][0], 16)
    sm90 = tri._BIG[("sm90", True)][:2] + (tri._SKINNY[("sm90", True)][0], 16)
    rows = []
    for label, k, n in shapes:
        x, w = torch.randn(count_tokens, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt)
        a, b = torch.randn(r, k, generator=g).to(dt), torch.randn(n, r, generator=g).to(dt)
        with bm.count_bytes() as moved:
            tri.lora_linear_fwd(x, [w], [], [], [a], [b], [0], [2.0], [0.0], [0])
        model = bm.lora_forward_tile_bytes(count_tokens, k, n, r, esz, False, interp)
        if (moved.loads, moved.stores) != model:
            raise AssertionError(f"{label}: interpreter bytes {(moved.loads, moved.stores)} != tile model {model}")
        op, size = f"lora_linear fwd {label} {k}->{n} t={tokens} bf16", tokens * k * n
        flops = 2 * tokens * (k * n + k * r + r * n)
        loads, stores = bm.lora_forward_tile_bytes(tokens, k, n, r, esz, False, sm90)
        rows += bc.modelled_rows(op, "forgetkern-triton", "fwd", size, loads + stores, flops,
                                 how=f"bytes: tile model with the sm_90 tiles {sm90} (equal to the interpreter "
                                     f"count at {count_tokens} tokens with its tiles); re-reads counted as DRAM")
        for p in (0.0, 0.1):
            rows += bc.modelled_rows(op, "peft", f"fwd dropout={p:g}", size,
                                     bm.peft_forward_min_bytes(tokens, k, n, r, esz, False, p > 0), flops,
                                     how="bytes: PEFT's ops, each reading its inputs and writing its output once")
    return rows
