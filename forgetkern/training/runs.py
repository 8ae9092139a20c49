"""One fine-tuning run with the chosen mitigations, evaluated at step checkpoints: the engine of ``forgetkern demo``.

A :class:`RunConfig` names a method (``naive``, ``full``, ``replay``, ``mssr``, ``freeze``, ``ewc``,
``ewc_params``, ``lwf``, ``oplora``, ``gpm``), a learning rate, checkpoints (step counts) and a seed. :func:`train_and_eval` copies the base model,
adds a fresh LoRA adapter (or trains every weight for ``full``), patches it with :func:`forgetkern.patch`,
trains with AdamW on the task windows (mixed with general windows for ``replay``) and measures the task and
general sets at every checkpoint, so one run traces a part of the learning-rate x steps trade-off curve.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("naive", "full", "replay", "mssr", "freeze", "ewc", "ewc_params", "lwf", "oplora", "gpm")


@dataclasses.dataclass
class RunConfig:
    method: str
    lr: float
    checkpoints: Sequence[int]
    seed: int = 0
    batch_size: int = 4
    rank: int = 16
    alpha: float = 32.0
    replay_ratio: float = 0.25
    freeze_fraction: float = 0.5
    ewc_lam: float = 1.0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    oplora_k: int = 32
    gpm_threshold: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"RunConfig: method must be one of {METHODS}, got {self.method!r}")
        cps = list(self.checkpoints)
        if not cps or any((not isinstance(c, int)) or c < 1 for c in cps) or cps != sorted(set(cps)):
            raise ValueError(f"RunConfig: checkpoints must be increasing positive step counts, got {self.checkpoints!r}")
        if not self.lr > 0:
            raise ValueError(f"RunConfig: lr must be > 0, got {self.lr!r}")

    @property
    def label(self) -> str:
        return self.method


@dataclasses.dataclass
class Data:
    """Token windows ([N, T], -1 = padding) the runs use."""
    task_train: torch.Tensor
    task_eval: torch.Tensor
    general_eval: torch.Tensor
    general_replay: torch.Tensor
    general_mc: Optional[list] = None  # lm-eval style items, scored when given
    tokenizer: object = None


def evaluate(model, data: Data) -> Dict[str, float]:
    from forgetkern.eval import mc_accuracy, perplexity

    out = {"task_ppl": perplexity(model, data.task_eval), "general_ppl": perplexity(model, data.general_eval)}
    if data.general_mc:
        out["general_mc"] = mc_accuracy(model, data.tokenizer, data.general_mc)["acc_norm"]
    return out


def _peft_model(base, cfg: RunConfig):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    return get_peft_model(copy.deepcopy(base), lora)


def _stream(data: Data, cfg: RunConfig, steps: int):
    """``steps`` batches of task windows (mixed with general windows for ``replay``), reshuffled each epoch,
    seeded. Each batch carries ``replay_index`` (-1 for task windows) for the MSSR bookkeeping."""
    from forgetkern.data import batch_from_windows, mix_replay

    pool = data.task_train
    if cfg.method == "replay":
        pool = mix_replay(data.task_train, data.general_replay, ratio=cfg.replay_ratio, seed=cfg.seed)
    pad = getattr(data.task_train, "pad_token_id", 0)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(pool.shape[0], generator=g)
    pos = 0
    mssr = None
    if cfg.method == "mssr":
        from forgetkern.replay import MSSR

        mssr = MSSR(data.general_replay.shape[0], replay_ratio=cfg.replay_ratio, seed=cfg.seed)
    for _ in range(steps):
        replay = mssr.select(mssr.slots(cfg.batch_size)) if mssr is not None else torch.zeros(0, dtype=torch.long)
        n = cfg.batch_size - replay.numel()
        if pos + n > order.numel():
            order, pos = torch.randperm(pool.shape[0], generator=g), 0
        rows = torch.cat([pool[order[pos:pos + n]], data.general_replay[replay]])
        batch = batch_from_windows(rows, pad)
        batch["replay_index"] = torch.cat([torch.full((n,), -1, dtype=torch.long), replay])
        yield batch, mssr
        pos += n
        if mssr is not None:
            mssr.tick()


class _Mitigation:
    """What a method adds to the plain LoRA step: the loss, and work after ``backward()`` / after the step."""

    def __init__(self, model, data: Data, cfg: RunConfig, fisher):
        import forgetkern

        self.cfg, self.model, self.reg = cfg, model, None
        m = cfg.method
        if m in ("ewc", "ewc_params"):
            if fisher is None:
                raise ValueError(f"train_and_eval: method {m!r} needs a Fisher (fisher=...): the base weights' "
                                 "for 'ewc', the LoRA factors' for 'ewc_params'")
            self.reg = forgetkern.EWC(model, fisher, lam=cfg.ewc_lam, target="delta_w" if m == "ewc" else "params")
        elif m == "lwf":
            self.reg = forgetkern.LwF(model, alpha=cfg.lwf_alpha, temperature=cfg.lwf_temperature)
        elif m == "oplora":
            self.reg = forgetkern.OPLoRA(model, k=cfg.oplora_k)
            self.reg.project_()
        elif m == "gpm":
            from forgetkern.data import batches

            self.reg = forgetkern.GPM(model, threshold=cfg.gpm_threshold)
            self.reg.update_memory(batches(data.general_replay, 4))
            self.reg.project_params_()

    def loss(self, batch, mssr):
        inputs = {k: v for k, v in batch.items() if k != "replay_index"}
        if self.cfg.method == "lwf":
            return self.reg.loss(inputs)
        out = self.model(**inputs)
        if mssr is not None:
            from forgetkern.replay import per_sample_loss

            r = batch["replay_index"]
            if (r >= 0).any():
                m = r >= 0
                mssr.update(r[m], per_sample_loss(out.logits.detach(), inputs["labels"])[m])
        return out.loss

    def after_backward(self):
        m = self.cfg.method
        if m in ("ewc", "ewc_params"):
            self.reg.apply_()
        elif m == "oplora":
            self.reg.project_grads_()
        elif m == "gpm":
            self.reg.project_()

    def after_step(self):
        if self.cfg.method == "oplora":
            self.reg.project_()
        elif self.cfg.method == "gpm":
            self.reg.project_params_()


def train_and_eval(base: torch.nn.Module, data: Data, cfg: RunConfig, *, fisher=None,
                   on_step: Optional[Callable[[int], None]] = None,
                   on_checkpoint: Optional[Callable[[torch.nn.Module, int], List[Dict]]] = None) -> List[Dict]:
    """Train one run and evaluate at its checkpoints; returns ``[{"steps", "metrics", "seconds"}]``.

    ``fisher`` is what the EWC methods need: the base weights' Fisher (``FisherEstimator(params="lora_base")``
    on general data) for ``ewc`` (the penalty on ``s*B*A``), the LoRA factors' for ``ewc_params``.
    ``on_checkpoint(model, steps)``, if given, runs after each checkpoint's evaluation (e.g. WiSE-FT
    interpolations of the model at that point) and may return more result rows."""
    import forgetkern

    if cfg.method == "full":
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = _peft_model(base, cfg)
        forgetkern.patch(model)
        if cfg.method == "freeze":
            from forgetkern.data import freeze_layers

            freeze_layers(model, cfg.freeze_fraction)
    mit = _Mitigation(model, data, cfg, fisher)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    out, t0, step = [], time.perf_counter(), 0
    model.train()
    cps = list(cfg.checkpoints)
    for batch, mssr in _stream(data, cfg, cps[-1]):
        mit.loss(batch, mssr).backward()
        mit.after_backward()
        opt.step()
        mit.after_step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if on_step is not None:
            on_step(step)
        if step in cps:
            out.append({"steps": step, "metrics": evaluate(model, data), "seconds": time.perf_counter() - t0})
            if on_checkpoint is not None:
                out += on_checkpoint(model, step) or []
            model.train()
    return out
