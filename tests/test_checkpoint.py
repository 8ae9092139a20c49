"""forgetkern.save_state / load_state: every forgetkern object round-trips through safetensors + JSON, and a run
stopped mid-way and resumed in fresh objects continues BIT FOR BIT like the uninterrupted run."""

from __future__ import annotations

import json
import os

import pytest
import torch

import forgetkern
from forgetkern.checkpoint import RngState

from ._patch_helpers import lora_model

peft = pytest.importorskip("peft")

STEPS, STOP = 6, 3


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def _build(init_seed: int):
    """Everything a run holds, built the same way; ``init_seed`` changes the adapters' and the EWC's initial
    values, so that a resumed run only matches if the checkpoint restored them."""
    model = lora_model("llama", lora_dropout=0.1, r=4, lora_alpha=8)
    with torch.no_grad():
        g = torch.Generator().manual_seed(init_seed)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    forgetkern.patch(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    est = forgetkern.FisherEstimator(model, params="lora")
    fisher = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(init_seed)) for n, p in
              model.named_parameters() if n in names}
    ewc = forgetkern.EWC(model, fisher, lam=0.5, mode="online", gamma=0.9)
    opt = forgetkern.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, ewc=ewc)
    oplora = forgetkern.OPLoRA(model, k=2)
    return model, est, ewc, opt, oplora


def _step(step, model, est, ewc, opt, oplora) -> torch.Tensor:
    model.train()
    out = model(**_batch(step))
    out.loss.backward()
    est.update_from_grads(decay=0.8)
    oplora.project_grads_()
    opt.step()
    opt.zero_grad(set_to_none=True)
    oplora.project_()
    return out.loss.detach()


def _objects(model, est, ewc, opt, oplora):
    return dict(model=model, fisher=est, ewc=ewc, opt=opt, oplora=oplora, rng=RngState())


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_is_bit_exact(tmp_path):
    with forgetkern.use_backend("torch"):
        torch.manual_seed(0)
        objs = _build(init_seed=7)
        ref_losses = [_step(i, *objs) for i in range(STEPS)]
        ref_params, ref_fisher = _trainable(objs[0]), dict(objs[1].fisher)

        torch.manual_seed(0)
        objs = _build(init_seed=7)
        losses = [_step(i, *objs) for i in range(STOP)]
        forgetkern.save_state(tmp_path / "ck", **_objects(*objs))
        del objs
        torch.manual_seed(123)  # the RNG state must come from the checkpoint
        objs = _build(init_seed=99)  # different adapters / EWC state: the checkpoint must restore them
        assert not torch.equal(_trainable(objs[0])[next(iter(ref_params))], ref_params[next(iter(ref_params))])
        loaded = forgetkern.load_state(tmp_path / "ck", **_objects(*objs))
        assert set(loaded) == {"model", "fisher", "ewc", "opt", "oplora", "rng"}
        losses += [_step(i, *objs) for i in range(STOP, STEPS)]

    assert [float(x) for x in losses] == [float(x) for x in ref_losses]
    for n, p in _trainable(objs[0]).items():
        assert torch.equal(p, ref_params[n]), n
    for n, f in objs[1].fisher.items():
        assert torch.equal(f, ref_fisher[n]), n
    assert ref_losses[0] != ref_losses[-1]  # the run moved


def test_files_are_safetensors_and_json(tmp_path):
    from safetensors.torch import load_file

    with forgetkern.use_backend("torch"):
        model, est, ewc, opt, oplora = _build(init_seed=1)
        _step(0, model, est, ewc, opt, oplora)
        forgetkern.save_state(tmp_path, ewc=ewc, opt=opt)
    meta = json.load(open(tmp_path / "forgetkern_state.json"))
    assert meta["world_size"] == 1 and not meta["sharded"] and set(meta["objects"]) == {"ewc", "opt"}
    tensors = load_file(str(tmp_path / "forgetkern_state.safetensors"))
    n_ewc = 2 * len(ewc.names)  # anchors + Fishers of one (online) task
    n_opt = 3 * len(opt.state)  # step, exp_avg, exp_avg_sq per parameter
    assert len(tensors) == n_ewc + n_opt
    assert meta["objects"]["ewc"]["mode"] == "online" and meta["objects"]["ewc"]["gamma"] == 0.9


def test_projection_objects_round_trip(tmp_path):
    with forgetkern.use_backend("torch"):
        model = lora_model("llama", r=4)
        olora, gpm = forgetkern.OLoRA(model, lam=0.25), forgetkern.GPM(model, threshold=0.9, max_tokens=64)
        gpm.update_memory([{"input_ids": _batch(0)["input_ids"]}])
        olora.new_task()
        forgetkern.save_state(tmp_path, olora=olora, gpm=gpm)
        model2 = lora_model("llama", r=4)
        olora2, gpm2 = forgetkern.OLoRA(model2, lam=0.5), forgetkern.GPM(model2)
        forgetkern.load_state(tmp_path, olora=olora2, gpm=gpm2)
    assert olora2.lam == 0.25 and olora2.num_tasks == 1
    assert all(torch.equal(a, b) for a, b in zip(olora.past, olora2.past))
    assert gpm2.threshold == 0.9 and gpm2.max_tokens == 64
    assert all(torch.equal(a, b) for a, b in zip(gpm.bases, gpm2.bases)) and gpm.bases[0].shape[1] > 0


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="keyword arguments"):
        forgetkern.save_state(tmp_path)
    with pytest.raises(TypeError, match="no state_dict"):
        forgetkern.save_state(tmp_path, x=3)
    with pytest.raises(FileNotFoundError, match="no forgetkern_state"):
        forgetkern.load_state(tmp_path, rng=RngState())
    forgetkern.save_state(tmp_path, rng=RngState())
    with pytest.raises(KeyError, match=r"\['ewc'\] not in the checkpoint"):
        forgetkern.load_state(tmp_path, ewc=RngState())

    class Bad:
        def state_dict(self):
            return {"f": object()}

    with pytest.raises(TypeError, match=r"bad\['f'\] is a object"):
        forgetkern.save_state(tmp_path / "b", bad=Bad())
    # another world size's sharded state: a clear error
    os.makedirs(tmp_path / "s")
    for r in range(2):
        with open(tmp_path / "s" / f"forgetkern_state-rank{r:05d}-of-00002.json", "w") as f:
            json.dump({"format": 1, "objects": {}, "types": {}, "sharded": True, "world_size": 2}, f)
    with pytest.raises(ValueError, match="saved on 2 ranks; this run has 1"):
        forgetkern.load_state(tmp_path / "s", rng=RngState())
