"""Training with mitigations: LwF, the HF Trainer callback and trainer, and the runs behind ``forgetkern demo``.

``ForgettingCallback`` and ``ForgettingTrainer`` import transformers, so they load on first use.
"""

from forgetkern.training.lwf import LwF


def __getattr__(name):
    if name in ("ForgettingCallback", "ForgettingTrainer"):
        from forgetkern.training import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'forgetkern.training' has no attribute {name!r}")


__all__ = ["LwF", "ForgettingCallback", "ForgettingTrainer"]
