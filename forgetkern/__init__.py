"""forgetkern: fused kernels for forgetting-safe fine-tuning (LoRA, Fisher, EWC).

Public API (optional dependencies such as triton, transformers and peft are imported lazily)::

    forgetkern.patch(peft_model) / forgetkern.unpatch(peft_model)          # fused LoRA layers, undoable
    forgetkern.lora_linear(x, W, b, [LoraAdapter(A, B, s, p)], training=)  # the op behind the patch
    forgetkern.fisher_accumulate_(fishers, grads, decay=1.0, scale=1.0)     # F <- decay F + scale g^2
    forgetkern.FisherEstimator(model, labels=, granularity=).estimate(dl)   # per-sample / sampled Fisher
    forgetkern.linear_persample_sq_grad_(F, x, grad_out)                    # F += sum_n (sum_t g x^T)^2
    forgetkern.ewc_penalty_and_grad_(params, anchors, fishers, lam=, grads=) # penalty, grads += lam F d
    forgetkern.ewc_penalty(params, anchors, fishers, lam)                   # differentiable penalty
    forgetkern.EWC(model, fisher, lam=, target="params" | "delta_w")       # .penalty() / .apply_()
    forgetkern.lwf_loss(h_student, h_teacher, W_head, labels, alpha=, temperature=)  # chunked CE + KL
    forgetkern.LwF(peft_model, alpha=, temperature=).loss(batch)            # LwF, teacher = adapters disabled
    forgetkern.ewc_delta_w(As, Bs, fishers, scaling=, lam=)                 # EWC of LoRA updates s B A
    forgetkern.ewc_delta_w_and_grad_(As, Bs, fishers, scaling=, lam=, grads_a=, grads_b=)
    forgetkern.optim.AdamW(params, lr=, ewc=ewc)                           # AdamW with the EWC gradient fused in
    forgetkern.adamw_ewc_(params, grads, exp_avgs, exp_avg_sqs, ..., lam=)  # the op behind it
    forgetkern.olora_loss(past_A, cur_A, norm="l1" | "fro2")               # O-LoRA orthogonality loss, all layers
    forgetkern.project_out_(tensors, bases, side="left" | "right")          # X -= U U^T X / X V V^T, all layers
    forgetkern.OLoRA / OPLoRA / GPM(peft_model, ...)                        # .loss() / .project_() / .new_task()
    forgetkern.merge_models / merge_lora / merge_safetensors / wise_ft      # task arithmetic, TIES, DARE, WiSE-FT
    forgetkern.MSSR(n_replay, replay_ratio=)                                # memory-strength scheduled replay
    forgetkern.save_state(path, ewc=..., opt=...) / load_state(path, ...)  # safetensors checkpoints, per rank
    forgetkern.use_backend("torch" | "cpp" | "cuda" | "triton" | "auto")    # context manager

Measuring forgetting: ``forgetkern.eval`` (perplexity, multiple choice, BWT, ``ForgettingReport``), data helpers
in ``forgetkern.data`` (``text_windows``, ``mix_replay``, ``freeze_layers``), small offline sets in
``forgetkern.corpora``, the HF Trainer callback in ``forgetkern.training``.
"""

from forgetkern._backend import BackendError, use_backend
from forgetkern._ext import ForgetkernBuildWarning
from forgetkern._version import __version__
from forgetkern.ewc import EWC
from forgetkern.fisher import Fisher, FisherEstimator
from forgetkern.ops.ewc_delta_w import ewc_delta_w, ewc_delta_w_and_grad_
from forgetkern.ops.ewc_penalty import ewc_penalty, ewc_penalty_and_grad_
from forgetkern.ops.fisher_accumulate import fisher_accumulate_
from forgetkern.ops.linear_persample_sq_grad import (
    bias_persample_sq_grad_,
    linear_persample_sq_grad_,
    lora_persample_sq_grad_,
)
from forgetkern.ops.lwf_loss import LwfLoss, lwf_loss
from forgetkern.ops.olora_loss import olora_loss
from forgetkern.ops.project_out import project_out_
from forgetkern.ops.lora_linear import LoraAdapter, LoraFisher, lora_linear, lora_linear_siblings
from forgetkern.projection import GPM, OLoRA, OPLoRA
from forgetkern.patching import PatchReport, is_patched, patch, unpatch
from forgetkern.training.lwf import LwF
from forgetkern.ops.adamw_ewc import adamw_ewc_
from forgetkern import optim
from forgetkern.replay import MSSR
from forgetkern.merge import merge_lora, merge_models, merge_safetensors, merge_task_vectors, wise_ft
from forgetkern import checkpoint
from forgetkern.checkpoint import load_state, save_state

__all__ = [
    "__version__",
    "BackendError",
    "ForgetkernBuildWarning",
    "use_backend",
    "patch",
    "unpatch",
    "is_patched",
    "PatchReport",
    "LoraAdapter",
    "LoraFisher",
    "lora_linear",
    "lora_linear_siblings",
    "fisher_accumulate_",
    "Fisher",
    "FisherEstimator",
    "EWC",
    "linear_persample_sq_grad_",
    "bias_persample_sq_grad_",
    "lora_persample_sq_grad_",
    "ewc_penalty",
    "ewc_penalty_and_grad_",
    "lwf_loss",
    "LwfLoss",
    "LwF",
    "ewc_delta_w",
    "ewc_delta_w_and_grad_",
    "olora_loss",
    "project_out_",
    "OLoRA",
    "OPLoRA",
    "GPM",
    "adamw_ewc_",
    "optim",
    "merge_task_vectors",
    "merge_models",
    "merge_lora",
    "merge_safetensors",
    "wise_ft",
    "MSSR",
    "checkpoint",
    "save_state",
    "load_state",
]
