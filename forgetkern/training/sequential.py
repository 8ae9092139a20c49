"""Sequential fine-tuning - task A, then task B, ... - and what each method keeps of the earlier tasks.

A :class:`SeqConfig` names a method, a learning rate, the steps per task and a seed; :func:`train_sequence`
copies the base model, adds a LoRA adapter, patches it and trains on the tasks in order (a fresh AdamW per
task), evaluating every task and the general sets after each one. The methods:

* ``naive``  - one adapter trained on each task in turn;
* ``replay`` - the same, with a share of every batch of task ``i`` (``round(replay_ratio * batch_size)`` rows)
  drawn uniformly from the training windows of tasks ``0..i-1``;
* ``mssr``   - the same replay budget, row for row, given by :class:`forgetkern.replay.MSSR` (weakest memory
  first, ``fill="weakest"``): adaptive replay against uniform replay at an equal replay-token budget;
* ``olora``  - O-LoRA (:class:`forgetkern.OLoRA`): the adapter of task ``i`` kept orthogonal to the ``A``
  rows of the earlier tasks' adapters, each merged into the base when its task ends;
* ``merge``  - one adapter per task, each trained from the base model alone, then merged by
  :func:`forgetkern.merge_lora` (each of ``merge_methods``: task arithmetic, TIES, ...): no sequence at all,
  the multi-task model assembled in weight space.

Rows: ``{"stage": i, "task": name, "metrics": {...}, "seconds"}`` after task ``i`` (for ``merge``: stage ``i``
is task ``i``'s adapter alone, then one row per merge method with ``"merge": method`` and ``stage = T - 1``).
Metrics: ``"task:<name>"`` (perplexity on each task's held-out windows), ``general_ppl`` and, when the data
has multiple-choice items, ``general_mc`` (acc_norm). :func:`matrix` turns rows into the accuracy matrix
``R[i][j]`` (task ``j``'s relative perplexity gain after task ``i``) that ``forgetkern.eval``'s ACC / BWT /
forgetting take.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

SEQ_METHODS = ("naive", "replay", "mssr", "olora", "merge")


@dataclasses.dataclass
class Task:
    """One task of the sequence: its name and token windows ([N, T], -1 = padding) to train on and to evaluate."""
    name: str
    train: torch.Tensor
    eval: torch.Tensor


@dataclasses.dataclass
class SeqData:
    tasks: Sequence[Task]
    general_eval: torch.Tensor
    general_mc: Optional[list] = None  # lm-eval style items, scored when given
    tokenizer: object = None

    def __post_init__(self):
        names = [t.name for t in self.tasks]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"SeqData: tasks must be at least two tasks with distinct names, got {names}")


@dataclasses.dataclass
class SeqConfig:
    method: str
    lr: float
    steps: int                     # training steps per task
    seed: int = 0
    batch_size: int = 4
    rank: int = 16
    alpha: float = 32.0
    replay_ratio: float = 0.25
    olora_lam: float = 0.5
    merge_methods: Sequence[str] = ("task_arithmetic", "ties")
    merge_density: float = 0.5     # TIES / DARE / magnitude-prune density

    def __post_init__(self):
        if self.method not in SEQ_METHODS:
            raise ValueError(f"SeqConfig: method must be one of {SEQ_METHODS}, got {self.method!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SeqConfig: steps must be a positive int (steps per task), got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"SeqConfig: lr must be > 0, got {self.lr!r}")
        if self.method in ("replay", "mssr") and not (0 < round(self.replay_ratio * self.batch_size) < self.batch_size):
            raise ValueError(f"SeqConfig: replay_ratio={self.replay_ratio} gives "
                             f"{round(self.replay_ratio * self.batch_size)} replay rows of a batch of "
                             f"{self.batch_size}; choose it so that 0 < round(replay_ratio * batch_size) < batch_size")


def evaluate_tasks(model, data: SeqData) -> Dict[str, float]:
    from forgetkern.eval import mc_accuracy, perplexity

    out = {f"task:{t.name}": perplexity(model, t.eval) for t in data.tasks}
    out["general_ppl"] = perplexity(model, data.general_eval)
    if data.general_mc:
        out["general_mc"] = mc_accuracy(model, data.tokenizer, data.general_mc)["acc_norm"]
    return out


def _lora_config(cfg: SeqConfig):
    from peft import LoraConfig

    from forgetkern.training.runs import LORA_TARGETS

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))


def _adapter(base, cfg: SeqConfig, init_seed: int):
    from peft import get_peft_model

    import forgetkern

    torch.manual_seed(init_seed)
    model = get_peft_model(copy.deepcopy(base), _lora_config(cfg))
    forgetkern.patch(model)
    return model


class _Replay:
    """The replay rows of each batch of one task: ``k`` rows of the earlier tasks' windows, uniform or MSSR."""

    def __init__(self, memory: torch.Tensor, cfg: SeqConfig, stage: int):
        from forgetkern.replay import MSSR

        self.memory, self.k = memory, int(round(cfg.replay_ratio * cfg.batch_size))
        self.g = torch.Generator().manual_seed(cfg.seed * 1000 + stage)
        self.mssr = MSSR(memory.shape[0], replay_ratio=cfg.replay_ratio, fill="weakest",
                         seed=cfg.seed * 1000 + stage) if cfg.method == "mssr" else None
        self.rows = 0

    def pick(self) -> torch.Tensor:
        if self.mssr is not None:
            idx = self.mssr.select(self.k)
        else:
            idx = torch.randint(self.memory.shape[0], (self.k,), generator=self.g)
        self.rows += idx.numel()
        return idx

    def update(self, idx: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if self.mssr is not None:
            from forgetkern.replay import per_sample_loss

            self.mssr.update(idx, per_sample_loss(logits.detach(), labels))
            self.mssr.tick()


def _train_task(model, task: Task, cfg: SeqConfig, stage: int, *, replay: Optional[_Replay] = None,
                extra_loss: Optional[Callable[[], torch.Tensor]] = None,
                on_step: Optional[Callable[[int], None]] = None) -> None:
    """``cfg.steps`` AdamW steps on ``task`` (its windows reshuffled each epoch, seeded), a fresh optimizer."""
    from forgetkern.data import batch_from_windows

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + stage)
    order, pos = torch.randperm(task.train.shape[0], generator=g), 0
    k = replay.k if replay is not None else 0
    n = cfg.batch_size - k
    model.train()
    for step in range(cfg.steps):
        if pos + n > order.numel():
            order, pos = torch.randperm(task.train.shape[0], generator=g), 0
        rows = task.train[order[pos:pos + n]]
        pos += n
        idx = None
        if replay is not None:
            idx = replay.pick()
            rows = torch.cat([rows, replay.memory[idx]])
        batch = batch_from_windows(rows, 0)
        out = model(**batch)
        loss = out.loss if extra_loss is None else out.loss + extra_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if replay is not None:
            replay.update(idx, out.logits[n:], batch["labels"][n:])
        if on_step is not None:
            on_step(1)


def _row(stage: int, task: Task, model, data: SeqData, t0: float, **extra) -> Dict:
    return {"stage": stage, "task": task.name, "metrics": evaluate_tasks(model, data),
            "seconds": time.perf_counter() - t0, **extra}


def _merge_rows(base, data: SeqData, cfg: SeqConfig, t0: float, on_step) -> List[Dict]:
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    import forgetkern

    rows, states = [], []
    for i, task in enumerate(data.tasks):
        model = _adapter(base, cfg, cfg.seed * 1000 + i)
        _train_task(model, task, cfg, i, on_step=on_step)
        rows.append(_row(i, task, model, data, t0))
        forgetkern.unpatch(model)
        states.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
        del model
    names = [f"task{i}" for i in range(len(data.tasks))]
    for method in cfg.merge_methods:
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), _lora_config(cfg), adapter_name=names[0])
        for name, sd in zip(names, states):
            if name != names[0]:
                model.add_adapter(name, _lora_config(cfg))
            set_peft_model_state_dict(model, sd, adapter_name=name)
        kw = {"density": cfg.merge_density} if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else {}
        forgetkern.merge_lora(model, names, method=method, output="weight", apply_to_base=True, seed=cfg.seed, **kw)
        with model.disable_adapter():
            rows.append(_row(len(data.tasks) - 1, data.tasks[-1], model, data, t0, merge=method))
        del model
    return rows


def train_sequence(base: torch.nn.Module, data: SeqData, cfg: SeqConfig, *,
                   on_step: Optional[Callable[[int], None]] = None) -> List[Dict]:
    """Train the tasks of ``data`` in order with ``cfg.method``; the evaluation rows (module docstring).
    ``on_step(n)`` is called after every ``n`` training steps (progress bars)."""
    t0 = time.perf_counter()
    if cfg.method == "merge":
        return _merge_rows(base, data, cfg, t0, on_step)
    import forgetkern

    model = _adapter(base, cfg, cfg.seed)
    olora = forgetkern.OLoRA(model, lam=cfg.olora_lam) if cfg.method == "olora" else None
    rows = []
    for i, task in enumerate(data.tasks):
        replay = None
        if cfg.method in ("replay", "mssr") and i > 0:
            replay = _Replay(torch.cat([t.train for t in data.tasks[:i]]), cfg, i)
        _train_task(model, task, cfg, i, replay=replay, extra_loss=olora.loss if olora is not None else None,
                    on_step=on_step)
        extra = {"replay_rows": replay.rows} if replay is not None else {}
        rows.append(_row(i, task, model, data, t0, **extra))
        if olora is not None and i + 1 < len(data.tasks):
            olora.new_task()
    return rows


def matrix(rows: Sequence[Dict], before: Dict[str, float], tasks: Sequence[str]) -> List[List[float]]:
    """``R[i][j] = 1 - ppl_j(after task i) / ppl_j(before)`` from one run's stage rows (the last row of each
    stage: for ``merge``, pass the per-task rows and one merge row)."""
    by_stage: Dict[int, Dict] = {}
    for r in rows:
        by_stage[r["stage"]] = r
    if sorted(by_stage) != list(range(len(tasks))):
        raise ValueError(f"matrix: rows must cover stages 0..{len(tasks) - 1}, got {sorted(by_stage)}")
    return [[1.0 - by_stage[i]["metrics"][f"task:{t}"] / before[f"task:{t}"] for t in tasks]
            for i in range(len(tasks))]
