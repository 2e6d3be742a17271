"""The figures of a run report: what each shows, built from metrics.jsonl and results.json, and drawn
with matplotlib (the Agg canvas: no display needed).

A figure is a plain spec (title, axis labels, lines or bars with their numbers). `draw` saves the PNG and
SVG and the spec itself as JSON beside them, so what a plot shows can be read back exactly, and several
runs side by side are the same specs with one line per run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from mmagent.files import atomic_path, atomic_write_bytes
from mmagent.train.report import METRIC_NAMES, control, primary

SMOOTHING = 0.8  # weight of the exponential moving average (debiased, as TensorBoard's smoothing slider)
LOSS_LABEL = "cross-entropy (nats per answer token)"
STEP_LABEL = "optimizer step"
CONTROL_NAMES = {"right": "right image", "shuffled": "shuffled image", "blank": "blank image"}
CONTROL_COLOURS = {"right": "C0", "shuffled": "C1", "blank": "C7"}


def ema(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: the first points are not pulled towards zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def metric_label(key: str) -> str:
    return f"{METRIC_NAMES.get(key, key)} (%)" if key == "vqa_accuracy" else f"{METRIC_NAMES.get(key, key)} (x100)"


def stem(name: str) -> str:
    """A task name as part of a file name (task names are the recipe's own)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---- series from a run's files -----------------------------------------------------------------
def loss_series(entries: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Task -> (steps, loss) from metrics.jsonl; runs logged before per-task losses give `all tasks`."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for e in entries:
        if "loss" not in e:
            continue
        for task, value in (e.get("task_loss") or {"all tasks": e["loss"]}).items():
            xs, ys = series.setdefault(task, ([], []))
            xs.append(e["step"])
            ys.append(value)
    return series


def lr_series(entries: list[dict]) -> tuple[list[int], list[float]]:
    points = [(e["step"], e["lr"]) for e in entries if "lr" in e]
    return [p[0] for p in points], [p[1] for p in points]


def eval_series(entries: list[dict], results: dict) -> dict[str, dict]:
    """Task -> {"metric", "steps", right/shuffled/blank: values} over every evaluation of the run; a run
    that did not log its final evaluation in metrics.jsonl gets it from results.json."""
    evals = [(e["step"], e["eval"]) for e in entries if "eval" in e]
    final_step = results.get("steps") or max((e["step"] for e in entries), default=None)  # older runs: the last log
    if results.get("adapter") and final_step is not None and final_step not in {s for s, _ in evals}:
        evals.append((final_step, results["adapter"]))
    out: dict[str, dict] = {}
    for step, by_task in sorted(evals, key=lambda p: p[0]):
        for task, m in by_task.items():
            s = out.setdefault(task, {"metric": primary(m)[0], "steps": [], "right": [], "shuffled": [], "blank": []})
            s["steps"].append(step)
            s["right"].append(primary(m)[1])
            for c in ("shuffled", "blank"):
                s[c].append(control(m, c))
    return out


# ---- figure specs ------------------------------------------------------------------------------
def line(label: str, x: list, y: list, style: str, colour: str) -> dict:
    return {"label": label, "x": list(x), "y": list(y), "style": style, "colour": colour}


def loss_figure(entries: list[dict]) -> dict | None:
    series = loss_series(entries)
    if not series:
        return None
    lines = []
    for i, (task, (xs, ys)) in enumerate(sorted(series.items())):
        lines += [line(f"{task} (raw)", xs, ys, "raw", f"C{i}"),
                  line(f"{task} (smoothed)", xs, ema(ys), "smoothed", f"C{i}")]
    return {"kind": "lines", "title": "training loss per task", "xlabel": STEP_LABEL, "ylabel": LOSS_LABEL,
            "lines": lines}


def lr_figure(entries: list[dict]) -> dict | None:
    xs, ys = lr_series(entries)
    if not xs:
        return None
    return {"kind": "lines", "title": "learning rate (warm-up, then cosine decay)", "xlabel": STEP_LABEL,
            "ylabel": "learning rate (LoRA parameters)", "lines": [line("learning rate", xs, ys, "smoothed", "C0")]}


def eval_figure(task: str, s: dict, results: dict) -> dict:
    """One task's primary metric over steps with its controls; the base and the LLM-only baseline (each
    evaluated once, at the end) as reference marks."""
    lines = [line(CONTROL_NAMES[c], s["steps"], s[c], "control", CONTROL_COLOURS[c]) for c in CONTROL_NAMES]
    span = [0, max(s["steps"])]  # from the start: the base is where training began
    base = results.get("base", {}).get(task)
    if base is not None:
        lines.append(line("base, no adapter (ranked answers)" if s["metric"] == "vqa_accuracy" else "base, no adapter",
                          span, [primary(base)[1]] * 2, "reference", "C3"))
    llm_only = results.get("baselines", {}).get("llm_only", {}).get("adapter", {}).get(task)
    if llm_only is not None:
        lines.append(line("LLM-only LoRA (end)", [results.get("steps", span[1])], [primary(llm_only)[1]], "point", "C2"))
    return {"kind": "lines", "title": f"{task}: held-out {METRIC_NAMES.get(s['metric'], s['metric'])} with its controls",
            "xlabel": STEP_LABEL, "ylabel": metric_label(s["metric"]), "lines": lines}


def types_figure(task: str, m: dict) -> dict | None:
    """VQA accuracy by answer type and by question type, each with its controls."""
    panels = []
    for field, title in (("by_answer_type", "by answer type"), ("by_question_type", "by question type")):
        groups = m.get(field) or {}
        if not groups:
            continue
        panels.append({"title": title, "groups": [f"{name}\n(n={v['n']})" for name, v in groups.items()],
                       "bars": [{"label": CONTROL_NAMES["right"], "values": [v["accuracy"] for v in groups.values()],
                                 "colour": CONTROL_COLOURS["right"]}] +
                               [{"label": CONTROL_NAMES[c], "values": [v[f"{c}_image"] for v in groups.values()],
                                 "colour": CONTROL_COLOURS[c]} for c in ("shuffled", "blank")]})
    if not panels:
        return None
    return {"kind": "bars", "title": f"{task}: held-out accuracy by type", "ylabel": metric_label("vqa_accuracy"),
            "panels": panels}


def run_figures(entries: list[dict], results: dict) -> dict[str, dict]:
    """File stem -> figure spec for one run."""
    figures = {"loss": loss_figure(entries), "lr": lr_figure(entries)}
    for task, s in eval_series(entries, results).items():
        figures[f"eval_{stem(task)}"] = eval_figure(task, s, results)
    for task, m in results.get("adapter", {}).items():
        figures[f"types_{stem(task)}"] = types_figure(task, m)
    return {name: spec for name, spec in figures.items() if spec is not None}


def compare_figures(runs: dict[str, tuple[list[dict], dict]]) -> dict[str, dict]:
    """Several runs side by side: one figure per metric (loss per task, evaluation per task, learning
    rate), one line per run (smoothed loss; the right image solid and the shuffled one dashed)."""
    figures: dict[str, dict] = {}

    def add(name: str, title: str, ylabel: str, new: dict) -> None:
        figures.setdefault(name, {"kind": "lines", "title": title, "xlabel": STEP_LABEL, "ylabel": ylabel,
                                  "lines": []})["lines"].append(new)

    for i, (run, (entries, results)) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        for task, (xs, ys) in sorted(loss_series(entries).items()):
            add(f"loss_{stem(task)}", f"training loss, {task} (smoothed)", LOSS_LABEL, line(run, xs, ema(ys), "smoothed", colour))
        for task, s in eval_series(entries, results).items():
            title = f"{task}: held-out {METRIC_NAMES.get(s['metric'], s['metric'])}"
            add(f"eval_{stem(task)}", title, metric_label(s["metric"]), line(run, s["steps"], s["right"], "control", colour))
            add(f"eval_{stem(task)}", title, metric_label(s["metric"]),
                line(f"{run} (shuffled image)", s["steps"], s["shuffled"], "dashed", colour))
        xs, ys = lr_series(entries)
        if xs:
            add("lr", "learning rate", "learning rate (LoRA parameters)", line(run, xs, ys, "smoothed", colour))
    return figures


# ---- drawing -----------------------------------------------------------------------------------
STYLES = {"raw": {"alpha": 0.35, "linewidth": 1}, "smoothed": {"linewidth": 2},
          "control": {"linewidth": 2, "marker": "o", "markersize": 4},
          "dashed": {"linewidth": 1.5, "linestyle": "--", "marker": "o", "markersize": 3, "alpha": 0.7},
          "reference": {"linewidth": 1.5, "linestyle": ":"}, "point": {"linestyle": "none", "marker": "D", "markersize": 7},
          "scatter": {"linestyle": "none", "marker": "o", "markersize": 4, "alpha": 0.45}}
CONTROL_LINESTYLES = {"shuffled image": "--", "blank image": ":"}


def _draw_lines(ax, spec: dict) -> None:
    for ln in spec["lines"]:
        style = dict(STYLES[ln["style"]])
        if ln["style"] == "control" and ln["label"] in CONTROL_LINESTYLES:
            style["linestyle"] = CONTROL_LINESTYLES[ln["label"]]
        ax.plot(ln["x"], ln["y"], label=ln["label"], color=ln["colour"], **style)
    ax.set_xlabel(spec["xlabel"])
    ax.set_ylabel(spec["ylabel"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _draw_bars(fig, spec: dict) -> None:
    axes = fig.subplots(1, len(spec["panels"]), squeeze=False)[0]
    for ax, panel in zip(axes, spec["panels"]):
        width = 0.8 / len(panel["bars"])
        for j, bar in enumerate(panel["bars"]):
            xs = [g + (j - (len(panel["bars"]) - 1) / 2) * width for g in range(len(panel["groups"]))]
            ax.bar(xs, bar["values"], width, label=bar["label"], color=bar["colour"])
        ax.set_xticks(range(len(panel["groups"])), panel["groups"], fontsize=7)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(spec["ylabel"])
    axes[0].legend(fontsize=7)


def draw(spec: dict, out: Path) -> Path:
    """`out`.png and .svg, and `out`.json holding the spec they were drawn from; returns the PNG path."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display, the Agg canvas
    bars = spec["kind"] == "bars"
    fig = Figure(figsize=(9 if bars and len(spec["panels"]) > 1 else 6.4, 3.6), dpi=100, layout="constrained")
    if bars:
        _draw_bars(fig, spec)
    else:
        _draw_lines(fig.subplots(), spec)
    fig.suptitle(spec["title"], fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for fmt in ("png", "svg"):
        with atomic_path(out.with_suffix(f".{fmt}")) as tmp:
            fig.savefig(tmp, format=fmt)
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(spec, indent=1).encode())
    return out.with_suffix(".png")


def read_figure(png: Path) -> dict:
    """The spec a PNG was drawn from (its .json beside it)."""
    return json.loads(Path(png).with_suffix(".json").read_text())
