"""Checkpoints: `checkpoints/step-N/` with trainable weights, optimizer, scheduler, RNG and data position.

All tensors go to safetensors and all else to JSON (no pickle). A checkpoint directory appears in one
rename, so a kill -9 at any moment leaves only complete checkpoints behind.

One layout whatever the number of processes: with FSDP (train.sharding = "fsdp") the trained tensors and
the optimizer state are gathered whole onto rank 0 (gather_state) under the names and optimizer indices one
process writes, and a resume hands rank 0's full tensors to every rank's shards (scatter_state).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmagent.files import atomic_dir


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, s in state["state"].items():
        for key, value in s.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, trainables: dict[str, torch.Tensor], optimizer, scheduler,
                    position: dict, keep: int = 2) -> Path:
    """`optimizer`: the optimizer, or its state dict (gather_state's, under FSDP)."""
    final = run_dir / "checkpoints" / f"step-{step}"
    with atomic_dir(final, force=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in trainables.items()}, tmp / "trainable.safetensors")
        tensors, meta = _flatten_optimizer(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "position": position, "optimizer": meta,
                                                    "scheduler": scheduler.state_dict()}))
    found = checkpoints(run_dir)
    for _, old in found[:max(0, len(found) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / "state.json").exists())


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                    sharded_root: torch.nn.Module | None = None) -> dict:
    """Restore in place; return the saved state (step, position). `sharded_root`: the FSDP training forward
    (every rank calls this; rank 0 reads the tensors and scatter_state shares them out)."""
    state = json.loads((path / "state.json").read_text())
    with safe_open(path / "trainable.safetensors", "pt") as f:  # every rank checks, so all raise or none
        missing = set(params) - set(f.keys())
    if missing:
        raise ValueError(f"checkpoint `{path}` lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); "
                         "it belongs to another recipe: resume with the recipe that wrote it")
    if sharded_root is not None:
        main = torch.distributed.get_rank() == 0
        weights = load_file(path / "trainable.safetensors") if main else {}
        optim = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"]) if main else {}
        scatter_state(sharded_root, params, optimizer, weights, optim)
    else:
        weights = load_file(path / "trainable.safetensors")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    return state


def _fqns(root: torch.nn.Module, optimizer) -> list[str]:
    """The name under `root` of each parameter in the optimizer's order (its state dict's indices)."""
    name = {id(p): n for n, p in root.named_parameters()}
    return [name[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_state(root: torch.nn.Module, params: dict, optimizer) -> tuple[dict, dict]:
    """FSDP: (trained tensors, optimizer state dict) whole on rank 0's CPU, in the one-process layout: the
    trainer's names (unwrapped_name) and torch's integer optimizer indices. Every rank calls it (all-gathers);
    the others get ({}, {})."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from mmagent.train.distributed import unwrapped_name
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model = get_model_state_dict(root, options=opts)
    optim = get_optimizer_state_dict(root, optimizer, options=opts)
    if torch.distributed.get_rank() != 0:
        return {}, {}
    trainables = {unwrapped_name(k): v for k, v in model.items() if unwrapped_name(k) in params}
    index = {fqn: i for i, fqn in enumerate(_fqns(root, optimizer))}
    groups = [{**g, "params": [index[f] for f in g["params"]]} for g in optim["param_groups"]]
    return trainables, {"state": {index[f]: s for f, s in optim["state"].items()}, "param_groups": groups}


def scatter_state(root: torch.nn.Module, params: dict, optimizer, weights: dict, optim: dict) -> None:
    """FSDP: rank 0's full trained tensors and optimizer state (the one-process layout, as gather_state
    returns) into every rank's shards; the other ranks pass {} and receive theirs by broadcast."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    fqn = {n if n.startswith("soft_prompt.") else f"model.{n}": n for n in params}
    set_model_state_dict(root, {f: weights[n] for f, n in fqn.items()} if weights else {}, options=opts)
    if optim:
        order = _fqns(root, optimizer)
        optim = {"state": {order[int(i)]: s for i, s in optim["state"].items()},
                 "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in optim["param_groups"]]}
    set_optimizer_state_dict(root, optimizer, optim, options=opts)
