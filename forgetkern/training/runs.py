"""One fine-tuning run with the chosen mitigations, evaluated at step checkpoints: the engine of ``forgetkern demo``.

A :class:`RunConfig` names a method (``naive``, ``full``, ``replay``, ``freeze``, ``ewc``, ``lwf``; mitigations
combine), a learning rate, checkpoints (step counts) and a seed. :func:`train_and_eval` copies the base model,
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
METHODS = ("naive", "full", "replay", "freeze", "ewc", "lwf")


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
    """``steps`` batches: task windows (mixed with replay for ``replay``), reshuffled each epoch, seeded."""
    from forgetkern.data import batch_from_windows, mix_replay

    pool = data.task_train
    if cfg.method == "replay":
        pool = mix_replay(data.task_train, data.general_replay, ratio=cfg.replay_ratio, seed=cfg.seed)
    pad = getattr(data.task_train, "pad_token_id", 0)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(pool.shape[0], generator=g)
    pos = 0
    for _ in range(steps):
        if pos + cfg.batch_size > order.numel():
            order, pos = torch.randperm(pool.shape[0], generator=g), 0
        yield batch_from_windows(pool[order[pos:pos + cfg.batch_size]], pad)
        pos += cfg.batch_size


def train_and_eval(base: torch.nn.Module, data: Data, cfg: RunConfig, *, fisher=None,
                   on_step: Optional[Callable[[int], None]] = None) -> List[Dict]:
    """Train one run and evaluate at its checkpoints; returns ``[{"steps", "metrics", "seconds"}]``.

    ``fisher`` is the base weights' Fisher (``FisherEstimator(params="lora_base")`` on general data) that the
    ``ewc`` method needs."""
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
    reg = None
    if cfg.method == "ewc":
        if fisher is None:
            raise ValueError("train_and_eval: method 'ewc' needs the base weights' Fisher (fisher=...)")
        reg = forgetkern.EWC(model, fisher, lam=cfg.ewc_lam, target="delta_w")
    if cfg.method == "lwf":
        reg = forgetkern.LwF(model, alpha=cfg.lwf_alpha, temperature=cfg.lwf_temperature)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    out, t0, step = [], time.perf_counter(), 0
    model.train()
    cps = list(cfg.checkpoints)
    for batch in _stream(data, cfg, cps[-1]):
        if cfg.method == "lwf":
            loss = reg.loss(batch)
        else:
            loss = model(**batch).loss
        loss.backward()
        if cfg.method == "ewc":
            reg.apply_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if on_step is not None:
            on_step(step)
        if step in cps:
            out.append({"steps": step, "metrics": evaluate(model, data), "seconds": time.perf_counter() - t0})
            model.train()
    return out
