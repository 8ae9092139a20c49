"""Fisher information estimation for EWC-style regularisation.

* :class:`FisherEstimator` - diagonal Fisher of chosen parameters (LoRA factors or all trainable weights) over
  a dataloader, per sample (fused kernels for Linear layers), per token, or per batch, with empirical or
  model-sampled labels; plus the EWC++ / RWalk EMA from training gradients (:meth:`FisherEstimator.update_from_grads`).
"""

from forgetkern.fisher.estimator import Fisher, FisherEstimator, select_params

__all__ = ["Fisher", "FisherEstimator", "select_params"]
