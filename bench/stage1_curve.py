"""Does the embedded default see, and what does seeing cost? Held-out VQA accuracy (right / shuffled /
blank image) against stage-1 training, each point a full base build followed by the VQA adapter.

    python bench/stage1_curve.py --steps 400 800 1600 --vqa-steps 300 1000 --out docs/stage1_curve.json \
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


def point(steps: int, align: list[str], vqa: list[str], vqa_steps: list[int], work: Path) -> list[dict]:
    from rich.console import Console
    from mmagent.train.recipe import load_recipe
    from mmagent.train.trainer import Trainer
    quiet = Console(quiet=True)
    t0 = time.perf_counter()
    base_run = work / f"align-{steps}"
    Trainer(load_recipe(ROOT / "recipes/align.toml", [f'run.output_dir="{base_run}"', "model.base=init:tiny",
                                                       f"train.steps={steps}", *align]), console=quiet).run()
    t1 = time.perf_counter()
    base = json.loads((base_run / "results.json").read_text())["adapter"]
    return [vqa_point(steps, t1 - t0, base, n, vqa, base_run, work) for n in vqa_steps]


def vqa_point(steps, stage1_seconds, base, vqa_steps, vqa, base_run, work) -> dict:
    from rich.console import Console
    from mmagent.train.recipe import load_recipe
    from mmagent.train.trainer import Trainer
    t1 = time.perf_counter()
    results = Trainer(load_recipe(ROOT / "recipes/vqa.toml", [f'run.output_dir="{work}/vqa-{steps}-{vqa_steps}"',
                                                             f'model.base="{base_run}/model"',
                                                             f"train.steps={vqa_steps}", "train.checkpoint_every=0",
                                                             "train.eval_base=false", "train.baselines=[]", *vqa]),
                      console=Console(quiet=True)).run()
    t2 = time.perf_counter()
    m = results["adapter"]["vqa"]
    cap = base.get("caption", {})
    return {"stage1_steps": steps, "stage1_seconds": round(stage1_seconds, 1), "vqa_steps": vqa_steps,
            "vqa_seconds": round(t2 - t1, 1),
            "base_caption_object_recall": round(cap.get("object_recall", -1), 1),
            "base_caption_object_recall_shuffled": round(cap.get("shuffled_image_object_recall", -1), 1),
            "right": round(m["vqa_accuracy"], 1), "shuffled": round(m["shuffled_image"], 1),
            "blank": round(m["blank_image"], 1), "image_gain": round(m["image_gain"], 1),
            "by_answer_type": {k: round(v["accuracy"], 1) for k, v in m["by_answer_type"].items()},
            "top_answer_share": {k: round(v["top_answer_share"], 1) for k, v in m["by_answer_type"].items()},
            "compositional": round(results.get("adapter_compositional", {}).get("vqa", {}).get("vqa_accuracy", -1), 1)}


def table(folder: Path) -> str:
    """The markdown table of every sweep JSON in `folder` (docs/RESULTS.md's stage-1 table)."""
    lines = ["| sweep | queries | ViT changes | stage-1 steps | VQA steps | right | shuffled | blank | number | other | "
             "yes/no | base caption object recall |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(folder.glob("*.json")):
        d = json.loads(f.read_text())
        for p in d["points"]:
            a, rec = p["by_answer_type"], p.get("base_caption_object_recall", "")
            lines.append(f"| {f.stem} | {d.get('queries') or 8} | {' '.join(d.get('vision') or []) or '-'} | "
                         f"{p['stage1_steps']} | {p.get('vqa_steps', 300)} | {p['right']} | {p['shuffled']} | "
                         f"{p['blank']} | {a['number']} | {a['other']} | {a['yes/no']} | {rec} |")
    return "\n".join(lines)


def curve(files: list[Path], seconds_per_step: float, vqa_steps: int = 600) -> dict:
    """Accuracy against stage-1 time: every point of `files` with `vqa_steps` VQA steps, grouped by
    stage-1 steps, mean over seeds, with the seeds themselves as points; x in minutes of this machine
    (stage-1 steps x `seconds_per_step`, measured by the main job)."""
    from statistics import mean
    by_steps: dict[int, list[dict]] = {}
    for f in files:
        for p in json.loads(f.read_text())["points"]:
            if p.get("vqa_steps") == vqa_steps:
                by_steps.setdefault(p["stage1_steps"], []).append(p)
    steps = sorted(by_steps)
    x = [round(n * seconds_per_step / 60, 2) for n in steps]
    series = {"right image": ("right", "C0"), "shuffled image": ("shuffled", "C1"),
              "base caption object recall (%)": ("base_caption_object_recall", "C2")}
    lines = [{"label": label, "x": x, "y": [round(mean(p[k] for p in by_steps[n]), 1) for n in steps],
              "style": "control" if k != "base_caption_object_recall" else "dashed", "colour": colour}
             for label, (k, colour) in series.items()]
    seeds = [(xi, p["right"]) for xi, n in zip(x, steps) for p in by_steps[n]]
    lines.append({"label": "right image, each seed", "x": [a for a, _ in seeds], "y": [b for _, b in seeds],
                  "style": "point", "colour": "C0"})
    lines.append({"label": "the bar (80)", "x": [0, max(x)], "y": [80, 80], "style": "reference", "colour": "C3"})
    return {"kind": "lines", "title": f"held-out VQA ({vqa_steps} adapter steps) against stage-1 time",
            "xlabel": f"stage-1 minutes on 2 cores ({seconds_per_step:.3f} s a step)",
            "ylabel": "VQA accuracy / recall (%)", "lines": lines,
            "points": {str(n): by_steps[n] for n in steps}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", type=Path, help="print the table of a folder of sweep JSONs and stop")
    ap.add_argument("--plot", type=Path, nargs="+", metavar="JSON... OUT",
                    help="draw accuracy against stage-1 time from sweep JSONs into OUT.png/.svg/.json and stop")
    ap.add_argument("--seconds-per-step", type=float, default=0.23, help="stage-1 seconds a step, for --plot")
    ap.add_argument("--steps", type=int, nargs="+")
    ap.add_argument("--vqa-steps", type=int, nargs="+", default=[300])
    ap.add_argument("--align", nargs="*", action="extend", default=[])
    ap.add_argument("--vqa", nargs="*", action="extend", default=[])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--vision", nargs="*", default=[], help="builtin ViT config changes, e.g. patch_size=16")
    ap.add_argument("--qformer", nargs="*", default=[], help="builtin Q-Former config changes")
    ap.add_argument("--queries", type=int, help="number of Q-Former query tokens")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.plot:
        from mmagent.train.plots import draw
        print(draw(curve(args.plot[:-1], args.seconds_per_step), args.plot[-1]))
        return
    from mmagent.train import builtin  # architecture variants for this experiment only, not the cached bases
    for target, changes in ((builtin.VISION, args.vision), (builtin.QFORMER, args.qformer)):
        target.update({k: int(v) for k, v in (c.split("=") for c in changes)})
    builtin.N_QUERY_TOKENS = args.queries or builtin.N_QUERY_TOKENS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            for row in point(steps, args.align, args.vqa, args.vqa_steps, Path(tmp)):
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "align": args.align, "vqa": args.vqa,
                                        "vision": args.vision, "qformer": args.qformer, "queries": args.queries,
                                        "vqa_steps": args.vqa_steps, "points": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
