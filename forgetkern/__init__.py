"""forgetkern: fused kernels for forgetting-safe fine-tuning (LoRA, Fisher, EWC, orthogonal projections).

Public API (optional dependencies such as triton, transformers and peft are imported lazily)::

    forgetkern.fisher_accumulate_(fishers, grads, decay=1.0, scale=1.0)     # F <- decay F + scale g^2
    forgetkern.ewc_penalty_and_grad_(params, anchors, fishers, lam=, grads=) # penalty, grads += lam F d
    forgetkern.ewc_penalty(params, anchors, fishers, lam)                   # differentiable penalty
    forgetkern.use_backend("torch" | "cpp" | "cuda" | "triton" | "auto")    # context manager
"""

from forgetkern._backend import BackendError, use_backend
from forgetkern._version import __version__
from forgetkern.ops.ewc_penalty import ewc_penalty, ewc_penalty_and_grad_
from forgetkern.ops.fisher_accumulate import fisher_accumulate_

__all__ = [
    "__version__",
    "BackendError",
    "use_backend",
    "fisher_accumulate_",
    "ewc_penalty",
    "ewc_penalty_and_grad_",
]
