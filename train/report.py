"""The run report: report.md with the scores against the base and an SVG loss curve (no plotting library)."""
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


SCORE_COLUMNS = ("task", "metric", "adapter", "base", "gain")


def score_rows(results: dict) -> list[tuple[str, ...]]:
    """One row a task: its primary metric for the adapter, the base (if evaluated) and the gain."""
    rows = []
    for task, m in results["adapter"].items():
        key, value = primary(m)
        base = results.get("base", {}).get(task)
        b = primary(base)[1] if base else None
        rows.append((task, key, f"{value:.1f}", "" if b is None else f"{b:.1f}",
                     "" if b is None else f"{value - b:+.1f}"))
    return rows


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
    points = [(e["step"], e["loss"]) for e in read_metrics(run_dir / "metrics.jsonl") if "loss" in e]
    svg = loss_svg(points)
    if svg:
        atomic_write_bytes(run_dir / "loss.svg", svg.encode())
        lines += ["", "![loss](loss.svg)"]
    lines += ["", f"Unreadable images skipped: {results.get('skipped_images', 0)}", ""]
    atomic_write_bytes(run_dir / "report.md", "\n".join(lines).encode())
