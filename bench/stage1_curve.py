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


# The measured curves the figure draws (GPU sweeps of docs/stage1_sweeps, 16 queries, 600 VQA steps of the
# adapter recipe each sweep names) and what a step costs on this machine's 2 cores, quiet: a stage-1 step at
# batch 32, 0.25 s (the main job's 1,500 steps, 128 samples/s); a contrastive step at batch 48, 0.3-0.5 s.
CURVES = {"the default, world v6 (S6, S7; 2 seeds)": (["S7_T1000_s0", "S6_C6_s0", "S6_C6_s1", "S7_T2400_s0",
                                                   "S7_T2400_s1"], "C0"),
          "world v4, r=8 q/v adapter (P4, P1)": (["P4_q16_1500", "P1_q16"], "C1"),
          "world v4, 1,500 caption + N contrastive steps (Q)": (["Q0_no_contrast_1500", "Q1_contrast600_1500",
                                                                "Q2_contrast1500_1500", "Q4_contrast3000_1500"], "C2")}
CAPTION_STEP_S, CONTRAST_STEP_S = 0.25, 0.4


def stage1_minutes(point: dict, contrast_steps: int) -> float:
    return round((point["stage1_steps"] * CAPTION_STEP_S + contrast_steps * CONTRAST_STEP_S) / 60, 1)


def series(folder: Path, names: list[str], vqa_steps: int) -> dict[float, list[dict]]:
    """The points of these sweeps with `vqa_steps` adapter steps, by stage-1 minutes."""
    by_x: dict[float, list[dict]] = {}
    for name in names:
        d = json.loads((folder / f"{name}.json").read_text())
        contrast = next((int(a.split("=")[1]) for a in d["align"] if a.startswith("contrast.steps=")), 0)
        for p in d["points"]:
            if p.get("vqa_steps") == vqa_steps:
                by_x.setdefault(stage1_minutes(p, contrast), []).append(p)
    return dict(sorted(by_x.items()))


def curve(folder: Path, vqa_steps: int = 600) -> dict:
    """Held-out VQA (right image; the mean where there are several seeds, each seed as a point) and the
    base's caption object recall against stage-1 minutes on this machine, one pair per CURVES entry."""
    from statistics import mean
    lines, top = [], 0.0
    for label, (names, colour) in CURVES.items():
        by_x = series(folder, names, vqa_steps)
        x = list(by_x)
        top = max(top, *x)
        lines.append({"label": f"{label}: VQA", "x": x, "y": [round(mean(p["right"] for p in ps), 1)
                                                              for ps in by_x.values()],
                      "style": "control", "colour": colour})
        if any(len(ps) > 1 for ps in by_x.values()):
            seeds = [(xi, p["right"]) for xi, ps in by_x.items() for p in ps]
            lines.append({"label": "    each seed", "x": [a for a, _ in seeds], "y": [b for _, b in seeds],
                          "style": "scatter", "colour": colour})
        lines.append({"label": "    the base's caption object recall", "x": x,
                      "y": [round(mean(p["base_caption_object_recall"] for p in ps), 1) for ps in by_x.values()],
                      "style": "dashed", "colour": colour})
    lines.append({"label": "the bar (80)", "x": [0, top], "y": [80, 80], "style": "reference", "colour": "C3"})
    return {"kind": "lines", "title": f"stage-1 time against held-out VQA ({vqa_steps} adapter steps) and captions",
            "xlabel": "stage-1 minutes on 2 cores (steps x their measured CPU cost)",
            "ylabel": "held-out VQA / objects named (%)", "lines": lines}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", type=Path, help="print the table of a folder of sweep JSONs and stop")
    ap.add_argument("--plot", type=Path, help="draw the CURVES of docs/stage1_sweeps into PLOT.png/.svg/.json")
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
        print(draw(curve(ROOT / "docs/stage1_sweeps"), args.plot))
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
