"""The train command's flow around the Trainer: run, then say where the run is and how it scored."""
from __future__ import annotations

import json
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
    from mmagent.train.trainer import Trainer
    results = Trainer(recipe, resume=resume, console=console).run()
    console.print(score_table(results))
    where = recipe.run_dir / ("adapters/" + recipe.adapter_name if recipe.train.method == "lora" else "model")
    console.print(f"run directory: [bold]{recipe.run_dir}[/]  ({where}, report.md, metrics.jsonl)")
    return results


def evaluate_run(run_dir: Path, with_base: bool, console: Console) -> dict:
    from mmagent.train.recipe import recipe_from_dict
    from mmagent.train.trainer import Trainer
    raw = json.loads((Path(run_dir) / "recipe.json").read_text())
    recipe = recipe_from_dict(raw, str(run_dir / "recipe.json"))
    trainer = Trainer(recipe, console=console, evaluate_only=True)
    trainer.setup()
    trainer.load_adapter(Path(run_dir) / "adapters" / recipe.adapter_name)
    results = {"adapter": trainer.evaluate(True)}
    if with_base:
        results["base"] = trainer.evaluate(False)
    console.print(score_table(results))
    return results
