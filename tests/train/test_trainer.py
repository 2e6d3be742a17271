"""The trainer on a micro base: adapters PEFT can load, exact resume after kill -9, bad input handling."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, one_broken_image, small_recipe
from mmagent.train.data.records import DataError
from mmagent.train.trainer import Trainer


def lora_recipe(tmp, base, *extra):
    return small_recipe(tmp, f'model.base="{base}"', "data.image_size=64", *extra)


def test_adapter_loads_in_plain_peft_and_reproduces_logits(tmp_path, micro_base):
    trainer = Trainer(lora_recipe(tmp_path / "run", micro_base))
    trainer.run()
    batch = trainer.collate([trainer.vlm.encode("Answer.", "is there a circle?", "yes")],
                            [__import__("PIL.Image").Image.new("RGB", (64, 64), (200, 30, 30))])
    trainer.vlm.model.eval()
    with torch.no_grad():
        ours = trainer.vlm.logits(batch)

    # a plain session: transformers + peft only, the HF forward with image placeholders
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    base = AutoModelForImageTextToText.from_pretrained(micro_base)
    model = PeftModel.from_pretrained(base, tmp_path / "run/adapters/vqa").eval()
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"]).logits
    assert torch.allclose(ours, plain, atol=1e-4), (ours - plain).abs().max()
    # and the adapter changed something
    with torch.no_grad(), model.disable_adapter():
        bare = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits
    assert not torch.allclose(bare, plain, atol=1e-4)
    meta = json.loads((tmp_path / "run/adapters/vqa/mmagent_adapter.json").read_text())
    lora = trainer.recipe.lora
    assert meta["parts"] == {"bridge": lora.bridge, "llm": lora.llm, "vision": lora.vision}  # what the recipe adapts
    assert (tmp_path / "run/report.md").exists()
    # `mmagent eval RUN` reloads the saved adapter and scores what the trainer scored
    from rich.console import Console
    from mmagent.train.run import evaluate_run
    saved = json.loads((tmp_path / "run/results.json").read_text())["adapter"]["vqa"]
    again = evaluate_run(tmp_path / "run", False, Console(quiet=True))["adapter"]["vqa"]
    assert again["vqa_accuracy"] == saved["vqa_accuracy"] and again["examples"] == saved["examples"]


def _train_cmd(run_dir, base, *extra):
    from conftest import SMALL_DATA
    return [sys.executable, str(ROOT / "cli.py"), "train", str(ROOT / "recipes/vqa.toml"),
            f'run.output_dir="{run_dir}"', f'model.base="{base}"', *SMALL_DATA, "data.image_size=64",
            "train.batch_size=4", "train.steps=12", "train.checkpoint_every=2", "train.warmup_steps=2",
            "tasks.0.max_eval=2", "train.eval_base=false", *extra]


@pytest.mark.slow
def test_resume_after_kill_9_gives_identical_adapter(tmp_path, micro_base):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(_train_cmd(tmp_path / "full", micro_base), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_train_cmd(tmp_path / "cut", micro_base), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "cut/checkpoints/step-6").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut/adapters").exists()
    again = subprocess.run(_train_cmd(tmp_path / "cut", micro_base) + ["--resume"], env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    a = load_file(tmp_path / "full/adapters/vqa/adapter_model.safetensors")
    b = load_file(tmp_path / "cut/adapters/vqa/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_restart_without_resume_refuses_to_overwrite(tmp_path, micro_base):
    (tmp_path / "run/checkpoints/step-2").mkdir(parents=True)
    (tmp_path / "run/checkpoints/step-2/state.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(lora_recipe(tmp_path / "run", micro_base)).setup()


def test_corrupt_image_mid_run_is_counted_and_skipped(tmp_path, micro_base):
    trainer = Trainer(lora_recipe(tmp_path / "run", micro_base))
    trainer.setup()
    with one_broken_image(trainer) as victim:
        trainer.train()
        results = trainer.finish()
    assert results["skipped_images"] >= 1 and str(victim.name) in trainer.skipped[0]


def test_missing_data_file_is_a_clear_error(tmp_path):
    recipe = small_recipe(tmp_path, "data.source=files", f'tasks.0.questions="{tmp_path}/q.json"',
                          f'tasks.0.annotations="{tmp_path}/a.json"', f'tasks.0.images="{tmp_path}"')
    with pytest.raises(DataError, match=r"q.json` does not exist"):
        Trainer(recipe).setup()


def test_lora_on_missing_module_fails_before_training(tmp_path, micro_base):
    recipe = lora_recipe(tmp_path / "run", micro_base, 'lora.llm=["q_proj", "attn_q"]')
    with pytest.raises(ValueError, match=r"attn_q.*available: down_proj, gate_proj, k_proj, lm_head, o_proj"):
        Trainer(recipe).setup()
    assert not (tmp_path / "run/checkpoints").exists()


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    recipe = small_recipe(tmp_path / "run", "data.source=files", f'tasks.0.jsonl="{tmp_path}/empty.jsonl"')
    with pytest.raises(DataError, match="task `vqa` has no train examples"):
        Trainer(recipe).setup()


def test_cli_reports_recipe_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 1\n")
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "did you mean `train.steps`" in out.stderr and "Traceback" not in out.stderr


def test_missing_held_out_files_name_the_recipe_key(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"image_path": "x.png", "instruction": "i", "output": "o"}\n')
    recipe = small_recipe(tmp_path / "run", "data.source=files", f'tasks.0.jsonl="{tmp_path}/t.jsonl"')
    with pytest.raises(DataError, match=r"no eval data: set `tasks\[\]\.eval_questions`"):
        Trainer(recipe).setup()


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_output_is_ours_unless_verbose(tmp_path, micro_base, mmagent_cache, verbose):
    """Third-party progress bars and warnings stay out of normal output; -v shows them."""
    from conftest import SMALL_DATA
    args = [sys.executable, str(ROOT / "cli.py"), *(["-v"] if verbose else []), "train", str(ROOT / "recipes/vqa.toml"),
            f'run.output_dir="{tmp_path / "run"}"', f'model.base="{micro_base}"', *SMALL_DATA, "data.image_size=64",
            "train.steps=2", "train.batch_size=2", "tasks.0.max_eval=2", "train.checkpoint_every=0",
            "train.eval_base=false", "train.baselines=[]"]
    out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "MMAGENT_CACHE": str(mmagent_cache),
                                                                       "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "held-out scores" in text and "VQA acc" in text
    noise = ("Loading weights" in text) or ("FutureWarning" in text)
    assert noise == verbose, text[-3000:]


def test_full_fine_tuning_in_bf16_evaluates(tmp_path):
    """precision bf16 with some parts fully trained: frozen bf16 parts (the ViT) feed trained fp32 ones (the
    Q-Former); evaluation joins them under autocast as training does, instead of failing on the dtypes."""
    from tiny_checkpoints import RECIPE, instructblip
    from mmagent.train.recipe import load_recipe
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(name="vqa", out=tmp_path / "run", base=instructblip(tmp_path / "base")))
    trainer = Trainer(load_recipe(recipe, ["train.method=full", "train.precision=bf16", 'train.parts=["bridge"]']))
    trainer.setup()
    try:
        assert {p.dtype for p in trainer.params.values()} == {torch.float32}
        assert next(trainer.vlm.model.vision_model.parameters()).dtype == torch.bfloat16
        assert "vqa_accuracy" in trainer.evaluate()["vqa"]
    finally:
        trainer.close()
