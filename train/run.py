"""The train command's flow around the Trainer: run, then say where the run is and how it scored."""
from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmagent.train.report import SCORE_COLUMNS, score_rows


def score_table(results: dict) -> Table:
    table = Table(title="held-out scores")
    for col in SCORE_COLUMNS:
        table.add_column(col)
    for row in score_rows(results):
        table.add_row(*row)
    return table


def run_recipe(recipe, resume: bool, console: Console) -> dict:
    from mmagent.train.rundir import RunLock
    from mmagent.train.trainer import Trainer
    from mmagent.train.distributed import Ranks
    main = Ranks().main  # several processes (--gpus N): rank 0 holds the run directory and reports
    if main:  # building a base is the step before training (`--gpus N` built it before starting the ranks)
        from mmagent.train.build import ensure_base
        ensure_base(recipe.model.base, quiet=console.quiet)
    with RunLock(recipe.run_dir) if main else nullcontext():  # the run and its baselines: one writer's
        results = Trainer(recipe, resume=resume, console=console).run()
        if recipe.train.baselines:
            results = run_baselines(recipe, results, console)
    if not main:
        return results
    console.print(score_table(results))
    where = recipe.run_dir / ("adapters/" + recipe.adapter_name if recipe.train.method == "lora" else "model")
    console.print(f"run directory: [bold]{recipe.run_dir}[/]  ({where}, report.md, metrics.jsonl)")
    return results


BASELINES = {"llm_only": ["lora.bridge=[]", "lora.vision=[]", "soft_prompt.tokens=0"]}


def run_baselines(recipe, results: dict, console: Console) -> dict:
    """Train each baseline the recipe names under <run>/baselines/<name> and report it beside the adapter."""
    from mmagent.files import atomic_write_json
    from mmagent.train.recipe import apply_overrides, recipe_from_dict
    from mmagent.train.report import write_report
    from mmagent.train.distributed import Ranks
    from mmagent.train.trainer import Trainer
    for name in recipe.train.baselines:
        console.print(f"baseline [bold]{name}[/]: the same recipe with {' '.join(BASELINES[name])}")
        raw = apply_overrides(recipe.to_dict(), [*BASELINES[name], f'run.output_dir="{recipe.run_dir / "baselines" / name}"',
                                                 "train.baselines=[]", "train.eval_base=false"])
        # a baseline belongs to the run that was just (re)trained: an older one in the run is replaced
        if Ranks().main:
            shutil.rmtree(recipe.run_dir / "baselines" / name, ignore_errors=True)
        sub = Trainer(recipe_from_dict(raw, f"{recipe.source} (baseline {name})"), console=console).run()
        results.setdefault("baselines", {})[name] = {k: v for k, v in sub.items() if k.startswith("adapter")}
    if not Ranks().main:
        return results
    atomic_write_json(recipe.run_dir / "results.json", results)
    write_report(recipe.run_dir, results)
    return results


def evaluate_run(run_dir: Path, with_base: bool, console: Console) -> dict:
    from mmagent.adapters import META, read_meta
    from mmagent.artifacts import BUNDLE, kind_of
    from mmagent.train.recipe import recipe_from_dict
    from mmagent.train.trainer import Trainer
    from mmagent.train.rundir import existing_run_dir
    run_dir = existing_run_dir(run_dir)
    recipe_file = run_dir / "recipe.json"
    if not recipe_file.is_file():
        if kind_of(run_dir) == BUNDLE:
            raise FileNotFoundError(f"`{run_dir}` is an exported bundle, not a run directory: `mmagent eval` "
                                    f"re-scores a run from its `recipe.json`; give the run it was exported from "
                                    f"(runs/<name>), or use the bundle with `mmagent info {run_dir}` / "
                                    "`Agent.load`")
        raise FileNotFoundError(f"`{recipe_file}` is missing, so `{run_dir}` is not a run directory written by "
                                "`mmagent train`; give runs/<name>")
    try:
        raw = json.loads(recipe_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"`{recipe_file}` is not valid JSON ({e}); restore it, or train the run again") from e
    recipe = recipe_from_dict(raw, str(recipe_file))
    adapter = run_dir / "adapters" / recipe.adapter_name
    if recipe.train.method != "lora":
        raise ValueError(f"`{run_dir}` trained a full model (train.method={recipe.train.method}), not an adapter; "
                         "`mmagent eval` evaluates adapter runs: use the model as a base "
                         f"(model.base=\"{run_dir / 'model'}\") in a recipe instead")
    if not (adapter / META).is_file():
        raise FileNotFoundError(f"the run's adapter `{adapter}` is missing (no {META}); the run did "
                                "not finish or the folder was removed: resume it with `mmagent train RECIPE.toml "
                                "--resume`, or train it again")
    read_meta(adapter)  # the adapter's files are all there, or an error that names the missing one
    trainer = Trainer(recipe, console=console, evaluate_only=True)
    trainer.setup()
    trainer.load_adapter(adapter)
    results = {"adapter": trainer.evaluate(True)}
    if "comp" in trainer.eval_records:
        results["adapter_compositional"] = trainer.evaluate(True, "comp")
    if with_base:
        results["base"], results["base_protocol"] = trainer.evaluate_base()
    console.print(score_table(results))
    return results
