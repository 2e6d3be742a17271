"""The tables of bench/gpu_train_7b.sh's results (docs/BENCHMARKS.md, "Training at 7B scale").

    python bench/train_7b_report.py OUT_DIR
        baseline.jsonl, ours.jsonl, metrics_{one,two,cut}.jsonl, metrics_mix_{eager,graphs}.jsonl, metrics_fsdp.jsonl
        + fsdp.log (bench/gpu_train_7b.sh, gpu_graphs_7b.sh, gpu_scale_7b.sh)
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


def case_name(r: dict) -> str:
    keys = [k.removeprefix("train.") for k in r.get("overrides", []) if not k.startswith("train.batch_size")]
    return "ours" + (", " + " ".join(keys) if keys else " (defaults)")


def speed_table(base: list[dict], ours: list[dict]) -> list[str]:
    """Every row of the call, the baseline's first at each batch, ours against the baseline of its batch."""
    out = ["| run | B·T | tokens/s | samples/s | peak GiB | LLM-MFU | × baseline tok/s |", "|---|---|---|---|---|---|---|"]
    named = [(f"baseline {r['mode']}" + (", grad. ckpt" if r.get("ckpt") else ""), r) for r in base if "mode" in r]
    named += [(case_name(r), r) for r in ours if "who" in r]
    for name, r in sorted(named, key=lambda nr: (nr[1]["B"], not nr[0].startswith("baseline"))):
        ckpt = bool(r.get("ckpt")) or "train.gradient_checkpointing=true" in r.get("overrides", [])
        b = base_case(base, "lora", r["B"], ckpt)
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


def losses(folder: Path, name: str) -> dict[int, dict]:
    return {m["step"]: m for m in rows(folder / f"metrics_{name}.jsonl") if "loss" in m}


def median_rate(run: dict[int, dict], after: int = 3) -> float:
    return statistics.median(m["samples_per_s"] for s, m in run.items() if s > after)


def shown_steps(last: int, around: int) -> list[int]:
    return sorted({1, 2, 5, *range(10, last + 1, 5), around, around + 1, last} & set(range(1, last + 1)))


def scaling_table(folder: Path) -> list[str]:
    runs = {name: losses(folder, name) for name in ("one", "two", "cut")}
    if not runs["one"] or not runs["two"]:
        return ["(no scaling runs)"]
    last = max(runs["two"])
    # the resumed run's metrics repeat the 2-GPU run's up to the checkpoint it resumed from
    resumed_at = max((s for s in runs["cut"] if s in runs["two"] and runs["cut"][s] == runs["two"][s]), default=0)
    sps = {n: median_rate(r) for n, r in runs.items() if r}
    out = [f"samples/s (median of steps 4-{last}): 1 GPU {sps['one']:.2f}, 2 GPUs {sps['two']:.2f}: "
           f"**{sps['two'] / sps['one']:.2f}×**", "",
           f"| step | loss 1 GPU | loss 2 GPUs | 2-GPU run resumed on 1 GPU at step {resumed_at} |", "|---|---|---|---|"]
    for s in shown_steps(last, resumed_at):
        cells = [f"{runs[n][s]['loss']:.4f}" if s in runs[n] else "—" for n in ("one", "two", "cut")]
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    common = sorted(set(runs["one"]) & set(runs["two"]))
    gap = max(abs(runs["one"][s]["loss"] - runs["two"][s]["loss"]) for s in common)
    tail = [s for s in runs["cut"] if s > resumed_at and s in runs["two"]]
    out.append("")
    out.append(f"max |1 GPU − 2 GPUs| over steps 1-{last}: {gap:.4f}" + (
        f"; max |resumed − 2 GPUs| over steps {resumed_at + 1}-{last}: "
        f"{max(abs(runs['cut'][s]['loss'] - runs['two'][s]['loss']) for s in tail):.4f}" if tail else ""))
    return out


def mixed_table(folder: Path) -> list[str]:
    """CUDA graphs against eager on mixed-length data with accumulation (metrics_mix_{eager,graphs})."""
    runs = {m: losses(folder, f"mix_{m}") for m in ("eager", "graphs")}
    if not all(runs.values()):
        return ["(no mixed-length runs)"]
    last = min(max(r) for r in runs.values())
    out = [f"samples/s (median of steps 4-{last}): eager {median_rate(runs['eager']):.2f}, graphs "
           f"{median_rate(runs['graphs']):.2f}: **{median_rate(runs['graphs']) / median_rate(runs['eager']):.2f}×**",
           "", "| step | loss eager | loss graphs |", "|---|---|---|"]
    for s in shown_steps(last, 0):
        out.append(f"| {s} | {runs['eager'][s]['loss']:.4f} | {runs['graphs'][s]['loss']:.4f} |")
    return out


def fsdp_lines(folder: Path) -> list[str]:
    run = losses(folder, "fsdp")
    log = folder / "fsdp.log"
    peaks = [r for r in rows(log) if "peak_GiB" in r] if log.exists() else []
    if not run and not peaks:
        return ["(no FSDP run)"]
    out = [f"rank {r['rank']} of {r['world']}: peak {r['peak_GiB']} GiB" for r in peaks]
    out += [f"step {s}: loss {m['loss']:.4f}, {m['samples_per_s']} samples/s" for s, m in sorted(run.items())]
    return out


def main(folder: str) -> None:
    folder = Path(folder)
    base, ours = rows(folder / "baseline.jsonl"), rows(folder / "ours.jsonl")
    when = (folder / "when.txt").read_text().strip() if (folder / "when.txt").exists() else ""
    rate = next((r for r in base + ours if "bf16_matmul_TFLOPs" in r), {})
    print(f"{when}\nbf16 matmul rate measured in the call: {rate.get('bf16_matmul_TFLOPs')} TFLOP/s\n")
    for title, table in (("1. Throughput and memory (GPU 0)", speed_table(base, ours)),
                         ("2. LoRA vs full fine-tuning", method_table(base, ours)),
                         ("3. 1 GPU vs 2 GPUs, one global batch", scaling_table(folder)),
                         ("CUDA graphs on mixed lengths, 4 micro-batches a step", mixed_table(folder)),
                         ("FSDP, full fine-tuning on 2 GPUs", fsdp_lines(folder))):
        print(f"### {title}\n")
        print("\n".join(table) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
