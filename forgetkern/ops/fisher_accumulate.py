"""``fisher_accumulate_``: update diagonal Fisher estimates from gradients, over a whole list in one pass.

Math, per element, for each pair ``(F, g)`` of the lists (one multi-tensor launch per dtype group)::

    F <- decay * F + scale * g^2

* ``decay=1, scale=1/n`` sums an empirical Fisher over ``n`` batches; ``decay=0.9, scale=0.1`` is the EMA
  Fisher of EWC++ / RWalk, fed from the gradients the training step already computed.
* Math in float32 (float64 for float64 state); fp16/bf16 gradients are upcast before squaring, so an fp16
  gradient can never overflow the accumulator (65504^2 ~ 4.3e9 fits float32 easily).
* State may be float32, bfloat16 (half the memory; rounded once per update) or float64. float16 state is
  refused: its range (6.5e4) overflows for gradients above ~256.
* Non-finite values never poison the Fisher: an element whose gradient is inf or nan, or whose update
  overflows (a finite fp32 gradient of 1e20 squares to inf), is left unchanged (not decayed, not added to), and the op returns a 0-dim float32 tensor, on the device, that is 1.0 if any
  such element was seen (the found-inf flag of PyTorch's fused Adam / GradScaler; no host sync). Check it when
  convenient, e.g. ``if found.item(): warn(...)``, or feed it to your own skip logic.
"""

from __future__ import annotations

from typing import List

import torch

from forgetkern import _backend, _ext, _validate
from forgetkern.reference import fisher_accumulate as reference

OP = _backend.register_op("fisher_accumulate_")


def _triton():
    from forgetkern.triton import fisher_accumulate

    return fisher_accumulate


KERNELS = _backend.Kernels(
    OP,
    torch=lambda: reference.fisher_accumulate_,
    cpp=lambda: _ext.cpu_ops().fisher_accumulate_,
    cuda=lambda: _ext.cuda_ops().fisher_accumulate_,
    triton=lambda: _triton().fisher_accumulate_,
)


@torch.library.custom_op("forgetkern::fisher_accumulate_", mutates_args=("fishers",))
def _fisher_accumulate_op(fishers: List[torch.Tensor], grads: List[torch.Tensor], decay: float,
                          scale: float) -> torch.Tensor:
    return KERNELS(fishers[0].device)(fishers, grads, decay, scale)


@_fisher_accumulate_op.register_fake
def _(fishers, grads, decay, scale):
    return fishers[0].new_empty((), dtype=torch.float32)


def fisher_accumulate_(fishers, grads, *, decay: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """In place, for every pair of the lists: ``F <- decay * F + scale * g**2`` (see the module docstring).

    Args:
        fishers: list of Fisher state tensors (float32, bfloat16 or float64), updated in place.
        grads: list of gradients (float32, float16, bfloat16 or float64), same shapes, same device.
        decay: factor on the old state, >= 0 (1.0 to sum, e.g. 0.9 for an exponential moving average).
        scale: factor on the squared gradient, >= 0 (e.g. ``1/num_batches``, or ``1 - decay`` for an EMA).

    Returns:
        0-dim float32 tensor on the tensors' device: 1.0 if some element was skipped (its gradient or its
        update was not finite), else 0.0.

    Raises:
        ValueError: negative ``decay``/``scale``; a Fisher that requires grad; tensors sharing memory with a
        Fisher (``fishers=[F, F]``, or a gradient that aliases a Fisher).
    """
    fishers = _validate.tensor_list(OP, "fishers", fishers)
    grads = _validate.tensor_list(OP, "grads", grads)
    decay = _validate.check_nonnegative(OP, "decay", decay)
    scale = _validate.check_nonnegative(OP, "scale", scale)
    device = _validate.check_tensor_lists(OP, [
        ("fishers", fishers, _validate.STATE_DTYPES),
        ("grads", grads, _validate.FLOAT_DTYPES),
    ])
    _validate.no_grad_state(OP, "fishers", fishers)
    _validate.no_overlap(OP, [("fishers", fishers)], [("grads", grads)])
    if not fishers:
        return torch.zeros((), dtype=torch.float32, device=device)
    return _fisher_accumulate_op(fishers, [g.detach() for g in grads], decay, scale)
