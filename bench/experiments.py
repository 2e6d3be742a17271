"""The seed article's three claims, tested where they can show: a domain-shift VQA task (the `shift`
world: two colours and a shape the base's stage 1 never saw) trained from the embedded default with
each adapter configuration, several seeds each, every run in its own process.

    python bench/experiments.py --seeds 0 1 2 --steps 300 --out docs/experiments.json
    python bench/experiments.py --table docs/experiments.json     # the markdown table of docs/RESULTS.md
    python bench/experiments.py --world base --steps 600 --configs "LLM only" "Q-Former + ViT" \
        --out docs/experiments_base.json                             # the main job's comparison, 3 seeds

Per run: held-out accuracy with the right / a shuffled / a blank image, trainable parameters, peak
memory (the run's own process), wall time. The table gives mean and standard deviation over seeds.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine

LLM_ALL = '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'
BRIDGE = '["query","key","value","dense"]'
CONFIGS = {
    "LoRA: LLM only": ["lora.bridge=[]", "lora.vision=[]"],
    "LoRA: LLM + Q-Former": ["lora.vision=[]"],
    "LoRA: LLM + Q-Former + ViT": [],
    "LoRA: LLM + Q-Former + soft prompt (8)": ["lora.vision=[]", "soft_prompt.tokens=8"],
    "full fine-tuning (all parts)": ["train.method=full", 'train.parts=["vision","bridge","llm"]', "train.lr=2e-4"],
}


def one_run(overrides: list[str], out: str) -> None:
    """In the child: train and evaluate, then write results, trainable parameters, peak RSS and time."""
    from rich.console import Console
    from mmagent.train.build import ensure_base
    from mmagent.train.recipe import load_recipe
    from mmagent.train.trainer import Trainer
    start = time.perf_counter()
    recipe = load_recipe(ROOT / "recipes/vqa.toml", overrides)
    ensure_base(recipe.model.base)
    trainer = Trainer(recipe, console=Console(quiet=True))
    try:
        trainer.setup()
        trainer.eval_records.pop("comp", None)  # the held-out split is the comparison here; halves the time
        trainer.train()
        results = trainer.finish()
    finally:
        trainer.close()
    trainable = sum(p.numel() for p in trainer.params.values())
    m = results["adapter"]["vqa"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(out).write_text(json.dumps({
        "right": m["vqa_accuracy"], "shuffled": m["shuffled_image"], "blank": m["blank_image"],
        "by_answer_type": {k: v["accuracy"] for k, v in m["by_answer_type"].items()},
        "trainable": trainable, "peak_rss_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start,
        "cpu_seconds": usage.ru_utime + usage.ru_stime}))  # the cost that a busy machine does not inflate


def common_overrides(seed: int, steps: int, work: Path, name: str, world: str) -> list[str]:
    slug = "".join(c if c.isalnum() else "_" for c in name)
    return [f'run.output_dir="{work}/{slug}-{seed}"', f"run.seed={seed}", f"data.world={world}", f"train.steps={steps}",
            "train.checkpoint_every=0", "train.eval_base=false", "train.baselines=[]", f"lora.llm={LLM_ALL}",
            f"lora.bridge={BRIDGE}", 'lora.vision=["qkv"]', "tasks.0.max_eval=300"]


def run_all(seeds: list[int], steps: int, work: Path, world: str, configs: dict) -> list[dict]:
    rows = []
    for name, extra in configs.items():
        for seed in seeds:
            out = work / f"result-{len(rows)}.json"
            overrides = common_overrides(seed, steps, work, name, world) + extra
            code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from experiments import one_run; "
                    f"one_run({overrides!r}, {str(out)!r})")
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
            rows.append({"config": name, "seed": seed, **json.loads(out.read_text())})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def fmt(values: list[float], digits: int = 1) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def table(data: dict) -> str:
    lines = [f"{data['machine']}; world {data.get('world', 'shift')}, {data['steps']} steps a run, seeds {data['seeds']}", "",
             "| configuration | right image | shuffled image | blank image | image gain | trainable params | "
             "peak RSS MB | seconds | CPU seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        rows = [r for r in data["rows"] if r["config"] == name]
        if rows:
            gain = [r["right"] - r["shuffled"] for r in rows]
            lines.append(f"| {name} | {fmt([r['right'] for r in rows])} | {fmt([r['shuffled'] for r in rows])} | "
                         f"{fmt([r['blank'] for r in rows])} | {fmt(gain)} | {rows[0]['trainable']:,} | "
                         f"{fmt([r['peak_rss_mb'] for r in rows], 0)} | {fmt([r['seconds'] for r in rows], 0)} | "
                         f"{fmt([r['cpu_seconds'] for r in rows], 0) if 'cpu_seconds' in rows[0] else '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/experiments.json")
    ap.add_argument("--work", type=Path, help="where the runs go (default: a new temporary folder; run "
                                              "directories are never trained into twice)")
    ap.add_argument("--world", default="shift", help="shapes world: shift (the domain shift) or base (the main job's)")
    ap.add_argument("--configs", nargs="+", help="run only the configurations whose names contain one of these")
    ap.add_argument("--table", type=Path, help="print the table of a finished run's JSON and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="mmagent-experiments-"))
    work.mkdir(parents=True, exist_ok=True)
    configs = {n: e for n, e in CONFIGS.items() if not args.configs or any(c in n for c in args.configs)}
    rows = run_all(args.seeds, args.steps, work, args.world, configs)
    data = {"machine": machine(), "steps": args.steps, "seeds": args.seeds, "world": args.world, "rows": rows}
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


if __name__ == "__main__":
    main()
