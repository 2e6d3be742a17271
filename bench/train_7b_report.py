"""The tables of bench/gpu_train_7b.sh's results (docs/BENCHMARKS.md, "Training at 7B scale").

    python bench/train_7b_report.py OUT_DIR      # baseline.jsonl, ours.jsonl, metrics_{one,two,cut}.jsonl
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []


def ours_case(ours: list[dict], batch: int, *keys: str) -> dict | None:
    return next((r for r in ours if r.get("B") == batch and sorted(r.get("overrides", [])) == sorted(keys)), None)


def base_case(base: list[dict], mode: str, batch: int, ckpt: bool = False) -> dict | None:
    return next((r for r in base if r.get("mode") == mode and r.get("B") == batch and r.get("ckpt") == ckpt), None)


def fmt(r: dict | None, key: str, unit: str = "") -> str:
    return "—" if not r or r.get(key) is None else f"{r[key]:,}{unit}"


def speed_table(base: list[dict], ours: list[dict]) -> list[str]:
    out = ["| run | B·T | tokens/s | samples/s | peak GiB | LLM-MFU | × baseline tok/s |", "|---|---|---|---|---|---|---|"]
    cases = [("baseline LoRA", base_case(base, "lora", 4)), ("ours LoRA (defaults)", ours_case(ours, 4)),
             ("ours LoRA, bf16-mixed", ours_case(ours, 4, "train.precision=bf16-mixed")),
             ("ours LoRA, compile", ours_case(ours, 4, "train.compile=true")),
             ("baseline LoRA, grad. ckpt", base_case(base, "lora", 4, True)),
             ("ours LoRA, grad. ckpt", ours_case(ours, 4, "train.gradient_checkpointing=true")),
             ("baseline LoRA", base_case(base, "lora", 16)), ("ours LoRA (defaults)", ours_case(ours, 16)),
             ("ours LoRA, compile", ours_case(ours, 16, "train.compile=true"))]
    for name, r in cases:
        if r is None:
            continue
        b = base_case(base, "lora", r["B"], bool(r.get("ckpt")) or "train.gradient_checkpointing=true" in
                      r.get("overrides", []))
        if "error" in r:
            out.append(f"| {name} | {r['B']} | {r['error']} | | | | |")
            continue
        samples = r.get("samples_per_s") or round(r["tokens_per_s"] / (r["T"] + 32), 2)
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b and "tokens_per_s" in b else "—"
        out.append(f"| {name} | {r['B']}·{r['T'] + 32} | {r['tokens_per_s']:,} | {samples} | {fmt(r, 'peak_GiB')} | "
                   f"{fmt(r, 'mfu_llm_est')} | {ratio} |")
    return out


def method_table(base: list[dict], ours: list[dict]) -> list[str]:
    out = ["| run (B4·T160) | trainable M | step s | peak GiB |", "|---|---|---|---|"]
    for name, r in [("baseline LoRA", base_case(base, "lora", 4)), ("baseline full (bf16 weights + AdamW)",
                                                                    base_case(base, "full", 4)),
                    ("ours LoRA", ours_case(ours, 4)),
                    ("ours full, bf16-true", ours_case(ours, 4, "train.method=full", "train.precision=bf16-true"))]:
        if r is not None:
            out.append(f"| {name} | {fmt(r, 'trainable_M')} | {fmt(r, 'step_s')} | {fmt(r, 'peak_GiB')} |"
                       if "error" not in r else f"| {name} | | {r['error']} | |")
    return out


def scaling_table(folder: Path) -> list[str]:
    runs = {name: {m["step"]: m for m in rows(folder / f"metrics_{name}.jsonl") if "loss" in m}
            for name in ("one", "two", "cut")}
    if not runs["one"] or not runs["two"]:
        return ["(no scaling runs)"]
    sps = {n: statistics.median(m["samples_per_s"] for s, m in r.items() if s > 3) for n, r in runs.items() if r}
    out = [f"samples/s (median of steps 4-30): 1 GPU {sps['one']:.2f}, 2 GPUs {sps['two']:.2f}: "
           f"**{sps['two'] / sps['one']:.2f}×**", "",
           "| step | loss 1 GPU | loss 2 GPUs | 2-GPU run resumed on 1 GPU at step 20 |", "|---|---|---|---|"]
    for s in (1, 2, 5, 10, 15, 20, 21, 22, 25, 30):
        cells = [f"{runs[n][s]['loss']:.4f}" if s in runs[n] else "—" for n in ("one", "two", "cut")]
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    common = sorted(set(runs["one"]) & set(runs["two"]))
    gap = max(abs(runs["one"][s]["loss"] - runs["two"][s]["loss"]) for s in common)
    tail = [s for s in runs["cut"] if s > 20 and s in runs["two"]]
    out.append("")
    out.append(f"max |1 GPU − 2 GPUs| over steps 1-30: {gap:.4f}" + (
        f"; max |resumed − 2 GPUs| over steps 21-30: "
        f"{max(abs(runs['cut'][s]['loss'] - runs['two'][s]['loss']) for s in tail):.4f}" if tail else ""))
    return out


def main(folder: str) -> None:
    folder = Path(folder)
    base, ours = rows(folder / "baseline.jsonl"), rows(folder / "ours.jsonl")
    when = (folder / "when.txt").read_text().strip() if (folder / "when.txt").exists() else ""
    rate = next((r for r in base + ours if "bf16_matmul_TFLOPs" in r), {})
    print(f"{when}\nbf16 matmul rate measured in the call: {rate.get('bf16_matmul_TFLOPs')} TFLOP/s\n")
    for title, table in (("1. Throughput and memory (GPU 0)", speed_table(base, ours)),
                         ("2. LoRA vs full fine-tuning", method_table(base, ours)),
                         ("3. 1 GPU vs 2 GPUs, global batch 16·T160", scaling_table(folder))):
        print(f"### {title}\n")
        print("\n".join(table) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
