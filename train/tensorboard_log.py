"""TensorBoard scalars as a run goes (`[log] tensorboard = true`): every entry the trainer writes to
metrics.jsonl is also written as event files into the run directory, so `tensorboard --logdir runs/`
shows each run (and its baselines) by its directory name.

Tags: `train/loss`, `train/loss/<task>`, `train/lr`, `train/samples_per_s`; for each evaluation
`eval/<task>/<metric>/{right,shuffled,blank}` (the primary metric with its controls),
`eval/<task>/image_gain` and `eval/<task>/by_answer_type/<type>`.

tensorboard is an optional extra, imported only when a recipe asks for it.
"""
from __future__ import annotations

from pathlib import Path

from mmagent.train.report import control, primary

INSTALL = "pip install 'mmagent[tensorboard]'"


class TensorBoardMissing(ValueError):
    pass


def require_tensorboard():
    """torch's SummaryWriter, or an error naming the recipe key and the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises this when the tensorboard package is not installed
        raise TensorBoardMissing(f"`log.tensorboard = true` needs the tensorboard package, which is not installed: "
                                 f"{INSTALL} (or set log.tensorboard=false)") from e
    return SummaryWriter


def _tag(name: str) -> str:
    return name.replace("/", "-").replace(" ", "_")  # `yes/no` is one answer type, not a tag group


def scalars(entry: dict) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl entry (a training log or an evaluation)."""
    out = {}
    for key in ("loss", "lr", "samples_per_s"):
        if isinstance(entry.get(key), (int, float)):
            out[f"train/{key}"] = float(entry[key])
    for task, value in (entry.get("task_loss") or {}).items():
        out[f"train/loss/{_tag(task)}"] = float(value)
    for task, m in (entry.get("eval") or {}).items():
        metric, right = primary(m)
        out[f"eval/{_tag(task)}/{metric}/right"] = float(right)
        for c in ("shuffled", "blank"):
            out[f"eval/{_tag(task)}/{metric}/{c}"] = float(control(m, c))
        out[f"eval/{_tag(task)}/image_gain"] = float(m["image_gain"])
        for kind, v in m.get("by_answer_type", {}).items():
            out[f"eval/{_tag(task)}/by_answer_type/{_tag(kind)}"] = float(v["accuracy"])
    return out


class TensorBoardLog:
    """Event files in `run_dir`; a resumed run (`start_step` > 0) drops what an earlier attempt logged
    after its checkpoint, as metrics.jsonl does."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        writer = require_tensorboard()
        self.writer = writer(str(run_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, entry: dict) -> None:
        for tag, value in scalars(entry).items():
            self.writer.add_scalar(tag, value, entry["step"])
        self.writer.flush()  # entries come every log_every steps: a live view, cheaply

    def close(self) -> None:
        self.writer.close()
