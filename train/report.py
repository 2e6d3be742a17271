"""The run report: report.md with every score beside its controls (shuffled and blank image), the base and
the baselines, per answer type; the plots of mmagent.train.plots embedded; a gallery of held-out examples
(gallery.md); the model card (README.md, mmagent.train.card). `mmagent report RUN [RUN...]` regenerates it,
or puts several runs side by side."""
from __future__ import annotations

import json
from pathlib import Path

from mmagent.files import atomic_write_bytes


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
    """report.md, its plots (plots/*.png, .svg and the .json each was drawn from), gallery.md and README.md."""
    from mmagent.train.card import write_run_card
    from mmagent.train.plots import run_figures
    run_dir = Path(run_dir)
    figures = draw_all(run_figures(read_metrics(run_dir / "metrics.jsonl"), results), run_dir)
    lines = [f"# Run report: {run_dir.name}", "", *markdown_scores(results)]
    lines += ["", LEGEND + " Base: " + results.get("base_protocol", "not evaluated") + "."]
    lines += figure_lines(figures, ("loss", "eval_", "lr"), "## Curves")
    lines += detail_lines(results)
    lines += figure_lines(figures, ("types_",), "")
    gallery = write_gallery(run_dir, results)
    if gallery:
        lines += ["", f"Held-out examples with what the adapter generated: [{gallery.name}]({gallery.name})"]
    n_bad = sum(m.get("unreadable_images", 0) for section in ("adapter", "adapter_compositional")
                for m in results.get(section, {}).values())
    lines += ["", f"Unreadable held-out images (not scored): {n_bad}"]
    lines += ["", f"Unreadable training images skipped: {results.get('skipped_images', 0)}", ""]
    atomic_write_bytes(run_dir / "report.md", "\n".join(lines).encode())
    write_run_card(run_dir, results)


def markdown_scores(results: dict) -> list[str]:
    lines = ["| " + " | ".join(SCORE_COLUMNS) + " |", "|---" * len(SCORE_COLUMNS) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in score_rows(results)]


def draw_all(specs: dict[str, dict], root: Path) -> dict[str, dict]:
    from mmagent.train.plots import draw
    for name, spec in specs.items():
        draw(spec, root / "plots" / name)
    return specs


def figure_lines(specs: dict[str, dict], prefixes: tuple[str, ...], heading: str) -> list[str]:
    """Markdown embedding the figures (plots/<name>.png) whose names start with one of `prefixes`."""
    chosen = [(n, spec) for prefix in prefixes for n, spec in specs.items() if n.startswith(prefix)]
    lines = ["", heading] if heading and chosen else []
    for name, spec in chosen:
        lines += ["", f"![{spec['title']}](plots/{name}.png)"]
    return lines


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def _references(refs: list[str]) -> str:
    """Distinct references, most frequent first, with their count when one repeats (VQA's ten answers)."""
    from collections import Counter
    return "<br>".join(_cell(r.replace("\n", "; ")) + (f" (x{n})" if n > 1 else "") for r, n in Counter(refs).most_common())


def write_gallery(run_dir: Path, results: dict, thumb: int = 160) -> Path | None:
    """gallery.md: each task's held-out examples (results' `examples`) with the image, what the adapter
    generated, what it generated for a shuffled image and the references; images copied as thumbnails
    into gallery/ so the page opens anywhere."""
    from PIL import Image
    tasks = {t: m["examples"] for t, m in results.get("adapter", {}).items()
             if any("image" in e for e in m.get("examples", []))}
    if not tasks:
        return None
    lines = ["# Held-out examples", "", "What the adapter generated for held-out images it never trained on, with "
             "what it generated for another held-out image (shuffled) and the references.", ""]
    for task, examples in tasks.items():
        lines += [f"## {task}", "", "| image | input | generated | with a shuffled image | references |",
                  "|---|---|---|---|---|"]
        for i, e in enumerate(examples):
            name = f"gallery/{task}-{i}.png"
            try:
                with Image.open(e["image"]) as im:
                    im = im.convert("RGB")
                    im.thumbnail((thumb, thumb))
                    (run_dir / "gallery").mkdir(exist_ok=True)
                    im.save(run_dir / name)
                image = f'<img src="{name}" width="{thumb}">'
            except (OSError, KeyError):
                image = f"(not found: {_cell(e.get('image', '?'))})"
            lines.append(f"| {image} | {_cell(e['input'])} | {_cell(e['prediction'])} | {_cell(e['shuffled_image'])} | "
                         f"{_references(e.get('references') or [e['reference']])} |")
        lines.append("")
    atomic_write_bytes(run_dir / "gallery.md", "\n".join(lines).encode())
    return run_dir / "gallery.md"


# ---- `mmagent report` ----------------------------------------------------------------------------
def read_results(run_dir: Path) -> dict:
    from mmagent.train.rundir import existing_run_dir
    run_dir = existing_run_dir(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"`{path}` is missing: `{run_dir}` is not a finished run (training writes "
                                "results.json at its end); finish it with `mmagent train RECIPE --resume`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"`{path}` is not valid JSON ({e}); evaluate the run again with `mmagent eval "
                         f"{run_dir}`, or train it again") from e


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run by its folder name, or by its path where two share a name."""
    names = [Path(r).name for r in run_dirs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, run_dirs)]


def regenerate(run_dirs: list[Path], out: Path | None = None) -> Path:
    """One run: its report.md (plots, gallery, card) again, from its files. Several: a comparison in `out`
    (report.md and plots/: one plot per metric, one line per run); returns the report written."""
    run_dirs = [Path(r) for r in run_dirs]
    results = [read_results(r) for r in run_dirs]
    if len(run_dirs) == 1:
        write_report(run_dirs[0], results[0])
        return run_dirs[0] / "report.md"
    if out is None:
        out = Path("reports") / "-vs-".join(r.name for r in run_dirs)
    return write_comparison(dict(zip(run_labels(run_dirs), zip(run_dirs, results))), Path(out))


def write_comparison(runs: dict[str, tuple[Path, dict]], out: Path) -> Path:
    from mmagent.train.plots import compare_figures
    data = {label: (read_metrics(d / "metrics.jsonl"), results) for label, (d, results) in runs.items()}
    figures = draw_all(compare_figures(data), out)
    lines = [f"# {len(runs)} runs side by side", ""]
    lines += [f"- `{label}`: {d}" for label, (d, _) in runs.items()]
    lines += ["", "| run " + " ".join(f"| {c} " for c in SCORE_COLUMNS) + "|", "|---" * (len(SCORE_COLUMNS) + 1) + "|"]
    for label, (_, results) in runs.items():
        lines += ["| " + " | ".join((label, *row)) + " |" for row in score_rows(results)]
    lines += ["", LEGEND]
    lines += figure_lines(figures, ("loss", "eval_", "lr"), "## Curves (one line per run)")
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    return out / "report.md"
