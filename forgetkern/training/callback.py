"""Hugging Face ``Trainer`` integration: measure general ability while training, apply mitigations, stop early.

* :class:`ForgettingCallback` - a ``TrainerCallback``. At the start of training it measures the general set
  (perplexity of ``general`` windows) once; at every evaluation (and at the end) it measures it again, logs
  ``general_ppl`` and ``general_drop`` (relative rise of general perplexity) into the Trainer's log history, and stops
  training when the drop exceeds ``threshold`` (default 5%). With ``ewc=forgetkern.EWC(...)`` it adds the EWC
  gradient before every optimizer step (``EWC.apply_``; after the Trainer's gradient clipping, so the penalty's
  gradient is not clipped) and logs the penalty.
* :class:`ForgettingTrainer` - a ``Trainer`` whose loss is LwF's (``lwf=forgetkern.LwF(...)``) and/or carries the
  differentiable EWC penalty (``ewc=...``, ``ewc_in_loss=True``) when you want it inside the clipped gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from forgetkern.eval import perplexity, relative_drop

STATE_SUBDIR = "forgetkern"  # inside a Trainer checkpoint-N directory


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("forgetkern.training's Trainer integration needs transformers: pip install transformers") from e
    return transformers


def _callback_base():
    return _transformers().TrainerCallback


class ForgettingCallback(_callback_base()):
    """Track (and bound) the general-ability drop of a Trainer run.

    Args:
        general: token windows ``[N, T]`` of general data (see :func:`forgetkern.data.text_windows`).
        threshold: relative general-perplexity drop beyond which training stops (``stop=True``).
        ewc: an optional :class:`forgetkern.EWC` whose gradient is added before every optimizer step.
        stop: whether to stop past the threshold (else only log and flag).
        batch_size: evaluation batch size.
        state: ``{name: object}`` of forgetkern state to checkpoint with the Trainer (the ``ewc`` is included
            as ``"ewc"`` by default; add e.g. ``{"fisher": estimator, "oplora": oplora}``): every Trainer save
            writes it (:func:`forgetkern.save_state`) into ``<checkpoint-N>/forgetkern``, and a run resumed
            from ``checkpoint-N`` (``trainer.train(resume_from_checkpoint=...)``) loads it back at the start.

    After training, :attr:`history` lists ``{"step", "general_ppl", "general_drop"}`` and :attr:`stopped_at`
    the step at which the threshold stopped the run (``None`` if it did not).
    """

    def __init__(self, general: torch.Tensor, *, threshold: float = 0.05, ewc=None, stop: bool = True,
                 batch_size: int = 8, state: Optional[dict] = None):
        if not isinstance(general, torch.Tensor) or general.dim() != 2:
            raise ValueError("ForgettingCallback: general must be token windows [N, T] (forgetkern.data.text_windows)")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"ForgettingCallback: threshold must be in (0, 1), got {threshold!r}")
        self.general, self.threshold, self.ewc, self.stop = general, threshold, ewc, stop
        self.batch_size = batch_size
        self.baseline: Optional[float] = None
        self.history: list = []
        self.stopped_at: Optional[int] = None
        self._model = None
        self._last_penalty = None
        self.state_objects = dict(state or {})
        if ewc is not None:
            self.state_objects.setdefault("ewc", ewc)
        self.resumed_from: Optional[str] = None

    def _state_dir(self, args, step: int) -> str:
        import os

        return os.path.join(args.output_dir, f"checkpoint-{step}", STATE_SUBDIR)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model
        if self.state_objects and state.global_step > 0:  # the Trainer restored checkpoint-<global_step>
            import os

            from forgetkern.checkpoint import load_state

            d = self._state_dir(args, state.global_step)
            if os.path.isdir(d):
                load_state(d, **self.state_objects)
                self.resumed_from = d
        if self.baseline is None:
            self.baseline = perplexity(model, self.general, batch_size=self.batch_size)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.state_objects:
            from forgetkern.checkpoint import save_state

            save_state(self._state_dir(args, state.global_step), **self.state_objects)
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.ewc is not None:
            self._last_penalty = self.ewc.apply_()
        return control

    def _measure(self, state, control):
        ppl = perplexity(self._model, self.general, batch_size=self.batch_size)
        drop = relative_drop(self.baseline, ppl)
        self.history.append({"step": state.global_step, "general_ppl": ppl, "general_drop": drop})
        if drop > self.threshold and self.stop and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_training_stop = True
        return ppl, drop

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        ppl, drop = self._measure(state, control)
        if metrics is not None:
            metrics["general_ppl"], metrics["general_drop"] = ppl, drop
        # the Trainer logged the evaluation before calling back: add the general numbers to that entry
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step and any(k.startswith("eval_") for k in entry):
            entry["general_ppl"], entry["general_drop"] = ppl, drop
        else:
            state.log_history.append({"step": state.global_step, "general_ppl": ppl, "general_drop": drop})
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._last_penalty is not None:
            logs["ewc_penalty"] = float(self._last_penalty)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if not self.history or self.history[-1]["step"] != state.global_step:
            self._measure(state, control)
        return control


class ForgettingTrainer(_transformers().Trainer):
    """A ``transformers.Trainer`` whose training loss is LwF's (``lwf=``) and/or includes the EWC penalty
    (``ewc=``, differentiable, so it is clipped with the task gradient). Evaluation losses stay the plain task
    loss."""

    def __init__(self, *args, lwf=None, ewc=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lwf, self.ewc = lwf, ewc

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        if not model.training or (self.lwf is None and self.ewc is None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.lwf is not None:
            if return_outputs:
                raise ValueError("ForgettingTrainer: return_outputs=True is not available with lwf (the fused loss "
                                 "does not build the logits)")
            loss = self.lwf.loss(inputs)
        else:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            loss = out[0] if return_outputs else out
        if self.ewc is not None:
            loss = loss + self.ewc.penalty()
        return (loss, None) if return_outputs else loss
