"""LoRA fine-tuning with EWC under accelerate: the Fisher is estimated on each process's share of the old data
and all-reduced once, the EWC gradient is fused into forgetkern's AdamW, forgetkern state is checkpointed per run.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_lora_ewc.py   # 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 examples/accelerate_lora_ewc.py                         # the same, no accelerate
    accelerate launch --num_processes 8 examples/accelerate_lora_ewc.py                 # 8 GPUs (NCCL), same code

Several CPU processes come from ``--multi_gpu`` on a machine without a visible GPU (or with
``CUDA_VISIBLE_DEVICES=``): it selects accelerate's torch.distributed.run launcher, and ``Accelerator(cpu=True)``
in each rank joins the gloo group that launcher sets up. ``--cpu`` does not: accelerate 1.16 starts several CPU
processes only through mpirun with a hostfile (``--mpirun_hostfile``), and a single process without one. The
losses and penalties printed are those of one process on the global batch: the run is the same at any process
count (tests/test_accelerate_launch.py checks 2 processes against 1).
"""

import os
import sys
import tempfile

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

import forgetkern
from forgetkern.testing.models import tiny_llama


def batches(n, seed, rows=4, seq=16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 128, (rows, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def main(steps: int = 6) -> None:
    acc = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                    init_lora_weights=False))
    forgetkern.patch(model)
    model.to(acc.device)
    # old-task Fisher: every process takes its share of the old data; estimate() all-reduces once at the end
    old = batches(8, seed=1)[acc.process_index::acc.num_processes]
    fisher = forgetkern.FisherEstimator(model, params="lora").estimate(old, progress=False)
    ewc = forgetkern.EWC(model, fisher, lam=1.0)
    opt = forgetkern.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, ewc=ewc)
    ddp_model, opt = acc.prepare(model, opt)
    new = batches(steps, seed=2)
    for step, batch in enumerate(new):
        local = {k: v.chunk(acc.num_processes)[acc.process_index].to(acc.device) for k, v in batch.items()}
        loss = ddp_model(**local).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        pen = opt.optimizer.last_ewc_penalty if hasattr(opt, "optimizer") else opt.last_ewc_penalty
        total = acc.reduce(loss.detach(), reduction="mean")
        if acc.is_main_process:
            print(f"step {step}: loss {float(total):.6f}  ewc penalty {float(pen):.6e}")
    ckpt = os.environ.get("CKPT_DIR") or tempfile.mkdtemp()
    forgetkern.save_state(os.path.join(ckpt, "forgetkern"), ewc=ewc, opt=opt.optimizer if hasattr(opt, "optimizer")
                          else opt)
    acc.wait_for_everyone()
    if acc.is_main_process:
        print(f"processes: {acc.num_processes}, fisher tokens (all ranks): {fisher.num_tokens}, saved to {ckpt}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
