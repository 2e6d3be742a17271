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
- With `train.sharding = "fsdp"` (what does not fit one card) the weights, gradients and optimizer state are
  sharded over the processes by torch's FSDP2 (`fully_shard`): one unit per decoder layer of the LLM, per layer
  of the vision encoder, the bridge (Q-Former or projector) whole, the rest in the root. FSDP2 keeps each
  parameter's dtype and requires_grad, so LoRA (frozen base + trained adapters in one unit) and the precision
  modes work as on one process. Checkpoints and saved adapters/models are gathered into full tensors on rank 0
  (torch.distributed.checkpoint.state_dict), so their layout is the one-process layout and a run resumes on
  any number of processes. Rank 0 evaluates alone on the gathered weights while the others wait.
  Plain torch FSDP2 rather than accelerate's FSDP plugin: the plugin is not applied on CPU processes (the gloo
  launch CI tests with), wraps by layer class names only, and carves a transformers model's embeddings and
  lm_head into their own units, while our loss reads `lm_head.weight` rows directly (train.loss_vocab =
  "targets"), outside lm_head's forward, where such a unit's weight is still sharded.
"""
from __future__ import annotations

import atexit
import os
import shlex
import subprocess
import sys
from contextlib import nullcontext

import torch


BUCKET = 1 << 26  # elements of one flat all-reduce of gradients (256 MB of fp32)


def buckets(tensors: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of `tensors` of at most `size` elements each (a larger tensor alone)."""
    out: list[list[torch.Tensor]] = []
    n = size
    for t in tensors:
        if n + t.numel() > size:
            out.append([])
            n = 0
        out[-1].append(t)
        n += t.numel()
    return out


class Ranks:
    """This process among the training processes (torchrun/accelerate environment variables)."""

    def __init__(self, find_unused: bool = False, manual: bool = False, sharding: str = "none"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = None
        self.manual = manual and self.world > 1  # gradients averaged by average_grads, not by DDP hooks
        self.sharded = sharding == "fsdp" and self.world > 1  # FSDP2 units instead of DDP (see shard())
        self.units = 0  # FSDP units, once wrapped
        if self.world > 1:
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs
            # broadcast_buffers off: no buffer is trained, so none needs re-sending each forward;
            # find_unused for full fine-tuning, where a trained part may sit out a forward
            ddp = DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=find_unused)
            # no GPU: gloo on CPU processes (what CI tests the distributed logic with)
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
            # the process group ends before the interpreter's teardown, which otherwise frees NCCL/gloo state
            # in any order (a rank aborted once at exit after writing everything)
            atexit.register(end_process_group)
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
        if self.sharded:
            module = shard(module, self.device, self.world)
            self.units = len(fsdp_units(module))
            return module
        if self.manual:
            for p in module.parameters():
                if p.requires_grad:
                    torch.distributed.broadcast(p.data, src=0)
            return module
        return self.accelerator.prepare_model(module)

    def no_sync(self, module, last: bool):
        """Gradient accumulation: all-reduce only on the step's last micro-batch. FSDP reduce-scatters every
        micro-batch: skipping it would keep whole unsharded gradients, the memory sharding is there to save."""
        if self.accelerator is None or self.manual or self.sharded or last:
            return nullcontext()
        return self.accelerator.no_sync(module)

    def average_grads(self, params: list[torch.Tensor]) -> None:
        """Manual mode: every trained parameter's gradient averaged over ranks, a few all-reduces of flat
        buckets (a LoRA's gradients are one; full fine-tuning's are cut into BUCKET-element pieces, so the
        flat copies never double the gradients' memory). A parameter no gradient reached on this rank counts
        as zeros, so every rank sends the same layout."""
        if not self.manual:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for dtype in sorted({p.grad.dtype for p in params}, key=str):
            for grads in buckets([p.grad for p in params if p.grad.dtype == dtype], BUCKET):
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

    def gather_weights(self, root: torch.nn.Module) -> None:
        """FSDP: every rank all-gathers every unit's weights and keeps them whole until release_weights, so
        that rank 0 can run forwards alone (evaluation, decoding) while the others wait. Nothing otherwise."""
        if not self.sharded:
            return
        for unit in fsdp_units(root):
            if unit is not root:  # the root is not called in evaluation; its weights stay whole until reshard
                unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()

    def release_weights(self, root: torch.nn.Module) -> None:
        """FSDP: wait for rank 0's forwards on the gathered weights, then shard them again."""
        if not self.sharded:
            return
        self.barrier()
        for unit in fsdp_units(root):
            unit.reshard()
            if unit is not root:
                unit.set_reshard_after_forward(True, recurse=False)
        forget_forwards(root)

    def full_model_state(self, root: torch.nn.Module, trained_only: bool) -> dict | None:
        """FSDP: the model's full (unsharded) tensors on rank 0's CPU, named as in the unsharded model
        (`soft_prompt.vectors` for the soft prompt), every trained one or (trained_only=False) all; {} on the
        other ranks, which must call this too. None without sharding: read the model itself."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
        state = get_model_state_dict(root, options=opts)
        if not self.main:
            return {}
        trained = {name for name, p in root.named_parameters() if p.requires_grad}
        return {unwrapped_name(k): v for k, v in tie_like(root, state).items() if not trained_only or k in trained}


def shard_units(vlm) -> list[torch.nn.Module]:
    """FSDP units of a VLM: each layer of the vision encoder and of the LLM (the entries of the outermost
    ModuleLists under each part: a T5's encoder and decoder blocks alike), the bridge whole (Q-Former or
    projector: small beside them)."""
    base, parts = vlm.base_model, vlm.family.parts
    units = [base.get_submodule(parts.bridge)]
    for prefix in (parts.vision, parts.llm):
        part = base.get_submodule(prefix)
        lists: list[str] = []
        for name, module in part.named_modules():
            if isinstance(module, torch.nn.ModuleList) and not any(name.startswith(f"{o}.") for o in lists):
                lists.append(name)
                units += list(module)
        if not lists:
            units.append(part)
    return units


def shard(root: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """FSDP2 on the training forward (Trainer's LossForward, `root.vlm` its VLM): the units of shard_units,
    then the root with all else (embeddings, final norm, head, projection, query tokens, soft prompt)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world,))
    for unit in shard_units(root.vlm):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(root, mesh=mesh)  # the root keeps its weights whole from forward to backward (FSDP2's default)
    return root


def fsdp_units(root: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def forget_forwards(root) -> None:
    """Rank 0's forwards alone (evaluation) made FSDP record the order of forwards, from which a backward
    prefetches: forget it on every rank, so that the next step's all-gathers are the same on all (a step after
    a mid-training evaluation hung without this). torch 2.13 has this as reset_iter_state; 2.11 (the GPU image)
    does not, so its fields are cleared by hand there."""
    if hasattr(root, "reset_iter_state"):
        root.reset_iter_state()
        return
    state = root._get_fsdp_state()
    state._comm_ctx.post_forward_order.clear()
    for s in state._state_ctx.all_states:
        for group in s._fsdp_param_groups:
            group._post_forward_indices.clear()
    state._state_ctx.iter_forward_root = None


def unwrapped_name(fqn: str) -> str:
    """A name under the training forward (LossForward: `model.<name>`, `soft_prompt.vectors`) as the
    unsharded trainer names it: the model's own parameter name, or `soft_prompt.vectors`."""
    return fqn.removeprefix("model.")


def tie_like(root: torch.nn.Module, state: dict) -> dict:
    """Gathered tensors are copies: names of one tied parameter (an LLM's input embedding and head) get one
    tensor again, so that save_pretrained sees them tied as it does on one process."""
    first: dict[int, str] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        if name in state and id(p) in first and first[id(p)] in state:
            state[name] = state[first[id(p)]]
        first.setdefault(id(p), name)
    return state


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


def end_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
