"""A run directory is a unit: written by one process at a time, never silently replaced, and its
`recipe.json` always says what was actually run.

- `RunLock`: an exclusive, non-blocking `flock` on `<run>/.lock` for the run's lifetime; a second writer
  is refused with the directory and the pid that holds it. Re-entrant within one process (the train
  command holds it around the run and its baselines, the Trainer takes it again inside).
- `check_fresh`: a run without --resume refuses a directory that already holds checkpoints or a run
  (results.json, adapters/, model/, metrics.jsonl).
- `check_resume`: --resume continues a run with the settings it started with (its `recipe.json`, written
  when the run starts); only the settings in `RESUMABLE` may differ, and a finished run continues only
  when train.steps is raised.
- `TrainingInterrupted`: SIGINT/SIGTERM during training stops after the current step with a checkpoint.

Stdlib only at import time (the CLI imports this before torch).
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path

RUN_FILES = ("results.json", "adapters", "model", "metrics.jsonl")

# What may differ on --resume: these change how long training goes on, or when and how often it logs,
# evaluates and checkpoints, not what the checkpointed weights, optimizer state and data order mean.
# Everything else (lr, lora.*, data.*, tasks, seed, ...) must be the run's own: a changed value would be
# trained with partly and recorded as if it held throughout.
RESUMABLE = {
    "train.steps": "may be raised to train on (the cosine schedule stretches to the new total), not lowered",
    "train.eval_every": "how often to validate",
    "train.log_every": "how often to write metrics.jsonl",
    "train.checkpoint_every": "how often to checkpoint",
    "train.eval_base": "whether the base is evaluated at the end",
    "train.baselines": "the baselines trained after the run",
    "run.output_dir": "the run directory itself, however it is spelled",
    "train.gradient_checkpointing": "recomputes activations: the same numbers, less memory",
    "train.compile": "compiles the same computation",
    "train.cuda_graphs": "replays the same computation",
    "train.fused_ops": "fuses the same computation",
    "train.batch_size": "with train.grad_accum, as long as their product (the examples a step takes) stays the same: "
                        "e.g. a 2-GPU run resumed on one GPU with half the micro-batch and twice the accumulation",
    "train.grad_accum": "with train.batch_size, as above",
    "train.sharding": "how the same state is spread over the processes (checkpoints have one layout)",
    "log.tensorboard": "whether scalars also go to TensorBoard",
}


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message names it and the fix."""


class RunDirBusy(RunDirError):
    """Another process is writing the run directory."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step; a checkpoint of that step was written."""

    def __init__(self, signum: int, message: str):
        self.signum = signum
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
        super().__init__(message)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


_HELD: dict[str, list] = {}  # lock path -> [open file, count] for the locks this process holds


class RunLock:
    """`with RunLock(run_dir):` or `lock = RunLock(run_dir).acquire(); ...; lock.release()`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self.held = False

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise RunDirBusy(f"run directory `{self.run_dir}` is being written by another process (pid {holder}); "
                                 "one run directory takes one training at a time: wait for it to finish (or stop "
                                 "it), or set run.output_dir=<another dir>") from e
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            _HELD[key] = [f, 1]
        self.key, self.held = key, True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        entry = _HELD.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:  # the file stays: unlinking it would let a third process lock a fresh inode
            del _HELD[self.key]
            fcntl.flock(entry[0].fileno(), fcntl.LOCK_UN)
            entry[0].close()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def existing_run_dir(run_dir) -> Path:
    """`run_dir` as a Path, or a FileNotFoundError that says what a run directory is."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory `{run_dir}` does not exist; give the folder `mmagent train` wrote "
                                "(runs/<name>)")
    return run_dir


def _fix(run_dir: Path) -> str:
    return (f"continue it with `mmagent train RECIPE --resume`, set run.output_dir=<another dir> for a new run, "
            f"or delete `{run_dir}` to start over")


def check_fresh(run_dir: Path) -> None:
    """A run without --resume starts only in a directory that holds no run: never a silent replacement."""
    from mmagent.train.checkpoint import checkpoints
    run_dir = Path(run_dir)
    if checkpoints(run_dir):
        raise FileExistsError(f"run directory `{run_dir}` already has checkpoints; pass --resume to "
                              f"continue it or set run.output_dir=<new dir> (or delete it) to start over")
    held = [name + ("/" if (run_dir / name).is_dir() else "") for name in RUN_FILES if (run_dir / name).exists()]
    if held:
        state = "a finished run" if (run_dir / "results.json").exists() else "a started run"
        raise FileExistsError(f"run directory `{run_dir}` already holds {state} ({', '.join(held)}); training "
                              f"into it again would replace it: {_fix(run_dir)}")


def started_recipe(run_dir: Path) -> dict | None:
    """The recipe the run started with (its recipe.json), defaults filled in; None if there is none."""
    from mmagent.train.recipe import RecipeError, recipe_from_dict
    path = Path(run_dir) / "recipe.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"`{path}` (the settings the run started with) is not readable JSON ({e}); restore it, "
                          "or set run.output_dir=<new dir> for a new run") from e
    if not isinstance(raw, dict):
        raise RunDirError(f"`{path}` (the settings the run started with) holds a JSON {type(raw).__name__}, not a "
                          "recipe; restore it, or set run.output_dir=<new dir> for a new run")
    try:
        return recipe_from_dict(raw, str(path)).to_dict()
    except RecipeError:
        return raw  # written by another mmagent version: compare what is there


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list) and d and all(isinstance(v, dict) for v in d):  # [[tasks]]
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = d
    return out


def recipe_differences(started: dict, now: dict) -> list[str]:
    """`key: run's value -> this value` for every setting that may not change on resume."""
    a, b = _flatten(started), _flatten(now)
    absent = "<absent>"
    split = ("train.batch_size", "train.grad_accum")  # may change together, keeping the step's examples
    step_examples = [d.get(split[0], 1) * d.get(split[1], 1) if all(isinstance(d.get(k, 1), int) for k in split)
                     else None for d in (a, b)]
    out = []
    for key in sorted(a.keys() | b.keys()):
        old, new = a.get(key, absent), b.get(key, absent)
        if old == new or (key in RESUMABLE and key not in ("train.steps", *split)):
            continue
        if key == "train.steps" and isinstance(old, int) and isinstance(new, int) and new >= old:
            continue
        if key in split and step_examples[0] is not None and step_examples[0] == step_examples[1]:
            continue
        note = (" (train.steps may only be raised)" if key == "train.steps" else
                f" (train.batch_size x train.grad_accum must stay {step_examples[0]})" if key in split else "")
        out.append(f"{key}: {json.dumps(old) if old is not absent else absent} (the run) -> "
                   f"{json.dumps(new) if new is not absent else absent} (now){note}")
    return out


def check_resume(run_dir: Path, now: dict) -> str | None:
    """Refuse a --resume that would not continue the run as it started; return a note to print, if any."""
    from mmagent.train.checkpoint import checkpoints
    run_dir = Path(run_dir)
    found = checkpoints(run_dir)
    started = started_recipe(run_dir)
    results = run_dir / "results.json"
    if results.is_file():
        try:
            done = json.loads(results.read_text()).get("steps")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            done = None
        if not isinstance(done, int):  # results of an older mmagent: the steps the run was set to
            done = (started or {}).get("train", {}).get("steps") or (found[-1][0] if found else 0)
        if now["train"]["steps"] <= done:
            raise RunDirError(f"run `{run_dir}` already finished ({done} steps, results.json); there is nothing to "
                              f"resume: raise train.steps above {done} to continue training it (with --resume), or "
                              "set run.output_dir=<new dir> for a new run")
        if not found:
            raise RunDirError(f"run `{run_dir}` finished without a checkpoint (train.checkpoint_every=0 or above "
                              "train.steps), so it cannot be continued: there is no optimizer state to go on from; "
                              "train a new run with run.output_dir=<new dir> and the steps you want")
    if not found:
        return None  # nothing trained is kept: the run starts from step 0 with these settings
    if started is None:
        return (f"`{run_dir / 'recipe.json'}` is missing (a run of an older mmagent): the settings cannot be "
                "checked against the run's; resuming with this recipe's")
    diffs = recipe_differences(started, now)
    if diffs:
        raise RunDirError(
            f"--resume continues run `{run_dir}` with the settings it started with ({run_dir / 'recipe.json'}), "
            f"and {len(diffs)} differ:\n" + "\n".join(f"    {d}" for d in diffs) +
            "\n  resume with the run's settings (drop these overrides), or set run.output_dir=<new dir> for a new "
            "run with them. Settings that may change on resume: " +
            "; ".join(f"{k} ({why})" for k, why in RESUMABLE.items()))
    return None
