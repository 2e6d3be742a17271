"""Checkpoints: `checkpoints/step-N/` with trainable weights, optimizer, scheduler, RNG and data position.

All tensors go to safetensors and all else to JSON (no pickle). A checkpoint directory appears in one
rename, so a kill -9 at any moment leaves only complete checkpoints behind.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
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
    final = run_dir / "checkpoints" / f"step-{step}"
    with atomic_dir(final, force=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in trainables.items()}, tmp / "trainable.safetensors")
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
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


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler) -> dict:
    """Restore in place; return the saved state (step, position)."""
    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    missing = set(params) - set(weights)
    if missing:
        raise ValueError(f"checkpoint `{path}` lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); "
                         "it belongs to another recipe: resume with the recipe that wrote it")
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
