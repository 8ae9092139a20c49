"""forgetkern.merge: whole-model merges against the real PEFT merge functions and add_weighted_adapter, the
the real mergekit (merge_tensors; DARE with our masks handed to it), WiSE-FT, DARE reproducibility, the streamed safetensors
merge of a sharded model (peak memory measured on the tensors it holds) and the LoRA merge in row tiles."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

import forgetkern
from forgetkern.merge import merge_lora, merge_models, merge_safetensors, tensor_id, wise_ft
from forgetkern.merge import stream as fk_stream
from forgetkern.ops.merge_task_vectors import task_keys
from forgetkern.reference.merge_task_vectors import dare_keep

peft_mu = pytest.importorskip("peft.utils.merge_utils")


def _sds(n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.q.weight": (24, 16), "layers.0.mlp.weight": (40, 16), "norm.weight": (16,),
              "layers.1.q.weight": (24, 16)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    base["step"] = torch.tensor(7)  # an integer buffer: copied
    fts = []
    for _ in range(n):
        fts.append({k: (v + 0.05 * torch.randn(v.shape, generator=g).to(dtype)) if v.is_floating_point() else v
                    for k, v in base.items()})
    return base, fts


def _peft(method, taus, weights, density):
    w = torch.tensor(weights)
    if method == "task_arithmetic":
        return peft_mu.task_arithmetic(taus, w)
    return getattr(peft_mu, method)(taus, w, density)


@pytest.mark.parametrize("method,density,sign", [("task_arithmetic", None, "total"), ("ties", 0.3, "total"),
                                                  ("ties", 0.3, "frequency"), ("magnitude_prune", 0.4, "total")])
def test_merge_models_equals_peft_merge_utils(method, density, sign):
    base, fts = _sds()
    weights = [0.6, 1.0, 0.8]
    kw = {"density": density} if density is not None else {}
    if method == "ties":
        kw["sign"] = sign
    got = merge_models(base, fts, method=method, weights=weights, **kw)
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(got[name], b)
            continue
        taus = [ft[name] - b for ft in fts]
        if method == "ties":
            want = b + peft_mu.ties(taus, torch.tensor(weights), density, majority_sign_method=sign)
        else:
            want = b + _peft(method, taus, weights, density)
        torch.testing.assert_close(got[name], want, rtol=0, atol=4e-7 * (b.abs().max().item() + 1))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_with_our_mask(method, monkeypatch):
    """PEFT's DARE draws its mask with torch.bernoulli: hand it ours (in call order) and the results agree."""
    base, fts = _sds()
    weights, p = [0.6, 1.0, 0.8], 0.6
    got = merge_models(base, fts, method=method, weights=weights, p=p, seed=3)
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        keys = task_keys(3, [tensor_id(name)], 3)
        masks = iter([dare_keep(k, p, b.numel()).reshape(b.shape).to(b.dtype) for k in keys])
        monkeypatch.setattr(torch, "bernoulli", lambda probs, *a, **k: next(masks))
        taus = [ft[name] - b for ft in fts]
        want = b + getattr(peft_mu, method)(taus, torch.tensor(weights), 1 - p)
        monkeypatch.undo()
        torch.testing.assert_close(got[name], want, rtol=0, atol=2e-6 * (b.abs().max().item() + 1))


def test_dare_p0_is_task_arithmetic_and_expectation():
    base, fts = _sds()
    ta = merge_models(base, fts, method="task_arithmetic")
    d0 = merge_models(base, fts, method="dare_linear", p=0.0)
    assert all(torch.equal(ta[k], d0[k]) for k in base)
    # E[DARE] = task arithmetic: the mean over seeds converges (sd of the mean ~ 1/sqrt(seeds))
    name = "layers.0.mlp.weight"
    runs = torch.stack([merge_models(base, fts, method="dare_linear", p=0.5, seed=s, names=[name])[name]
                        for s in range(200)])
    tau = ta[name] - base[name]
    err = (runs.mean(0) - ta[name]).abs().mean() / tau.abs().mean()
    assert err < 0.12


MERGEKIT = {  # mergekit method -> forgetkern keywords giving the same merge (its defaults for each method)
    "task_arithmetic": dict(method="task_arithmetic", normalize="none"),
    "ties": dict(method="ties", density=0.3, sign_weighted=True, normalize="weight"),
    "dare_linear": dict(method="dare_linear", p=0.6, normalize="none"),
    "dare_ties": dict(method="dare_ties", p=0.6, sign_weighted=True, normalize="none"),
}


@pytest.mark.parametrize("lam", [1.0, 0.7])
@pytest.mark.parametrize("method", list(MERGEKIT))
def test_merge_models_equals_mergekit(method, lam, monkeypatch):
    """The real mergekit (``merge_tensors``, its in-memory API over the same GeneralizedTaskArithmeticMerge a
    YAML merge runs): task vectors weighted before mergekit's sign vote, ``normalize`` by the agreeing weights,
    ``lambda``. DARE: mergekit draws masks with torch.bernoulli (handed ours, in call order) and rescales a
    kept task vector to its original L1 norm instead of by 1/(1-p), so rescale is off on both sides here; the
    L1 rule itself is pinned by test_mergekit_dare_l1_rescale_vs_the_paper's."""
    pytest.importorskip("mergekit.merge_methods")
    from mergekit.merge_methods import merge_tensors

    base, fts = _sds()
    weights = [0.6, 1.0, 0.8]
    kw = dict(MERGEKIT[method], weights=weights, lam=lam, seed=5)
    params = {"weight": weights, "lambda": lam}
    if "density" in kw:
        params["density"] = kw["density"]
    if "p" in kw:
        params.update(density=1 - kw["p"], rescale=False)
        kw["rescale"] = False
    got = merge_models(base, fts, **kw)
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        if "p" in kw:
            keys = task_keys(5, [tensor_id(name)], 3)
            masks = iter([dare_keep(k, kw["p"], b.numel()).reshape(b.shape).float() for k in keys])
            monkeypatch.setattr(torch, "bernoulli", lambda probs, *a, **k: next(masks))
        want = merge_tensors([b] + [ft[name] for ft in fts], method, base_index=0, parameters=params)
        monkeypatch.undo()
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6 * (b.abs().max().item() + 1))


def test_mergekit_dare_l1_rescale_vs_the_papers():
    """mergekit's DARE rescales the kept entries of a task vector by ||tau||_1 / ||m * tau||_1; forgetkern (as
    the DARE paper and PEFT) by 1/(1-p): on the same mask the two differ by exactly that ratio times (1-p)."""
    pytest.importorskip("mergekit.merge_methods")
    from mergekit.merge_methods import merge_tensors

    base, fts = _sds(n=1)
    name, p = "layers.0.mlp.weight", 0.7
    b, ft = base[name], fts[0][name]
    got = merge_models(base, fts, method="dare_linear", p=p, seed=2, names=[name])[name]
    mask = dare_keep(task_keys(2, [tensor_id(name)], 1)[0], p, b.numel()).reshape(b.shape).float()
    orig = torch.bernoulli
    try:
        torch.bernoulli = lambda probs, *a, **k: mask
        want = merge_tensors([b, ft], "dare_linear", base_index=0, parameters={"weight": 1.0, "density": 1 - p})
    finally:
        torch.bernoulli = orig
    tau = (ft - b).double()
    ratio = tau.abs().sum() / (mask.double() * tau).abs().sum()
    torch.testing.assert_close((got - b).double(), (want - b).double() / (ratio * (1 - p)), rtol=1e-5,
                               atol=1e-7)


def test_wise_ft():
    base, fts = _sds(n=1)
    for alpha in (0.0, 0.3, 1.0):
        got = wise_ft(base, fts[0], alpha)
        for k, b in base.items():
            if b.is_floating_point():
                want = (1 - alpha) * b.double() + alpha * fts[0][k].double()
                torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-6)
        if alpha == 0.0:
            assert all(torch.equal(got[k], base[k]) for k in base)
    with pytest.raises(TypeError, match="alpha"):
        wise_ft(base, fts[0], "half")


def test_dare_reproducible_from_seed_and_independent_of_order():
    base, fts = _sds()
    a = merge_models(base, fts, method="dare_ties", p=0.7, seed=9)
    b = merge_models(dict(reversed(list(base.items()))), fts, method="dare_ties", p=0.7, seed=9)
    c = merge_models(base, fts, method="dare_ties", p=0.7, seed=10)
    assert all(torch.equal(a[k], b[k]) for k in base)
    assert not torch.equal(a["layers.0.q.weight"], c["layers.0.q.weight"])
    # same shape, different names: different masks
    assert not torch.equal(a["layers.0.q.weight"] - base["layers.0.q.weight"],
                           a["layers.1.q.weight"] - base["layers.1.q.weight"])


def test_merge_models_bad_args():
    base, fts = _sds()
    with pytest.raises(TypeError, match="ft_sds must be a non-empty list"):
        merge_models(base, fts[0])
    with pytest.raises(KeyError, match="has no tensor"):
        merge_models(base, [{k: v for k, v in fts[0].items() if k != "norm.weight"}])
    bad = dict(fts[0], **{"norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="has shape"):
        merge_models(base, [bad])
    with pytest.raises(ValueError, match="weights must be a list of 3"):
        merge_models(base, fts, weights=[1.0])
    with pytest.raises(ValueError, match="needs density"):
        merge_models(base, fts, method="ties")
    with pytest.raises(TypeError, match="seed must be an int"):
        merge_models(base, fts, method="dare_linear", p=0.5, seed=0.5)


# ---- out of core -------------------------------------------------------------------------------------------
def _save_sharded(sd, path, n_shards):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in names[i::n_shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _big_sds(n=2):
    g = torch.Generator().manual_seed(4)
    base = {f"layers.{i}.w": torch.randn(64, 128, generator=g) for i in range(12)}
    base["emb"] = torch.randn(100, 32, generator=g).bfloat16()
    base["pos_ids"] = torch.arange(10)
    fts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v
            for k, v in base.items()} for _ in range(n)]
    return base, fts


class _Tracker:
    """Wraps safe_open: counts the bytes of the tensors read from the checkpoints that are still alive."""

    def __init__(self, real):
        self.real, self.live, self.peak = real, 0, 0

    def __call__(self, *a, **k):
        tracker, handle = self, self.real(*a, **k)

        class H:
            def __getattr__(self, name):
                return getattr(handle, name)

            def get_tensor(self, key):
                t = handle.get_tensor(key)
                n = t.untyped_storage().nbytes()
                tracker.live += n
                tracker.peak = max(tracker.peak, tracker.live)
                weakref.finalize(t, tracker._free, n)
                return t

        return H()

    def _free(self, n):
        self.live -= n


@pytest.mark.parametrize("method,kw", [("ties", {"density": 0.2}), ("dare_ties", {"p": 0.5})])
def test_merge_safetensors_sharded_streamed(tmp_path, monkeypatch, method, kw):
    from safetensors.torch import load_file, save_file

    base, fts = _big_sds()
    _save_sharded(base, tmp_path / "base", 3)
    _save_sharded(fts[0], tmp_path / "ft0", 2)                      # other sharding
    save_file({k: v.contiguous() for k, v in fts[1].items()}, str(tmp_path / "ft1.safetensors"))  # one file
    tracker = _Tracker(fk_stream._safe_open())
    monkeypatch.setattr(fk_stream, "_safe_open", lambda: tracker)
    gc.collect()
    info = merge_safetensors(tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1.safetensors"], tmp_path / "out",
                             method=method, weights=[0.5, 1.0], seed=1, **kw)
    assert info["tensors"] == len(base) and len(info["files"]) == 3
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    got = {}
    for f in info["files"]:
        got.update(load_file(f))
    want = merge_models(base, fts, method=method, weights=[0.5, 1.0], seed=1, **kw)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    largest = max(v.untyped_storage().nbytes() for v in base.values())
    total = sum(v.untyped_storage().nbytes() for v in base.values()) * 3
    # at most the base and the two fine-tuned copies of one tensor alive at once (the model is 13 tensors)
    assert tracker.peak <= 3 * largest < total / 4, (tracker.peak, largest, total)


def test_merge_safetensors_single_file_and_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    base, fts = _big_sds(n=1)
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(fts[0], str(tmp_path / "f.safetensors"))
    merge_safetensors(tmp_path / "b.safetensors", [tmp_path / "f.safetensors"], tmp_path / "o.safetensors",
                      method="task_arithmetic", weights=[0.5])
    got = load_file(str(tmp_path / "o.safetensors"))
    want = wise_ft(base, fts[0], 0.5)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_safetensors(tmp_path / "nope.safetensors", [tmp_path / "f.safetensors"], tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="ft_paths must be a non-empty list"):
        merge_safetensors(tmp_path / "b.safetensors", tmp_path / "f.safetensors", tmp_path / "x.safetensors")
    save_file({k: v for k, v in fts[0].items() if k != "emb"}, str(tmp_path / "g.safetensors"))
    with pytest.raises(KeyError, match="has no tensor 'emb'"):
        merge_safetensors(tmp_path / "b.safetensors", [tmp_path / "g.safetensors"], tmp_path / "x.safetensors")


# ---- LoRA ----------------------------------------------------------------------------------------------------
def _two_adapter_model(kind="llama", **cfg):
    from tests._patch_helpers import lora_model

    model = lora_model(kind, r=4, lora_alpha=8, **cfg)
    cfg = model.peft_config["default"]
    import copy

    cfg2 = copy.deepcopy(cfg)
    cfg2.r, cfg2.lora_alpha = 6, 6
    model.add_adapter("other", cfg2)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for n, prm in model.named_parameters():
            if "lora_" in n and ".other." in n:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
    return model


def _dense_deltas(model, adapters):
    from forgetkern.merge.lora import _Delta, _lora_layers

    out = {}
    for name, layer in _lora_layers(model):
        rows = layer.get_base_layer().weight.shape[0]
        out[f"{name}.weight"] = [_Delta(layer, a, torch.float32).rows(0, rows) for a in adapters]
    return out


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {}), ("ties", {"density": 0.3}),
                                       ("dare_ties", {"p": 0.5}), ("magnitude_prune", {"density": 0.5})])
def test_merge_lora_equals_dense_merge(method, kw):
    model = _two_adapter_model()
    adapters, weights = ["default", "other"], [0.7, 1.2]
    one = merge_lora(model, adapters, method=method, weights=weights, seed=2, tile_rows=10 ** 9, **kw)
    tiled = merge_lora(model, adapters, method=method, weights=weights, seed=2, tile_rows=5, **kw)
    dense = _dense_deltas(model, adapters)
    names = list(dense)
    want = merge_models({n: torch.zeros_like(dense[n][0]) for n in names},
                        [{n: dense[n][k] for n in names} for k in range(2)], method=method, weights=weights,
                        seed=2, **kw)
    assert set(one) == set(want)
    for n in names:
        assert torch.equal(one[n], want[n]), n
        torch.testing.assert_close(tiled[n], want[n], rtol=0, atol=1e-6)
        if method == "dare_ties":
            assert torch.equal(tiled[n] != 0, want[n] != 0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method,combo,kw", [("task_arithmetic", "svd", {}), ("ties", "ties_svd", {"density": 0.4}),
                                             ("magnitude_prune", "magnitude_prune_svd", {"density": 0.4})])
def test_merge_lora_equals_peft_add_weighted_adapter(kind, method, combo, kw):
    """PEFT's *_svd combinations merge the layers' s B A exactly like this; with a full-rank SVD the new
    adapter's delta is that merge (up to the SVD's float32 error)."""
    # every adapted layer has min(out, in) = 64 (Llama's 32-row k/v projections left out): svd_rank=64 is full
    cfg = {} if kind == "gpt2" else {"target_modules": ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    model = _two_adapter_model(kind, **cfg)
    adapters, weights = ["default", "other"], [0.7, 1.2]
    got = merge_lora(model, adapters, method=method, weights=weights, tile_rows=7, **kw)
    full = 64
    model.add_weighted_adapter(adapters, weights, "merged", combination_type=combo, svd_rank=full,
                               density=kw.get("density"))
    from forgetkern.merge.lora import _lora_layers

    for name, layer in _lora_layers(model):
        pf = layer.get_delta_weight("merged")
        ours = got[f"{name}.weight"]
        scale = ours.abs().max().item() + 1e-12
        torch.testing.assert_close(pf, ours, rtol=0, atol=2e-5 * scale)


def test_merge_lora_weight_output_and_apply(tmp_path):
    model = _two_adapter_model()
    from forgetkern.merge.lora import _lora_layers

    w0 = {f"{n}.weight": m.get_base_layer().weight.detach().clone() for n, m in _lora_layers(model)}
    delta = merge_lora(model, ["default", "other"], method="ties", density=0.5)
    merged = merge_lora(model, ["default", "other"], method="ties", density=0.5, output="weight",
                        apply_to_base=True)
    for n in delta:
        torch.testing.assert_close(merged[n], w0[n] + delta[n], rtol=0, atol=1e-6)
    name, layer = _lora_layers(model)[0]
    assert torch.equal(layer.get_base_layer().weight, merged[f"{name}.weight"])
    with pytest.raises(ValueError, match="adapter 'nope' is not in the model"):
        merge_lora(model, ["nope"])
    with pytest.raises(ValueError, match="output must be"):
        merge_lora(model, ["default"], output="both")
    with pytest.raises(TypeError, match="adapters must be a non-empty list"):
        merge_lora(model, "default")
    with pytest.raises(ValueError, match="apply_to_base=True needs"):
        merge_lora(model, ["default"], apply_to_base=True)


def test_merge_lora_never_forms_a_whole_update(monkeypatch):
    """TIES on LoRA: every s B A is formed in row tiles of at most tile_rows rows (thresholds included), and the
    tiled radix selection finds torch.kthvalue's threshold on the dense update."""
    from forgetkern.merge import lora as fk_lora

    model = _two_adapter_model()
    rows_seen = []
    real = fk_lora._Delta.rows

    def spy(self, r0, r1):
        rows_seen.append(r1 - r0)
        return real(self, r0, r1)

    monkeypatch.setattr(fk_lora._Delta, "rows", spy)
    merge_lora(model, ["default", "other"], method="ties", density=0.3, tile_rows=8)
    assert rows_seen and max(rows_seen) <= 8
    monkeypatch.undo()
    name, layer = fk_lora._lora_layers(model)[0]
    d = fk_lora._Delta(layer, "other", torch.float32)
    rows = layer.get_base_layer().weight.shape[0]
    dense = d.rows(0, rows)
    k = int(0.3 * dense.numel())
    got = fk_lora.kth_largest_abs(lambda: (d.rows(r, min(r + 8, rows)) for r in range(0, rows, 8)), k,
                                  torch.float32)
    tiles = torch.cat([d.rows(r, min(r + 8, rows)) for r in range(0, rows, 8)])
    assert got == torch.kthvalue(tiles.abs().reshape(-1), dense.numel() - k + 1).values
