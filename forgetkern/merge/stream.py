"""Out-of-core merging of safetensors checkpoints, one tensor at a time (see :func:`merge_safetensors`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from forgetkern.merge.core import merge_kwargs, tensor_id
from forgetkern.ops.merge_task_vectors import merge_task_vectors

PathLike = Union[str, os.PathLike]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_FLOAT = ("F64", "F32", "F16", "BF16")


def _safe_open():
    try:
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("forgetkern.merge_safetensors needs the safetensors package: pip install safetensors") \
            from exc
    return safe_open


def _files(where: str, name: str, path: PathLike) -> List[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"forgetkern.{where}: {name} {str(path)!r} is a directory without "
                                    f".safetensors files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"forgetkern.{where}: {name} {str(path)!r} does not exist (expected a "
                                f".safetensors file or a directory of shards)")
    return [path]


class _Checkpoint:
    """Name -> open shard of one (possibly sharded) checkpoint; tensors are read one at a time."""

    def __init__(self, where: str, name: str, path: PathLike):
        safe_open = _safe_open()
        self.files = _files(where, name, path)
        self.handles = [safe_open(str(f), framework="pt", device="cpu") for f in self.files]
        self.where: Dict[str, int] = {}
        for i, h in enumerate(self.handles):
            for key in h.keys():
                self.where[key] = i

    def keys(self) -> List[str]:
        return list(self.where)

    def shape_dtype(self, key: str):
        s = self.handles[self.where[key]].get_slice(key)
        return list(s.get_shape()), s.get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)


def _header(entries, metadata: Optional[dict]) -> bytes:
    head = {}
    offset = 0
    for name, shape, dt in entries:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=_DTYPES[dt]).element_size()
        head[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(head, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return len(raw).to_bytes(8, "little") + raw


def merge_safetensors(base_path: PathLike, ft_paths: Sequence[PathLike], out_path: PathLike, *,
                      method: str = "task_arithmetic", weights: Optional[Sequence[float]] = None,
                      density: Optional[float] = None, p: Optional[float] = None, lam: float = 1.0, seed: int = 0,
                      sign: str = "total", sign_weighted: bool = False, normalize: Optional[str] = "default",
                      rescale: bool = True, metadata: Optional[dict] = None) -> dict:
    """Merge fine-tuned safetensors checkpoints into their base without loading a whole model.

    ``base_path`` and each of ``ft_paths`` is a ``.safetensors`` file or a directory of shards (any sharding:
    a tensor is looked up by name in whichever shard holds it). The output mirrors the base: one file at
    ``out_path`` for a single-file base, else a directory ``out_path`` with the base's shard file names (and its
    ``*.index.json``, whose weight map stays valid). Tensors are streamed: for each tensor, the base and the N
    fine-tuned tensors are read (``safe_open``), merged by :func:`forgetkern.merge_task_vectors`
    (``subtract_base``; parameters as in :func:`forgetkern.merge_models`, whose result this equals bit for bit)
    and written at their place in the output file, whose header is written first from the shapes. Peak memory
    is about ``N + 2`` tensors of the largest size (plus one ``|tau|`` copy for the TIES threshold), whatever
    the model size. Non-float tensors are copied from the base. Returns ``{"files": [...], "tensors": count,
    "max_tensor_bytes": ...}``.
    """
    where = "merge_safetensors"
    if isinstance(ft_paths, (str, os.PathLike)) or not isinstance(ft_paths, (list, tuple)) or not ft_paths:
        raise TypeError(f"forgetkern.{where}: ft_paths must be a non-empty list of paths (one per fine-tuned "
                        f"model), got {ft_paths!r}")
    kw = merge_kwargs(where, method, len(ft_paths), weights, density, p, lam, seed, sign, sign_weighted, normalize,
                      rescale)
    base = _Checkpoint(where, "base_path", base_path)
    fts = [_Checkpoint(where, f"ft_paths[{k}]", fp) for k, fp in enumerate(ft_paths)]
    for k, ft in enumerate(fts):
        for key in base.keys():
            if key not in ft.where:
                raise KeyError(f"forgetkern.{where}: ft_paths[{k}] has no tensor {key!r} (present in the base)")
            if ft.shape_dtype(key)[0] != base.shape_dtype(key)[0]:
                raise ValueError(f"forgetkern.{where}: ft_paths[{k}] tensor {key!r} has shape "
                                 f"{ft.shape_dtype(key)[0]} but the base has {base.shape_dtype(key)[0]}")
    out_path = Path(out_path)
    single = len(base.files) == 1 and Path(base_path).is_file()
    if single:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        outs = [out_path]
    else:
        out_path.mkdir(parents=True, exist_ok=True)
        outs = [out_path / f.name for f in base.files]
        for idx in Path(base_path).glob("*.index.json"):
            shutil.copyfile(idx, out_path / idx.name)
    max_bytes, count = 0, 0
    for i, (h, dst) in enumerate(zip(base.handles, outs)):
        names = list(h.keys())
        entries = [(n, *base.shape_dtype(n)) for n in names]
        meta = metadata if metadata is not None else h.metadata()
        with open(dst, "wb") as f:
            f.write(_header(entries, meta))
            for name, shape, dt in entries:
                b = base.get(name)
                if dt in _FLOAT:
                    xs = [ft.get(name) for ft in fts]
                    max_bytes = max(max_bytes, b.nbytes * (1 + len(xs)))
                    (merged,) = merge_task_vectors([b], [[x] for x in xs], subtract_base=True,
                                                   tensor_ids=[tensor_id(name)], **kw)
                    del xs
                else:
                    merged = b
                f.write(merged.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                count += 1
                del b, merged
    return {"files": [str(o) for o in outs], "tensors": count, "max_tensor_bytes": max_bytes}
