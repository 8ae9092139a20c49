"""``forgetkern.LwF``: Learning without Forgetting on a PEFT model, with the free teacher.

The teacher is the same PEFT model with its adapters disabled (``model.disable_adapter()``): the base model the
adapter started from, with no copy of the weights (TRL does the same for DPO references). Its forward runs under
``torch.no_grad``; the student's is the ordinary one. Both stop at the final hidden states: the LM head, the
cross-entropy and the distillation term are one chunked op (:func:`forgetkern.lwf_loss`), so the full-vocabulary
logits of teacher and student are never both materialised.

    lwf = forgetkern.LwF(peft_model, alpha=1.0, temperature=2.0)
    loss = lwf.loss(batch)          # batch: input_ids, attention_mask, labels (HF causal-LM conventions)
    loss.backward()
"""

from __future__ import annotations

import contextlib
from typing import Dict, Mapping, Optional

import torch

from forgetkern.ops.lwf_loss import lwf_loss


def _backbone_and_head(model):
    base = model.get_base_model()
    prefix = getattr(base, "base_model_prefix", "model")
    backbone = getattr(base, prefix, None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if backbone is None or head is None or not hasattr(head, "weight"):
        raise ValueError(f"LwF: cannot find the backbone ({prefix!r}) and LM head of {type(base).__name__}; "
                         f"LwF needs a Hugging Face causal LM")
    return backbone, head


class LwF:
    """Learning without Forgetting: ``loss = ce_weight * CE + alpha * T^2 * KL(teacher^T || student^T)``.

    Args:
        model: a PEFT model (``peft.PeftModel``) with an active adapter; patched or not.
        alpha: distillation weight (>= 0); 0 gives plain fine-tuning.
        temperature: softmax temperature ``T`` (> 0) of both distributions.
        ce_weight: weight of the task cross-entropy.
        chunk_size: rows of logits computed at a time by the fused head.

    The distillation covers the positions whose label counts (``labels != -100`` after the causal shift), the
    same positions as the cross-entropy. :attr:`last` holds the detached ``ce`` and ``kl`` of the last call.
    """

    def __init__(self, model: torch.nn.Module, *, alpha: float = 1.0, temperature: float = 2.0,
                 ce_weight: float = 1.0, chunk_size: int = 256):
        if not hasattr(model, "disable_adapter") or not hasattr(model, "get_base_model"):
            raise TypeError(f"LwF: model must be a peft.PeftModel (its teacher is the model with adapters disabled), "
                            f"got {type(model).__name__}")
        for name, v, ok in (("alpha", alpha, alpha >= 0), ("temperature", temperature, temperature > 0),
                            ("ce_weight", ce_weight, ce_weight >= 0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok:
                raise ValueError(f"LwF: {name} must be a float {'> 0' if name == 'temperature' else '>= 0'}, got {v!r}")
        self.model = model
        self.alpha, self.temperature, self.ce_weight = float(alpha), float(temperature), float(ce_weight)
        self.chunk_size = chunk_size
        self.backbone, self.head = _backbone_and_head(model)
        self.last: Dict[str, torch.Tensor] = {}

    def teacher_hidden(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Final hidden states of the base model (adapters disabled), without autograd."""
        with torch.no_grad(), self.model.disable_adapter():
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The LwF loss of a causal-LM batch (``input_ids``, optional ``attention_mask``, optional ``labels``,
        default ``input_ids``; ``-100`` = not counted), labels shifted by one as HF's loss does."""
        if "input_ids" not in batch:
            raise ValueError("LwF.loss: batch needs 'input_ids'")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = ids if mask is None else torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        h_t = self.teacher_hidden(ids, mask)
        h_s = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        out = lwf_loss(h_s[:, :-1], h_t[:, :-1], self.head.weight, labels[:, 1:].contiguous(),
                       bias=getattr(self.head, "bias", None), alpha=self.alpha, temperature=self.temperature,
                       ce_weight=self.ce_weight, chunk_size=self.chunk_size)
        self.last = {"ce": out.ce, "kl": out.kl}
        return out.loss
