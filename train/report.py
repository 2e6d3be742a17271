"""The run report: report.md with every score beside its controls (shuffled and blank image), the base and
the baselines, per answer type, and an SVG loss curve."""
from __future__ import annotations

import json
from pathlib import Path

from mmagent.files import atomic_write_bytes


def loss_svg(points: list[tuple[int, float]], width: int = 480, height: int = 200) -> str:
    if len(points) < 2:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys) or 1.0
    def sx(x): return 40 + (x - x0) / max(1, x1 - x0) * (width - 50)
    def sy(y): return height - 20 - (y - y0) / max(1e-9, y1 - y0) * (height - 40)
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
            f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{line}"/>'
            f'<text x="40" y="14" font-size="12">training loss {y1:.3f} to {ys[-1]:.3f} over {x1} steps</text></svg>')


def primary(metrics: dict) -> tuple[str, float]:
    key = "vqa_accuracy" if "vqa_accuracy" in metrics else "cider"
    return key, metrics[key]


def control(metrics: dict, name: str) -> float:
    """A control's value of the primary metric (caption controls hold all caption scores)."""
    value = metrics[f"{name}_image"]
    return value[primary(metrics)[0]] if isinstance(value, dict) else value


SCORE_COLUMNS = ("task", "split", "metric", "right", "shuffled", "blank", "gain", "base", "LLM-only")
SPLITS = (("adapter", "held-out"), ("adapter_compositional", "unseen pairs"))
METRIC_NAMES = {"vqa_accuracy": "VQA acc", "cider": "CIDEr-D"}


def _score(results: dict, section: str, task: str) -> str:
    m = results.get(section, {}).get(task)
    return "" if m is None else f"{primary(m)[1]:.1f}"


def score_rows(results: dict) -> list[tuple[str, ...]]:
    """A row per task and split: the primary metric with the right, a shuffled and a blank image, the image
    gain (right - shuffled), the base and the LLM-only LoRA baseline where they were evaluated."""
    rows = []
    baseline = results.get("baselines", {}).get("llm_only", {})
    for section, split in SPLITS:
        for task, m in results.get(section, {}).items():
            key, value = primary(m)
            rows.append((task, split, METRIC_NAMES.get(key, key), f"{value:.1f}", f"{control(m, 'shuffled'):.1f}",
                         f"{control(m, 'blank'):.1f}", f"{m['image_gain']:+.1f}",
                         _score(results, "base", task) if section == "adapter" else "",
                         _score(baseline, section, task)))
    return rows


LEGEND = ("Right: with the question's own image. Shuffled: with another held-out scene's image. Blank: with one "
          "plain image of the held-out images' mean colour. Gain = right - shuffled: what looking adds. Unseen "
          "pairs: held-out scenes with colour x shape pairs training never shows. LLM-only: the same LoRA on "
          "the LLM alone (train.baselines).")


def detail_lines(results: dict) -> list[str]:
    """Per answer type (VQA) and object recall (captions), each with its controls."""
    lines = []
    for task, m in results.get("adapter", {}).items():
        if "by_answer_type" in m:
            lines += ["", f"### {task}: by answer type (held-out)", "",
                      "| answer type | n | right image | shuffled image | blank image | most common answer (share) |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {t} | {v['n']} | {v['accuracy']:.1f} | {v['shuffled_image']:.1f} | {v['blank_image']:.1f} | "
                      f"`{v['top_answer']}` ({v['top_answer_share']:.0f}%) |" for t, v in m["by_answer_type"].items()]
        if "object_recall" in m:
            lines += ["", f"{task}: objects named with the right colour and shape: {m['object_recall']:.1f}% "
                      f"(shuffled image {m['shuffled_image_object_recall']:.1f}%, blank "
                      f"{m['blank_image_object_recall']:.1f}%)"]
        if m.get("not_computed"):
            lines += ["", f"{task}: not computed: {', '.join(m['not_computed'])} (they need Java tools)"]
    stage1 = results.get("base_stage1", {})
    if stage1.get("caption", {}).get("object_recall") is not None:
        c = stage1["caption"]
        lines += ["", f"The base's own greedy captions (stage 1, held-out images) name {c['object_recall']:.1f}% of "
                  f"objects with the right colour and shape (shuffled image {c['shuffled_image_object_recall']:.1f}%)."]
    return lines


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's entries; a last line cut in half by a kill is skipped, not fatal."""
    entries = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def write_report(run_dir: Path, results: dict) -> None:
    lines = ["# Run report", "", "| " + " | ".join(SCORE_COLUMNS) + " |", "|---" * len(SCORE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in score_rows(results)]
    lines += ["", LEGEND + " Base: " + results.get("base_protocol", "not evaluated") + "."]
    lines += detail_lines(results)
    n_bad = sum(m.get("unreadable_images", 0) for section in ("adapter", "adapter_compositional")
                for m in results.get(section, {}).values())
    lines += ["", f"Unreadable held-out images (not scored): {n_bad}"]
    points = [(e["step"], e["loss"]) for e in read_metrics(run_dir / "metrics.jsonl") if "loss" in e]
    svg = loss_svg(points)
    if svg:
        atomic_write_bytes(run_dir / "loss.svg", svg.encode())
        lines += ["", "![loss](loss.svg)"]
    lines += ["", f"Unreadable training images skipped: {results.get('skipped_images', 0)}", ""]
    atomic_write_bytes(run_dir / "report.md", "\n".join(lines).encode())
