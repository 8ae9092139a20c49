"""Replay schedulers: :class:`MSSR` (memory-strength scheduled, weakest-first replay) and its batch sampler."""

from forgetkern.replay.mssr import MSSR, MSSRBatchSampler, MSSRDataset, per_sample_loss

__all__ = ["MSSR", "MSSRBatchSampler", "MSSRDataset", "per_sample_loss"]
