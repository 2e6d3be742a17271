"""Reports people look at (issue 11): plots drawn from the logged series (read back from the JSON each was
drawn from, not from pixels), TensorBoard scalars as the run goes, model cards whose numbers are
results.json's, `mmagent report` for one run or several side by side."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import small_recipe
from mmagent.train.plots import ema, read_figure
from mmagent.train.report import write_report

TASKS = ("caption", "vqa")


def vqa_metrics(acc: float) -> dict:
    by = {"yes/no": {"accuracy": acc + 10, "shuffled_image": 60.0, "blank_image": 62.0, "n": 4,
                     "top_answer": "no", "top_answer_share": 50.0},
          "other": {"accuracy": acc - 10, "shuffled_image": 20.0, "blank_image": 30.0, "n": 6,
                    "top_answer": "red", "top_answer_share": 40.0}}
    return {"vqa_accuracy": acc, "shuffled_image": acc - 20, "blank_image": acc - 15, "image_gain": 20.0,
            "by_answer_type": by, "by_question_type": {"is there": by["yes/no"], "what color is the": by["other"]},
            "n": 10, "unreadable_images": 0, "examples": []}


def caption_metrics(cider: float) -> dict:
    return {"cider": cider, "bleu4": 3.0, "shuffled_image": {"cider": cider / 2, "bleu4": 1.0},
            "blank_image": {"cider": cider / 4, "bleu4": 0.5}, "image_gain": cider / 2, "n": 4,
            "unreadable_images": 0, "examples": []}


def logged_run(run: Path) -> tuple[list[dict], dict]:
    """A run directory as the trainer leaves it: metrics.jsonl (per-task losses, lr, two evaluations) and
    results.json."""
    entries = [{"step": s, "loss": 3.0 / s, "lr": 1e-3 * s / 8, "samples_per_s": 10.0,
                "task_loss": {"caption": 4.0 / s, "vqa": 2.0 / s + (0.3 if s % 2 else 0.0)}} for s in range(1, 9)]
    entries.insert(4, {"step": 4, "eval": {"caption": caption_metrics(20.0), "vqa": vqa_metrics(50.0)}})
    final = {"caption": caption_metrics(40.0), "vqa": vqa_metrics(70.0)}
    entries.append({"step": 8, "eval": final})
    results = {"adapter": final, "base": {"vqa": vqa_metrics(30.0)}, "steps": 8,
               "baselines": {"llm_only": {"adapter": {"vqa": vqa_metrics(65.0)}}}}
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (run / "results.json").write_text(json.dumps(results))
    return entries, results


def lines_of(png: Path) -> dict:
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 300
    return {ln["label"]: ln for ln in read_figure(png)["lines"]}


# ---- plots from the logged series ---------------------------------------------------------------------------
def test_each_plot_shows_the_logged_series_with_labelled_axes(tmp_path):
    run = tmp_path / "run"
    entries, results = logged_run(run)
    write_report(run, results)
    train = [e for e in entries if "loss" in e]

    loss = lines_of(run / "plots/loss.png")
    for task in TASKS:
        raw = [e["task_loss"][task] for e in train]
        assert loss[f"{task} (raw)"]["x"] == list(range(1, 9)) and loss[f"{task} (raw)"]["y"] == raw
        assert loss[f"{task} (smoothed)"]["y"] == pytest.approx(ema(raw)) and loss[f"{task} (smoothed)"]["y"] != raw
    spec = read_figure(run / "plots/loss.png")
    assert "step" in spec["xlabel"] and "nats" in spec["ylabel"]

    vqa = lines_of(run / "plots/eval_vqa.png")
    assert vqa["right image"]["x"] == [4, 8] and vqa["right image"]["y"] == [50.0, 70.0]
    assert vqa["shuffled image"]["y"] == [30.0, 50.0] and vqa["blank image"]["y"] == [35.0, 55.0]
    assert vqa["base, no adapter (ranked answers)"]["y"] == [30.0, 30.0]
    assert vqa["LLM-only LoRA (end)"]["x"] == [8] and vqa["LLM-only LoRA (end)"]["y"] == [65.0]
    assert read_figure(run / "plots/eval_vqa.png")["ylabel"] == "VQA acc (%)"
    caption = lines_of(run / "plots/eval_caption.png")  # caption controls hold every caption score: CIDEr's
    assert caption["right image"]["y"] == [20.0, 40.0] and caption["blank image"]["y"] == [5.0, 10.0]

    assert lines_of(run / "plots/lr.png")["learning rate"]["y"] == [e["lr"] for e in train]

    bars = read_figure(run / "plots/types_vqa.png")
    answer_types, question_types = bars["panels"]
    assert answer_types["groups"] == ["yes/no\n(n=4)", "other\n(n=6)"]
    assert [b["values"] for b in answer_types["bars"]] == [[80.0, 60.0], [60.0, 20.0], [62.0, 30.0]]
    assert [b["label"] for b in question_types["bars"]] == ["right image", "shuffled image", "blank image"]

    report = (run / "report.md").read_text()
    for name in ("loss", "eval_vqa", "eval_caption", "lr", "types_vqa"):
        assert f"](plots/{name}.png)" in report and (run / f"plots/{name}.svg").is_file()


def test_a_run_logged_before_per_task_losses_and_final_evaluations_still_plots(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n"
                                               for s in (10, 20)))
    write_report(run, {"adapter": {"vqa": vqa_metrics(60.0)}})
    assert lines_of(run / "plots/loss.png")["all tasks (raw)"]["y"] == [0.1, 0.05]
    assert lines_of(run / "plots/eval_vqa.png")["right image"]["x"] == [20]  # the last logged step


def test_ema_is_debiased():
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([1.0, 0.0])[1] == pytest.approx(0.8 / 1.8)


def test_per_task_losses_split_the_answer_tokens_of_a_mixed_batch():
    from mmagent.train.trainer import add_task_losses
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, 7], [-100, -100, 8, 9]])
    tokens = torch.tensor([1.0, 3.0, 10.0, 2.0, 4.0])  # row 0: 1, 3; row 1: 10; row 2: 2, 4
    sums = {}
    add_task_losses(sums, tokens, {"labels": labels, "tasks": ["caption", "vqa", "caption"]})
    assert sums == {"caption": (10.0, 4), "vqa": (10.0, 1)}


# ---- TensorBoard ------------------------------------------------------------------------------------------
def event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_every_logged_scalar(tmp_path):
    from mmagent.train.tensorboard_log import TensorBoardLog
    entries, _ = logged_run(tmp_path / "run")
    board = TensorBoardLog(tmp_path / "run")
    for e in entries:
        board.log(e)
    board.close()
    got = event_scalars(tmp_path / "run")
    train = [e for e in entries if "loss" in e]
    assert got["train/loss/vqa"] == [(e["step"], pytest.approx(e["task_loss"]["vqa"])) for e in train]
    assert got["train/lr"] == [(e["step"], pytest.approx(e["lr"])) for e in train]
    assert got["eval/vqa/vqa_accuracy/shuffled"] == [(4, 30.0), (8, 50.0)]
    assert got["eval/caption/cider/blank"] == [(4, 5.0), (8, 10.0)]
    assert got["eval/vqa/by_answer_type/yes-no"] == [(4, 60.0), (8, 80.0)]


def test_tensorboard_asked_for_but_missing_is_refused_before_any_work(tmp_path, monkeypatch):
    from mmagent.train.trainer import Trainer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    trainer = Trainer(small_recipe(tmp_path / "run", "log.tensorboard=true"))
    with pytest.raises(ValueError, match=r"log.tensorboard = true.*pip install 'mmagent\[tensorboard\]'"):
        trainer.setup()
    assert not (tmp_path / "run" / "recipe.json").exists()


def test_the_log_section_is_validated_like_the_others(tmp_path):
    from mmagent.train.recipe import RecipeError
    assert small_recipe(tmp_path).log.tensorboard is False  # off by default
    with pytest.raises(RecipeError) as e:
        small_recipe(tmp_path, 'log.tensorboard="yes"', "log.tensorbord=true")
    assert "`log.tensorboard`: expected true or false" in str(e.value)
    assert "did you mean `log.tensorboard`?" in str(e.value)


# ---- a real run: report, TensorBoard, card, gallery, `mmagent report` --------------------------------------
@pytest.fixture(scope="module")
def multitask_run(tmp_path_factory, micro_base) -> Path:
    from mmagent.train.trainer import Trainer
    run = tmp_path_factory.mktemp("report") / "multitask"
    Trainer(small_recipe(run, f'model.base="{micro_base}"', "data.image_size=64", "train.steps=6", "train.log_every=1",
                         "train.eval_every=3", "tasks.1.max_eval=4", "train.eval_base=true", "log.tensorboard=true",
                         recipe="multitask.toml")).run()
    return run


@pytest.mark.slow
def test_a_run_plots_its_per_task_losses_and_evaluations_and_logs_them_to_tensorboard(multitask_run):
    from mmagent.train.report import read_metrics
    entries = read_metrics(multitask_run / "metrics.jsonl")
    results = json.loads((multitask_run / "results.json").read_text())
    train = [e for e in entries if "loss" in e]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]
    assert set().union(*(e["task_loss"] for e in train)) == set(TASKS)  # a 4-example step may hold one task only
    assert [e["step"] for e in entries if "eval" in e] == [3, 6]  # every eval_every, and the final one

    loss = lines_of(multitask_run / "plots/loss.png")
    tb = event_scalars(multitask_run)
    for task in TASKS:
        logged = [(e["step"], e["task_loss"][task]) for e in train if task in e["task_loss"]]
        assert list(zip(loss[f"{task} (raw)"]["x"], loss[f"{task} (raw)"]["y"])) == logged
        assert tb[f"train/loss/{task}"] == [(s, pytest.approx(v)) for s, v in logged]
    vqa = lines_of(multitask_run / "plots/eval_vqa.png")
    final = results["adapter"]["vqa"]
    assert vqa["right image"]["x"] == [3, 6] and vqa["right image"]["y"][-1] == final["vqa_accuracy"]
    assert vqa["shuffled image"]["y"][-1] == final["shuffled_image"]
    assert tb["eval/vqa/vqa_accuracy/blank"][-1] == (6, pytest.approx(final["blank_image"]))
    assert tb["eval/caption/cider/right"][-1] == (6, pytest.approx(results["adapter"]["caption"]["cider"]))


def card_scores(card: str, heading: str = "## Held-out results") -> dict[tuple[str, str], list[str]]:
    """(task, split) -> the row's cells, from the first table after `heading`."""
    lines = card.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| task |")) + 2  # past the head and |---|
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return {(r[0], r[1]): r for r in rows}


def expected_cells(m: dict) -> list[str]:
    """right, shuffled, blank, gain as results.json holds them (caption controls hold every score)."""
    key = "vqa_accuracy" if "vqa_accuracy" in m else "cider"
    ctl = [m[f"{c}_image"][key] if isinstance(m[f"{c}_image"], dict) else m[f"{c}_image"] for c in ("shuffled", "blank")]
    return [f"{m[key]:.1f}", f"{ctl[0]:.1f}", f"{ctl[1]:.1f}", f"{m['image_gain']:+.1f}"]


@pytest.mark.slow
def test_the_model_card_numbers_are_results_json(multitask_run):
    from mmagent.train.card import lora_parameters
    card = (multitask_run / "README.md").read_text()
    results = json.loads((multitask_run / "results.json").read_text())
    rows = card_scores(card)
    for task in TASKS:
        assert rows[(task, "held-out")][3:7] == expected_cells(results["adapter"][task])
        assert rows[(task, "unseen pairs")][3:7] == expected_cells(results["adapter_compositional"][task])
    assert rows[("vqa", "held-out")][7] == f"{results['base']['vqa']['vqa_accuracy']:.1f}"
    assert rows[("caption", "held-out")][7] == f"{results['base']['caption']['cider']:.1f}"

    base = json.loads((multitask_run / "base.json").read_text())
    assert f"`{base['fingerprint']}`" in card and "q_proj, v_proj" in card and "query, value" in card
    trainable = {part: n for part, (n, _) in results["trainable"].items() if n}
    for part, label in (("llm", "LLM"), ("bridge", "bridge (Q-Former / projector)")):
        assert f"| multitask | {label} | " in card and f"| {trainable[part]:,} |" in card
    # the parts' trainable parameters are exactly the LoRA tensors the adapter file holds
    assert sum(trainable.values()) == lora_parameters(multitask_run / "adapters/multitask")
    assert f'Agent.load("{multitask_run}")' in card and f"mmagent serve {multitask_run}" in card


@pytest.mark.slow
def test_the_gallery_shows_held_out_images_with_generated_captions_and_references(multitask_run):
    results = json.loads((multitask_run / "results.json").read_text())
    gallery = (multitask_run / "gallery.md").read_text()
    caption = gallery.split("## caption")[1].split("## ")[0]
    examples = results["adapter"]["caption"]["examples"]
    assert examples
    for i, e in enumerate(examples):
        assert f'src="gallery/caption-{i}.png"' in caption and (multitask_run / f"gallery/caption-{i}.png").is_file()
        assert e["prediction"].replace("|", "\\|") in caption
        assert e["references"][0].splitlines()[0] in caption
    assert "](gallery.md)" in (multitask_run / "report.md").read_text()


@pytest.mark.slow
def test_mmagent_report_regenerates_a_run_and_puts_runs_side_by_side(multitask_run, tmp_path):
    from typer.testing import CliRunner
    from mmagent.cli import app
    other = tmp_path / "again"
    shutil.copytree(multitask_run, other)
    (other / "report.md").unlink()
    shutil.rmtree(other / "plots")
    assert CliRunner().invoke(app, ["report", str(other)]).exit_code == 0
    assert (other / "plots/eval_vqa.png").is_file() and "plots/loss.png" in (other / "report.md").read_text()

    result = CliRunner().invoke(app, ["report", str(multitask_run), str(other), "-o", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    eval_vqa = lines_of(tmp_path / "cmp/plots/eval_vqa.png")
    assert {"multitask", "again"} <= set(eval_vqa)  # one line per run
    assert eval_vqa["again"]["y"] == eval_vqa["multitask"]["y"]
    for task in TASKS:
        assert set(lines_of(tmp_path / f"cmp/plots/loss_{task}.png")) == {"multitask", "again"}
    assert set(lines_of(tmp_path / "cmp/plots/lr.png")) == {"multitask", "again"}
    assert "plots/eval_caption.png" in (tmp_path / "cmp/report.md").read_text()

    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.split())  # rich wraps lines


@pytest.mark.slow
def test_a_bundle_carries_a_model_card_with_its_self_check_and_its_runs_scores(bundle, two_runs):
    card = (bundle / "README.md").read_text()
    manifest = json.loads((bundle / "manifest.json").read_text())
    sc = manifest["selfcheck"]
    g = sc["greedy_f16"]
    assert f"| f16 GGUF greedy tokens identical to torch | {g['identical']}/{g['cases']} cases" in card
    for name, diff in sc["vision"]["max_abs_diff"].items():
        assert f"max abs diff ({name}) | {diff:.1e}" in card
    assert f"`{manifest['base']['fingerprint']}`" in card
    for run in two_runs:
        results = json.loads((run / "results.json").read_text())
        rows = card_scores(card, f"### {run.name} (run `{run}`)")
        for task, m in results["adapter"].items():
            assert rows[(task, "held-out")][3:7] == expected_cells(m)
        for task, m in results["adapter_compositional"].items():
            assert rows[(task, "unseen pairs")][3:7] == expected_cells(m)
    assert f'Agent.load("{bundle}")' in card and "llama-cli -m" in card


def fake_run(root: Path, name: str, acc: float) -> Path:
    run = root / name
    (run / "adapters" / name).mkdir(parents=True)
    (run / "adapters" / name / "mmagent_adapter.json").write_text(json.dumps(
        {"task": name, "kinds": ["vqa"], "parts": {"llm": ["q_proj", "v_proj"]}, "soft_prompt_tokens": 0}))
    (run / "results.json").write_text(json.dumps({"adapter": {"vqa": vqa_metrics(acc)},
                                                  "trainable": {"llm": [1234, 99999]}}))
    return run


def test_a_bundle_card_rewritten_after_an_adapter_is_added_keeps_the_earlier_adapters_numbers(tmp_path):
    from mmagent.train.card import write_bundle_card
    check = {"cases": 4, "identical": 3, "first_tokens": 8}
    manifest = {"family": "blip2", "base": {"ref": "builtin:tiny", "fingerprint": "abc123"}, "llm": {"f16": "llm.f16.gguf"},
                "vision": {}, "sizes": {"llm.f16.gguf": 2_000_000}, "selfcheck": {"greedy_f16": check},
                "adapters": {"first": {"parts": ["llm"], "soft_prompt_tokens": 0}}}
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_bundle_card(bundle, manifest, [fake_run(tmp_path, "first", 61.0)])
    manifest["adapters"]["second"] = {"parts": ["llm"], "soft_prompt_tokens": 0,
                                      "selfcheck": {"greedy_f16": {**check, "identical": 4}}}
    write_bundle_card(bundle, manifest, [fake_run(tmp_path, "second", 72.0)])  # what `--into` does
    card = (bundle / "README.md").read_text()
    assert card_scores(card, "### first")[("vqa", "held-out")][3] == "61.0"  # kept from the card before
    assert card_scores(card, "### second")[("vqa", "held-out")][3] == "72.0"
    assert "| first | LLM | q_proj, v_proj | 1,234 |" in card and "| second | LLM | q_proj, v_proj | 1,234 |" in card
    assert "| f16 GGUF greedy tokens identical to torch | 3/4 cases" in card
    assert "`second`, added later" in card and "| f16 GGUF greedy tokens identical to torch | 4/4 cases" in card
