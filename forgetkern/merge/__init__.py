"""Model merging: task arithmetic, TIES, DARE, DARE-TIES, magnitude prune and WiSE-FT interpolation, over
whole-model state dicts (:func:`merge_models`, :func:`wise_ft`), PEFT LoRA adapters (:func:`merge_lora`) and
safetensors checkpoints streamed tensor by tensor (:func:`merge_safetensors`).

Every path runs the fused op :func:`forgetkern.merge_task_vectors` (one pass over the N task vectors of a
tensor). The DARE mask of a tensor is keyed by ``(seed, crc32(tensor name), task index)`` and the element's
flat index, so the same seed gives the same merge in memory, streamed, sharded or tiled.
"""

from forgetkern.merge.core import merge_models, tensor_id, wise_ft
from forgetkern.merge.lora import merge_lora
from forgetkern.merge.stream import merge_safetensors
from forgetkern.ops.merge_task_vectors import magnitude_thresholds, merge_task_vectors

__all__ = ["merge_models", "wise_ft", "merge_lora", "merge_safetensors", "merge_task_vectors",
           "magnitude_thresholds", "tensor_id"]
