"""Does the embedded default see, and what does seeing cost? Held-out VQA accuracy (right / shuffled /
blank image) against stage-1 training, each point a full base build followed by the VQA adapter.

    python bench/stage1_curve.py --steps 400 800 1600 --vqa-steps 300 --out docs/stage1_curve.json \
        [--align train.batch_size=16 ...] [--vqa lora.r=16 ...]

Each point: recipes/align.toml with train.steps=N (and the --align overrides) builds a base from scratch;
recipes/vqa.toml (with --vqa overrides) trains the adapter on it; the adapter is scored on the held-out
split with its controls. Wall times are this machine's; run it where you want them measured.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import ROOT, machine


def point(steps: int, align: list[str], vqa: list[str], vqa_steps: int, work: Path) -> dict:
    from rich.console import Console
    from mmagent.train.recipe import load_recipe
    from mmagent.train.trainer import Trainer
    quiet = Console(quiet=True)
    t0 = time.perf_counter()
    base_run = work / f"align-{steps}"
    Trainer(load_recipe(ROOT / "recipes/align.toml", [f'run.output_dir="{base_run}"', "model.base=init:tiny",
                                                       f"train.steps={steps}", *align]), console=quiet).run()
    t1 = time.perf_counter()
    results = Trainer(load_recipe(ROOT / "recipes/vqa.toml", [f'run.output_dir="{work}/vqa-{steps}"',
                                                             f'model.base="{base_run}/model"',
                                                             f"train.steps={vqa_steps}", "train.checkpoint_every=0",
                                                             "train.eval_base=false", *vqa]), console=quiet).run()
    t2 = time.perf_counter()
    m = results["adapter"]["vqa"]
    return {"stage1_steps": steps, "stage1_seconds": round(t1 - t0, 1), "vqa_seconds": round(t2 - t1, 1),
            "right": round(m["vqa_accuracy"], 1), "shuffled": round(m["shuffled_image"], 1),
            "blank": round(m["blank_image"], 1), "image_gain": round(m["image_gain"], 1),
            "by_answer_type": {k: round(v["accuracy"], 1) for k, v in m["by_answer_type"].items()},
            "top_answer_share": {k: round(v["top_answer_share"], 1) for k, v in m["by_answer_type"].items()},
            "compositional": round(results.get("adapter_compositional", {}).get("vqa", {}).get("vqa_accuracy", -1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    ap.add_argument("--vqa-steps", type=int, default=300)
    ap.add_argument("--align", nargs="*", default=[])
    ap.add_argument("--vqa", nargs="*", default=[])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            rows.append(point(steps, args.align, args.vqa, args.vqa_steps, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "align": args.align, "vqa": args.vqa,
                                        "vqa_steps": args.vqa_steps, "points": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
