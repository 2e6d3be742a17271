"""A run directory is a unit: written by one process at a time, never silently replaced, and its recipe.json
always says what was actually run. Also: SIGINT/SIGTERM stop with a checkpoint; missing/unreadable images
are counted per image."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SMALL_DATA, small_recipe
from mmagent.train.checkpoint import checkpoints
from mmagent.train.data.records import DataError
from mmagent.train.report import read_metrics
from mmagent.train.trainer import Trainer


def lora_recipe(run, base, *extra):
    return small_recipe(run, f'model.base="{base}"', "data.image_size=64", *extra)


# ---- 1. a new run never replaces a finished one ------------------------------------------------------------
def test_a_second_run_into_a_finished_run_without_checkpoints_is_refused(tmp_path, micro_base):
    run = tmp_path / "run"
    Trainer(lora_recipe(run, micro_base, "train.steps=3")).run()  # checkpoint_every=0: no checkpoints
    adapter = run / "adapters/vqa/adapter_model.safetensors"
    before = adapter.read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a finished run \(results.json, adapters/, "
                                              r"metrics.jsonl\).*--resume.*run.output_dir.*delete"):
        Trainer(lora_recipe(run, micro_base, "train.steps=3", "train.lr=1e-2")).setup()
    # --resume cannot silently retrain it from step 0 either
    with pytest.raises(ValueError, match=r"already finished \(3 steps.*raise train.steps"):
        Trainer(lora_recipe(run, micro_base, "train.steps=3"), resume=True).setup()
    with pytest.raises(ValueError, match=r"finished without a checkpoint.*cannot be continued"):
        Trainer(lora_recipe(run, micro_base, "train.steps=5"), resume=True).setup()
    assert adapter.read_bytes() == before
    assert json.loads((run / "recipe.json").read_text())["train"]["lr"] == 2e-3


def test_a_started_run_is_not_replaced_either(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    with pytest.raises(FileExistsError, match=r"already holds a started run \(metrics.jsonl\).*--resume"):
        Trainer(small_recipe(run, "model.base=init:tiny")).setup()


# ---- 2. --resume continues with the run's own settings -----------------------------------------------------
def test_resume_refuses_other_settings_and_finished_runs_and_continues_with_more_steps(tmp_path, micro_base):
    run = tmp_path / "run"
    recipe = lora_recipe(run, micro_base, "train.checkpoint_every=2", "train.log_every=1")
    first = Trainer(recipe)
    first.setup()  # recipe.json is there from the start, not only at the end
    assert json.loads((run / "recipe.json").read_text()) == recipe.to_dict()
    first.train()
    first.finish()
    assert [s for s, _ in checkpoints(run)] == [2]

    def resume(*extra):
        return Trainer(lora_recipe(run, micro_base, "train.checkpoint_every=2", "train.log_every=1", *extra),
                       resume=True)

    with pytest.raises(ValueError, match=r"already finished \(4 steps.*raise train.steps above 4"):
        resume().setup()
    with pytest.raises(ValueError) as e:
        resume("train.steps=6", "train.lr=5e-2").setup()
    text = str(e.value)
    assert "train.lr: 0.002 (the run) -> 0.05 (now)" in text and "train.steps: " not in text
    assert "run.output_dir=<new dir>" in text and "train.eval_every" in text  # the fix, and what may change
    with pytest.raises(ValueError, match=r"lora\.r: 16 \(the run\) -> 4 \(now\)"):  # not a shape-mismatch traceback
        resume("train.steps=6", "lora.r=4").setup()
    # raising train.steps continues the finished run from its last checkpoint (step 2)
    results = resume("train.steps=6").run()
    assert results["steps"] == 6
    started = json.loads((run / "recipe.json").read_text())
    assert started["train"]["steps"] == 6 and started["train"]["lr"] == 2e-3
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match=r"already finished \(6 steps"):
        resume("train.steps=6").setup()


def test_only_the_documented_settings_may_change_on_resume():
    from mmagent.train.rundir import RESUMABLE, recipe_differences
    run = {"run": {"output_dir": "runs/a", "seed": 0}, "train": {"steps": 4, "lr": 1e-3, "log_every": 10},
           "tasks": [{"name": "vqa", "max_eval": 0}]}
    now = {"run": {"output_dir": "/abs/runs/a", "seed": 0}, "train": {"steps": 3, "lr": 1e-3, "log_every": 1},
           "tasks": [{"name": "vqa", "max_eval": 5}, {"name": "cap", "max_eval": 0}]}
    assert recipe_differences(run, now) == [
        "tasks[0].max_eval: 0 (the run) -> 5 (now)",
        "tasks[1].max_eval: <absent> (the run) -> 0 (now)",
        'tasks[1].name: <absent> (the run) -> "cap" (now)',
        "train.steps: 4 (the run) -> 3 (now) (train.steps may only be raised)"]
    assert {"train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every"} <= set(RESUMABLE)
    # the micro-batch split may change when a step keeps its examples (2 GPUs -> 1: half the batch, twice the
    # accumulation); a step of other size may not
    run["train"].update(batch_size=16, grad_accum=1)
    assert recipe_differences(run, {**run, "train": {**run["train"], "batch_size": 8, "grad_accum": 2}}) == []
    assert recipe_differences(run, {**run, "train": {**run["train"], "batch_size": 8}}) == [
        "train.batch_size: 16 (the run) -> 8 (now) (train.batch_size x train.grad_accum must stay 16)"]


# ---- 3. one writer at a time -------------------------------------------------------------------------------
HOLD = ("import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); "
        "f.truncate(); f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(300)")


def _can_lock(path) -> bool:
    code = ("import fcntl, sys; f = open(sys.argv[1], 'a+')\n"
            "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(1)")
    return subprocess.run([sys.executable, "-c", code, str(path)]).returncode == 0


def test_a_second_training_into_a_directory_another_process_writes_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ValueError, match=rf"`{re.escape(str(run))}` is being written by another process "
                                             rf"\(pid {holder.pid}\).*run.output_dir"):
            Trainer(small_recipe(run, "model.base=init:tiny")).setup()
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "metrics.jsonl").exists() and not (run / "recipe.json").exists()


def test_the_lock_is_held_for_the_run_and_given_back(tmp_path, micro_base):
    from mmagent.train.rundir import RunLock
    run = tmp_path / "run"
    with RunLock(run):  # the train command holds it around the run; the Trainer takes it again inside
        trainer = Trainer(lora_recipe(run, micro_base, "train.steps=2"))
        trainer.setup()
        assert not _can_lock(run / ".lock")
        trainer.train()
        trainer.finish()
        assert not _can_lock(run / ".lock")  # still the outer holder's
    assert _can_lock(run / ".lock")
    failed = Trainer(lora_recipe(run, micro_base, "train.steps=2"))
    with pytest.raises(FileExistsError):
        failed.setup()
    assert _can_lock(run / ".lock")  # a refused setup lets go at once


# ---- 6. SIGINT / SIGTERM: finish the step, checkpoint, say how to resume, exit non-zero ------------------
def test_ctrl_c_checkpoints_the_current_step_and_the_run_resumes(tmp_path, micro_base):
    from mmagent.train.rundir import TrainingInterrupted
    run = tmp_path / "run"
    trainer = Trainer(lora_recipe(run, micro_base, "train.steps=6", "train.log_every=1"))
    trainer.setup()
    real = trainer.train_step

    def step(stream):
        loss = real(stream)
        if trainer.step == 1:  # Ctrl-C in the middle of step 2
            signal.raise_signal(signal.SIGINT)
        return loss

    trainer.train_step = step
    seen = []
    outer = signal.signal(signal.SIGINT, lambda *a: seen.append(a))  # never a KeyboardInterrupt in pytest
    try:
        with pytest.raises(TrainingInterrupted) as e:
            trainer.train()
        assert signal.getsignal(signal.SIGINT) is not None and not seen  # the trainer's handler took it
    finally:
        signal.signal(signal.SIGINT, outer)
    assert e.value.exit_code == 130
    assert "SIGINT" in str(e.value) and "step 2/6" in str(e.value) and "--resume" in str(e.value)
    assert [s for s, _ in checkpoints(run)] == [2] and not (run / "adapters").exists()
    resumed = Trainer(lora_recipe(run, micro_base, "train.steps=6", "train.log_every=1"), resume=True)
    assert resumed.run()["steps"] == 6
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m] == [1, 2, 3, 4, 5, 6]


def test_sigterm_during_training_checkpoints_and_exits_143(tmp_path, micro_base):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "cli.py"), "train", str(ROOT / "recipes/vqa.toml"), f'run.output_dir="{run}"',
           f'model.base="{micro_base}"', *SMALL_DATA, "data.image_size=64", "train.batch_size=4",
           "train.steps=1000", "train.checkpoint_every=0", "train.log_every=1", "train.warmup_steps=2",
           "tasks.0.max_eval=2", "train.eval_base=false", "train.baselines=[]"]
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
        deadline = time.time() + 300
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    text = log.read_text()
    assert rc == 143, text
    assert "SIGTERM" in text and "--resume" in text and "Traceback" not in text
    logged = [m["step"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert [s for s, _ in checkpoints(run)] == [logged[-1]] and logged[-1] < 1000
    assert not (run / "adapters").exists()


# ---- 7. missing and unreadable images are counted per image, not per caption -------------------------------
def test_missing_images_are_counted_once_each(tmp_path):
    from mmagent.train.data.tasks import check_images_exist
    (tmp_path / "b.png").write_bytes(b"x")
    records = [{"image_path": str(tmp_path / "a.png")}] * 5 + [{"image_path": str(tmp_path / "b.png")}] + \
              [{"image_path": str(tmp_path / "c.png")}] * 2
    with pytest.raises(DataError, match=r"task `caption`: 2 of 3 image file\(s\) missing"):
        check_images_exist(records, "caption")


def test_an_unreadable_image_is_skipped_and_counted_once(tmp_path, micro_base):
    from conftest import one_broken_image
    trainer = Trainer(lora_recipe(tmp_path / "run", micro_base))
    trainer.setup()
    try:
        with one_broken_image(trainer) as victim:  # many questions about the one broken image
            stream = trainer.mixture.examples(0)
            for _ in range(4):
                trainer.next_batch(stream)
    finally:
        trainer.close()
    assert len(trainer.skipped) == 1 and victim.name in trainer.skipped[0]
