"""forgetkern beyond one process: 2 CPU processes over gloo (the same code a GPU cluster runs over NCCL).

Process start-up dominates (a spawned child re-imports torch and transformers), so ONE 2-process job runs every check
(DDP training vs one process, the distributed Fisher estimate, update_from_grads under DDP, EWC on FSDP2
DTensor shards, forgetkern.patch on an FSDP2 model, sharded save/load), each rank asserting; a failure on any
rank fails the test with that rank's traceback. The job is bounded in time (JOB_TIMEOUT_S)."""

from __future__ import annotations

import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft")
pytest.importorskip("transformers")

WORLD = 2
JOB_TIMEOUT_S = 150
# forkserver: the server process imports torch / transformers / peft / forgetkern once (preload) and forks the
# ranks from itself, so each rank starts in well under a second (a spawned child re-imports them: 20-40 s on a
# loaded 2-core machine). Plain fork from the test process is not safe: once any earlier test has run a
# backward, autograd's worker threads exist and a forked child cannot run backward at all.
START_METHOD = "forkserver" if os.name == "posix" else "spawn"
PRELOAD = ["torch", "transformers", "peft", "forgetkern", "tests.test_distributed"]


def _lora_model():
    import peft

    from forgetkern.testing.models import tiny_llama

    base = tiny_llama(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights=False), autocast_adapter_dtype=False)


def _batches(n: int, rows: int = 4, seq: int = 10):
    out = []
    for i in range(n):
        ids = torch.randint(1, 128, (rows, seq), generator=torch.Generator().manual_seed(10 + i))
        out.append({"input_ids": ids, "labels": ids})
    return out


def _part(batch, rank: int):
    k = batch["input_ids"].shape[0] // WORLD
    return {key: v[rank * k:(rank + 1) * k] for key, v in batch.items()}


def _trainable(model):
    return {n.replace("module.", "", 1): p for n, p in model.named_parameters() if p.requires_grad}


def _check_ddp(rank: int) -> None:
    """DDP over a patched PEFT model == one process on the global batch; update_from_grads on DDP-averaged
    gradients == one process's on the global batch (the square of the mean gradient)."""
    import forgetkern
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref, mine = _lora_model(), _lora_model()
    forgetkern.patch(ref)
    forgetkern.patch(mine)
    ddp = DDP(mine)
    opt_ref = forgetkern.optim.AdamW(list(_trainable(ref).values()), lr=1e-2)
    opt = forgetkern.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    est_ref = forgetkern.FisherEstimator(ref, params="lora")
    est = forgetkern.FisherEstimator(mine, params="lora")
    for batch in _batches(3):  # equal token counts per rank: the mean of the ranks' mean losses = global mean
        ref(**batch).loss.backward()
        ddp(**_part(batch, rank)).loss.backward()
        est_ref.update_from_grads(decay=0.5)
        est.update_from_grads(decay=0.5)
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
    pr, pm = _trainable(ref), _trainable(ddp)
    for n in pr:
        torch.testing.assert_close(pm[n], pr[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"DDP param {n}: {m}")
    for n, f in est_ref.fisher.items():
        torch.testing.assert_close(est.fisher[n], f, rtol=1e-4, atol=1e-10, msg=lambda m: f"EMA {n}: {m}")
    assert any(float(f.abs().max()) > 0 for f in est.fisher.values())


def _check_fisher(rank: int) -> dict:
    """The distributed estimate (each rank half the batches) == one process over all of them, every rank."""
    import forgetkern

    model = _lora_model()
    forgetkern.patch(model)
    data = _batches(4, rows=2, seq=8)
    out = {}
    for gran in ("sample", "batch"):
        full = forgetkern.FisherEstimator(model, params="lora", granularity=gran).estimate(
            data, progress=False, distributed=False)
        t0 = time.perf_counter()
        part = forgetkern.FisherEstimator(model, params="lora", granularity=gran).estimate(
            data[rank::WORLD], progress=False)
        out[f"fisher_{gran}_s"] = time.perf_counter() - t0
        assert part.num_tokens == full.num_tokens and part.num_samples == full.num_samples
        assert part.num_batches == full.num_batches
        for n in full:
            torch.testing.assert_close(part[n], full[n], rtol=1e-5, atol=1e-12, msg=lambda m: f"{gran} {n}: {m}")
    out["fisher_numel"] = sum(f.numel() for f in full.values())
    out["fisher_tensors"] = len(full)
    # an explicit group works too; distributed=False keeps the rank's own estimate (differs from the global)
    own = forgetkern.FisherEstimator(model, params="lora").estimate(data[rank::WORLD], progress=False,
                                                                  distributed=False)
    grp = forgetkern.FisherEstimator(model, params="lora").estimate(data[rank::WORLD], progress=False,
                                                                  process_group=dist.group.WORLD)
    n0 = next(iter(full))
    assert not torch.allclose(own[n0], grp[n0])
    return out


def _check_fsdp_ewc(rank: int, tmp: str) -> dict:
    """EWC (target="params") on FSDP2 DTensor shards: penalty / apply_ / the differentiable penalty equal the
    unsharded values, anchors and Fishers are sharded like the params, and nothing is gathered."""
    import forgetkern
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 6))

    ref, sh = net(), net()
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(sh, mesh=mesh)
    fisher = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) for i, (n, p)
              in enumerate(ref.named_parameters())}
    ewc_ref = forgetkern.EWC(ref, fisher, lam=0.7)
    ewc = forgetkern.EWC(sh, fisher, lam=0.7)
    for f, a, p in zip(ewc.tasks[0]["fishers"], ewc.tasks[0]["anchors"], ewc.params()):
        assert isinstance(f, DTensor) and isinstance(a, DTensor) and f.placements == p.placements
        assert f.to_local().numel() < f.numel()  # a shard, not the full tensor
    with torch.no_grad():  # move away from the anchor identically
        for (_, pr), (_, ps) in zip(ref.named_parameters(), sh.named_parameters()):
            delta = torch.randn(pr.shape, generator=torch.Generator().manual_seed(5)) * 0.1
            pr.add_(delta)
            ps.to_local().add_(_local_slice(delta, ps))
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    # differentiable penalty inside the loss, through FSDP's forward/backward
    loss_ref = ref(x).square().mean() + ewc_ref.penalty()
    loss_ref.backward()
    pen = ewc.penalty()
    assert not isinstance(pen, DTensor) and pen.dim() == 0
    torch.testing.assert_close(pen, ewc_ref.penalty().detach(), rtol=1e-6, atol=0)
    (sh(x).square().mean() + pen).backward()
    for (n, pr), (_, ps) in zip(ref.named_parameters(), sh.named_parameters()):
        torch.testing.assert_close(ps.grad.to_local(), _local_slice(pr.grad, ps), rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"FSDP grad {n}: {m}")
    # apply_ (fused gradient, no graph): adds the same EWC gradient to the shards
    for p in list(ref.parameters()) + list(sh.parameters()):
        p.grad = None
    t0 = time.perf_counter()
    v = ewc.apply_()
    apply_s = time.perf_counter() - t0
    v_ref = ewc_ref.apply_()
    torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=0)
    for pr, ps in zip(ref.parameters(), sh.parameters()):
        torch.testing.assert_close(ps.grad.to_local(), _local_slice(pr.grad, ps), rtol=1e-6, atol=1e-9)
    # bad input: a plain anchor for a DTensor parameter
    with pytest.raises(TypeError, match="is a DTensor but anchors"):
        forgetkern.ewc_penalty(ewc.params(), [torch.zeros(p.shape) for p in ewc.params()],
                               ewc.tasks[0]["fishers"], 1.0)
    # sharded checkpoint: per-rank files, reloads into an EWC on another sharded model
    d = os.path.join(tmp, "sharded")
    forgetkern.save_state(d, ewc=ewc)
    dist.barrier()
    assert os.path.isfile(os.path.join(d, f"forgetkern_state-rank{rank:05d}-of-{WORLD:05d}.safetensors"))
    sh2 = net()
    fully_shard(sh2, mesh=mesh)
    ewc2 = forgetkern.EWC(sh2, {n: torch.ones(p.shape) for n, p in ref.named_parameters()}, lam=0.1)
    forgetkern.load_state(d, ewc=ewc2)
    assert ewc2.lam == 0.7
    for a, b in zip(ewc.tasks[0]["fishers"] + ewc.tasks[0]["anchors"],
                    ewc2.tasks[0]["fishers"] + ewc2.tasks[0]["anchors"]):
        assert isinstance(b, DTensor) and torch.equal(a.to_local(), b.to_local())
    return {"ewc_apply_fsdp_s": apply_s}


def _local_slice(full: torch.Tensor, d) -> torch.Tensor:
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, d.device_mesh, d.placements, src_data_rank=None).to_local()


def _check_fsdp_patch(rank: int) -> None:
    """forgetkern.patch on an FSDP2-wrapped PEFT model: the loss and the LoRA gradient shards match an
    unsharded patched model (FSDP2 swaps the unsharded parameters in before the layer's forward, and the patched
    forward reads them at call time)."""
    import forgetkern
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ref, sh = _lora_model(), _lora_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in sh.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sh, mesh=mesh)
    forgetkern.patch(ref)
    report = forgetkern.patch(sh)
    assert report.patched and not report.skipped, report
    batch = _batches(1)[0]
    lr, ls = ref(**batch).loss, sh(**batch).loss
    lr.backward(), ls.backward()
    torch.testing.assert_close(ls, lr, rtol=1e-5, atol=1e-6)
    calls = sum(st.calls.get("fused", 0) for st in report._states)
    pr = dict(ref.named_parameters())
    n_checked = 0
    for n, p in sh.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.to_local(), _local_slice(pr[n].grad, p), rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"FSDP2 patched grad {n}: {m}")
            n_checked += 1
    assert n_checked > 0
    stats = report.call_stats() if hasattr(report, "call_stats") else None
    assert stats is None or calls >= 0


def _worker(rank: int, init_file: str, tmp: str, result_dir: str, t_spawn: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    out = {"start_s": time.time() - t_spawn}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        t = time.perf_counter()
        import forgetkern  # noqa: F401
        import peft  # noqa: F401
        out["import_s"] = time.perf_counter() - t
        for name, fn in (("ddp", _check_ddp), ("fisher", _check_fisher), ("fsdp_ewc", _check_fsdp_ewc),
                         ("fsdp_patch", _check_fsdp_patch)):
            t = time.perf_counter()
            r = fn(rank, tmp) if name == "fsdp_ewc" else fn(rank)
            out[f"{name}_s"] = time.perf_counter() - t
            out.update(r or {})
        torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_distributed_two_processes():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        if START_METHOD == "forkserver":
            import multiprocessing

            multiprocessing.set_forkserver_preload(PRELOAD)
        ctx = mp.start_processes(_worker, args=(init_file, tmp, tmp, time.time()), nprocs=WORLD, join=False,
                                 start_method=START_METHOD)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise AssertionError(f"the 2-process job did not finish in {JOB_TIMEOUT_S} s")
        except mp.ProcessRaisedException:
            errs = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.endswith(".err")]
            raise AssertionError("a rank failed:\n" + "\n".join(errs))
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        res = torch.load(os.path.join(tmp, "rank0.pt"))
        print("distributed timings / sizes:", res)
