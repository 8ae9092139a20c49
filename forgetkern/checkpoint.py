"""Save and restore forgetkern state next to a model / optimizer checkpoint: tensors in safetensors, the rest
(settings, counters, names) as JSON.

    forgetkern.save_state("ckpt/forgetkern", ewc=ewc, fisher=estimator, oplora=oplora, opt=opt,
                          rng=forgetkern.checkpoint.RngState())
    ...
    forgetkern.load_state("ckpt/forgetkern", ewc=ewc, fisher=estimator, oplora=oplora, opt=opt,
                          rng=forgetkern.checkpoint.RngState())   # objects built the same way, fresh

Any object with ``state_dict()`` / ``load_state_dict()`` can be passed (:class:`forgetkern.EWC` with its anchors,
Fishers and mode, :class:`forgetkern.FisherEstimator` with its running / EMA state, :class:`forgetkern.OLoRA`,
:class:`forgetkern.OPLoRA`, :class:`forgetkern.GPM`, :class:`forgetkern.optim.AdamW` and other optimizers,
modules, LR schedulers, :class:`RngState`). Tensors are stored bit for bit (safetensors keeps the raw bytes and
the dtype), so a run resumed from a checkpoint continues exactly like the uninterrupted one.

Layout of ``path`` (a directory): ``forgetkern_state.json`` + ``forgetkern_state.safetensors`` in one process;
under ``torch.distributed`` with more than one rank, every rank writes its own pair
``forgetkern_state-rank00001-of-00002.{json,safetensors}`` (no communication; a DTensor is stored as its local
shard with its placements). Loading reads the caller's rank's pair. State saved with sharded (DTensor) tensors
reloads only on the same world size (a clear error otherwise); replicated state saved by several ranks loads
on any world size (rank 0's copy).

On load each tensor goes to the device of the tensor it replaces in the object's current state (or of the
object's first tensor), and a DTensor is rebuilt on the mesh and placements of the tensor it replaces.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Optional

import torch

__all__ = ["save_state", "load_state", "RngState", "STATE_NAME"]

STATE_NAME = "forgetkern_state"
_FORMAT = 1
_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}


class RngState:
    """torch's CPU generator (and, with CUDA, every device's) as a checkpointable object: pass an instance to
    :func:`save_state` / :func:`load_state` so that dropout continues with the same masks after a resume."""

    def state_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = list(torch.cuda.get_rng_state_all())
        return out

    def load_state_dict(self, state) -> None:
        torch.random.set_rng_state(state["cpu"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _dist():
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _files(path: str, rank: int, world: int):
    stem = STATE_NAME if world == 1 else f"{STATE_NAME}-rank{rank:05d}-of-{world:05d}"
    return os.path.join(path, stem + ".json"), os.path.join(path, stem + ".safetensors")


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


# ---- encoding: nested containers -> JSON, tensors -> a flat {key: tensor} -------------------------------------
def _encode(obj, tensors: Dict[str, torch.Tensor], where: str):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        entry: Dict[str, Any] = {"__tensor__": key}
        t = obj.detach()
        if _is_dtensor(t):
            entry["placements"] = [repr(p) for p in t.placements]
            entry["global_shape"] = list(t.shape)
            t = t.to_local()
        if t.is_complex() or str(t.dtype).replace("torch.", "") not in _DTYPES:
            raise TypeError(f"forgetkern.save_state: {where} has dtype {t.dtype}, which cannot be stored")
        # own, contiguous CPU memory: safetensors refuses tensors that share storage
        tensors[key] = t.to("cpu", copy=True).contiguous()
        return entry
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).replace("torch.", "")}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") and k.endswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"forgetkern.save_state: {where} has a key of type {type(k).__name__}; only str "
                                f"and int keys can be stored")
            items.append([k, _encode(v, tensors, f"{where}[{k!r}]")])
        return {"__items__": items}
    raise TypeError(f"forgetkern.save_state: {where} is a {type(obj).__name__}, which cannot be stored; a state "
                    f"may hold tensors, numbers, strings, None, dtypes and lists / tuples / dicts of them")


def _has_sharded(enc) -> bool:
    if isinstance(enc, dict):
        if "__tensor__" in enc:
            return "placements" in enc
        return any(_has_sharded(v) for v in enc.values())
    if isinstance(enc, list):
        return any(_has_sharded(v) for v in enc)
    return False


def _decode(enc, tensors, template, fallback: torch.device, where: str):
    if isinstance(enc, list):
        tl = template if isinstance(template, (list, tuple)) else ()
        return [_decode(v, tensors, tl[i] if i < len(tl) else None, fallback, f"{where}[{i}]")
                for i, v in enumerate(enc)]
    if not isinstance(enc, dict):
        return enc
    if "__tensor__" in enc:
        t = tensors[enc["__tensor__"]]
        if "placements" in enc:
            if not _is_dtensor(template):
                raise ValueError(f"forgetkern.load_state: {where} was saved as a shard of a DTensor "
                                 f"({enc['placements']}), but the object's current {where} is not a DTensor: "
                                 f"build the object on the same sharded (fully_shard) model before loading")
            if list(template.shape) != list(enc["global_shape"]) or \
                    [repr(p) for p in template.placements] != enc["placements"]:
                raise ValueError(f"forgetkern.load_state: {where} was saved with global shape "
                                 f"{enc['global_shape']} and placements {enc['placements']}; the object's has "
                                 f"{list(template.shape)} and {[repr(p) for p in template.placements]}")
            from torch.distributed.tensor import DTensor

            local = template.to_local()
            if tuple(local.shape) != tuple(t.shape):
                raise ValueError(f"forgetkern.load_state: {where}: the saved local shard has shape "
                                 f"{tuple(t.shape)}, this rank's shard has {tuple(local.shape)}")
            return DTensor.from_local(t.to(local.device), template.device_mesh, template.placements,
                                      run_check=False, shape=template.shape, stride=template.stride())
        dev = template.device if isinstance(template, torch.Tensor) and not _is_dtensor(template) else fallback
        return t.to(dev)
    if "__dtype__" in enc:
        return _DTYPES[enc["__dtype__"]]
    if "__device__" in enc:
        return torch.device(enc["__device__"])
    if "__tuple__" in enc:
        return tuple(_decode(enc["__tuple__"], tensors, template, fallback, where))
    if "__items__" in enc:
        tm = template if isinstance(template, dict) else {}
        return {k: _decode(v, tensors, tm.get(k), fallback, f"{where}[{k!r}]") for k, v in enc["__items__"]}
    tm = template if isinstance(template, dict) else {}
    return {k: _decode(v, tensors, tm.get(k), fallback, f"{where}[{k!r}]") for k, v in enc.items()}


def _first_device(state) -> Optional[torch.device]:
    if isinstance(state, torch.Tensor):
        return state.device if not _is_dtensor(state) else state.to_local().device
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        for v in state:
            d = _first_device(v)
            if d is not None:
                return d
    return None


def _check_objects(fn: str, objects: Dict[str, Any]) -> None:
    if not objects:
        raise ValueError(f"forgetkern.{fn}: pass the objects as keyword arguments, e.g. {fn}(path, ewc=ewc, "
                         f"opt=optimizer)")
    for name, obj in objects.items():
        need = "state_dict" if fn == "save_state" else "load_state_dict"
        if not callable(getattr(obj, need, None)):
            raise TypeError(f"forgetkern.{fn}: {name}={type(obj).__name__} has no {need}() method")


def save_state(path, **objects) -> str:
    """Write every object's ``state_dict()`` under the directory ``path`` (created if needed); returns the
    JSON file written by this rank. See the module docstring for the layout."""
    from safetensors.torch import save_file

    _check_objects("save_state", objects)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    rank, world = _dist()
    tensors: Dict[str, torch.Tensor] = {}
    body = {name: _encode(obj.state_dict(), tensors, name) for name, obj in objects.items()}
    meta = {"format": _FORMAT, "rank": rank, "world_size": world, "objects": body,
            "types": {n: f"{type(o).__module__}.{type(o).__qualname__}" for n, o in objects.items()}}
    meta["sharded"] = _has_sharded(body)
    jpath, tpath = _files(path, rank, world)
    save_file(tensors, tpath + ".tmp", metadata={"format": str(_FORMAT)})
    with open(jpath + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(tpath + ".tmp", tpath)
    os.replace(jpath + ".tmp", jpath)
    return jpath


def _saved_world_sizes(path: str):
    sizes = set()
    if os.path.isfile(os.path.join(path, STATE_NAME + ".json")):
        sizes.add(1)
    pat = re.compile(re.escape(STATE_NAME) + r"-rank(\d+)-of-(\d+)\.json$")
    for f in os.listdir(path):
        m = pat.match(f)
        if m:
            sizes.add(int(m.group(2)))
    return sorted(sizes)


def load_state(path, *, strict: bool = True, **objects) -> Dict[str, str]:
    """Restore the objects saved by :func:`save_state` (same keyword names) in place, through their
    ``load_state_dict``. ``strict``: every name passed must be in the checkpoint (else a KeyError names the
    missing ones). Returns ``{name: saved type}`` of what was loaded."""
    from safetensors.torch import load_file

    _check_objects("load_state", objects)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"forgetkern.load_state: {path!r} is not a directory written by save_state")
    rank, world = _dist()
    sizes = _saved_world_sizes(path)
    if not sizes:
        raise FileNotFoundError(f"forgetkern.load_state: no {STATE_NAME}*.json in {path!r}")
    if world in sizes:
        jpath, tpath = _files(path, rank, world)
        with open(jpath) as f:
            meta = json.load(f)
    else:
        saved = sizes[0]
        jpath, tpath = _files(path, 0, saved)
        with open(jpath) as f:
            meta = json.load(f)
        if meta.get("sharded"):
            raise ValueError(f"forgetkern.load_state: {path!r} holds sharded (DTensor) state saved on "
                             f"{saved} ranks; this run has {world}. Sharded forgetkern state reloads on the same "
                             f"world size only: resume on {saved} ranks (or save it unsharded: full tensors)")
    if meta.get("format") != _FORMAT:
        raise ValueError(f"forgetkern.load_state: {jpath!r} has format {meta.get('format')!r}, expected {_FORMAT}")
    missing = [n for n in objects if n not in meta["objects"]]
    if missing and strict:
        raise KeyError(f"forgetkern.load_state: {missing} not in the checkpoint (it has "
                       f"{sorted(meta['objects'])})")
    tensors = load_file(tpath)
    loaded = {}
    for name, obj in objects.items():
        if name not in meta["objects"]:
            continue
        try:
            template = obj.state_dict()
        except Exception:
            template = None
        fallback = _first_device(template) or torch.device("cpu")
        if isinstance(obj, torch.optim.Optimizer):
            template = _optimizer_template(obj, meta["objects"][name])
        state = _decode(meta["objects"][name], tensors, template, fallback, name)
        obj.load_state_dict(state)
        loaded[name] = meta["types"].get(name, "")
    return loaded


def _optimizer_template(opt: torch.optim.Optimizer, enc) -> Dict[str, Any]:
    """A template for an optimizer's (possibly still empty) state: every per-parameter tensor like its
    parameter (device, DTensor mesh); the step counts are left as saved (torch keeps them on the CPU)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for k, v in (enc.get("state", {}).get("__items__", []) if isinstance(enc.get("state"), dict) else []):
        k = int(k)
        if k < len(params) and isinstance(v, dict):
            p = params[k]
            state[k] = {key: (p if key != "step" else torch.empty(0)) for key in v}
    return {"state": state}
