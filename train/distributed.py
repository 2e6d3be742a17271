"""Training on several processes (GPUs), through accelerate; one process is rank 0 of 1.

    mmagent train RECIPE --gpus 2            (= accelerate launch --multi_gpu --num_processes 2 -m mmagent train RECIPE)

What keeps a run the same on any number of processes:
- Every rank reads the same global step (the stream's examples are a function of seed and position) and takes
  its contiguous share of each micro-batch; `train.batch_size` is the global micro-batch.
- The loss is summed over answer tokens and divided by the step's global token count, so the DDP-averaged
  gradient is the same gradient one process computes on the whole step.
- Weights and optimizer state are replicated (DDP), so rank 0's checkpoint is the whole state, in the layout a
  single process writes: a run resumes on any number of processes at the step and example it stopped at.
- Rank 0 alone writes the run directory (lock, recipe.json, metrics, checkpoints, adapters, report).
- With CUDA graphs (`train.cuda_graphs`) no DDP wrapper: its all-reduce hooks cannot run inside a captured
  backward. Rank 0's trained weights are broadcast once, and after a step's micro-batches the gradients are
  averaged in one all-reduce of a flat buffer (`Ranks(manual=True)`, `average_grads`). A LoRA's gradients
  are a few MB, so not overlapping that all-reduce with the backward costs little.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from contextlib import nullcontext

import torch


class Ranks:
    """This process among the training processes (torchrun/accelerate environment variables)."""

    def __init__(self, find_unused: bool = False, manual: bool = False):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = None
        self.manual = manual and self.world > 1  # gradients averaged by average_grads, not by DDP hooks
        if self.world > 1:
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs
            # broadcast_buffers off: no buffer is trained, so none needs re-sending each forward;
            # find_unused for full fine-tuning, where a trained part may sit out a forward
            ddp = DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=find_unused)
            # no GPU: gloo on CPU processes (what CI tests the distributed logic with)
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
            self.rank, self.device = self.accelerator.process_index, self.accelerator.device
        else:
            self.rank = 0
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(f"`train.batch_size` = {batch_size} does not split over {self.world} processes: "
                             f"it is the global micro-batch, each process takes batch_size/{self.world}; set it to "
                             f"a multiple of {self.world}")

    def share(self, items: list) -> list:
        """This rank's contiguous share of a global micro-batch."""
        n = len(items) // self.world
        return items[self.rank * n:(self.rank + 1) * n]

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP (accelerate's prepare_model) on several processes; the module itself on one, or with
        manual gradient averaging (then every rank starts from rank 0's trained weights, as DDP does)."""
        if self.accelerator is None:
            return module
        if self.manual:
            for p in module.parameters():
                if p.requires_grad:
                    torch.distributed.broadcast(p.data, src=0)
            return module
        return self.accelerator.prepare_model(module)

    def no_sync(self, module, last: bool):
        """Gradient accumulation: all-reduce only on the step's last micro-batch."""
        if self.accelerator is None or self.manual or last:
            return nullcontext()
        return self.accelerator.no_sync(module)

    def average_grads(self, params: list[torch.Tensor]) -> None:
        """Manual mode: every trained parameter's gradient averaged over ranks, in one all-reduce (a
        parameter no gradient reached on this rank counts as zeros, so every rank sends the same layout)."""
        if not self.manual:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for dtype in sorted({p.grad.dtype for p in params}, key=str):
            grads = [p.grad for p in params if p.grad.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.world
            torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def sum(self, values: list[float]) -> list[float]:
        if self.accelerator is None:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def launch(gpus: int, argv: list[str]) -> int:
    """Run `mmagent <argv>` on `gpus` processes with accelerate's launcher; return its exit code."""
    if gpus > 1 and torch.cuda.is_available() and torch.cuda.device_count() < gpus:
        raise ValueError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} GPU(s); "
                         f"pass --gpus {torch.cuda.device_count()} or fewer")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "mmagent", *argv]
    print("launching: " + shlex.join(cmd[2:]), flush=True)
    return subprocess.call(cmd)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
