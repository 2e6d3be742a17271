"""Building a base: the step above the trainer that turns a builtin base's recipe into a cached model.

Resolving and loading a base (mmagent.train.base, mmagent.train.builtin) never trains. `mmagent train`
and `mmagent base build` call this module first; it builds a missing builtin base by training
recipes/align.toml (stage 1) and caches the result where mmagent.train.builtin finds it.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from rich.console import Console

from mmagent.files import atomic_write_json
from mmagent.train.base import fingerprint
from mmagent.train.builtin import VARIANTS, align_recipe, builtin_dir
from mmagent.train.recipe import load_recipe
from mmagent.train.rundir import TrainingInterrupted
from mmagent.train.trainer import Trainer


def ensure_builtin(name: str, cache_dir=None, quiet: bool = False) -> Path:
    """The cached builtin base directory, built from recipes/align.toml when it is not there yet."""
    final = builtin_dir(name, cache_dir)
    if (final / "mmagent_base.json").exists():
        return final
    return build_builtin(name, final, quiet)


def ensure_base(ref: str, quiet: bool = False) -> None:
    """Before training on `ref`: build it if it is a builtin base that is not built yet."""
    if ref.startswith("builtin:"):
        ensure_builtin(ref.removeprefix("builtin:"), quiet=quiet)


def build_builtin(name: str, final: Path, quiet: bool = False) -> Path:
    console = Console(quiet=quiet)
    console.print(f"[bold]builtin:{name}[/] is not built yet: training it from {align_recipe()} "
                  f"(once; cached at {final})")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.with_name(final.name + f".build{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    overrides = [f'run.output_dir="{work}"', *VARIANTS[name]]
    start = time.perf_counter()
    try:  # the work dir is this process's alone (its own lock too), so a stopped build cannot be resumed
        results = Trainer(load_recipe(align_recipe(), overrides), console=console).run()
    except TrainingInterrupted as e:
        shutil.rmtree(work, ignore_errors=True)
        raise TrainingInterrupted(e.signum, f"{e.signal_name}: building builtin:{name} stopped; nothing was kept, "
                                  "it is built from the start on next use") from None
    model_dir = work / "model"
    atomic_write_json(model_dir / "mmagent_base.json",
                      {"ref": f"builtin:{name}", "fingerprint": fingerprint(model_dir), "recipe": str(align_recipe()),
                       "build_seconds": round(time.perf_counter() - start, 1), "results": results["adapter"]})
    try:
        os.replace(model_dir, final)
    except OSError:  # another process finished first: its copy is as good as ours
        if not (final / "mmagent_base.json").exists():
            raise
    shutil.rmtree(work, ignore_errors=True)
    console.print(f"built builtin:{name} in {time.perf_counter() - start:.0f} s -> {final}")
    return final
