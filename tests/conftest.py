"""Shared fixtures: an isolated cache, no hub, and one tiny base built once per session."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def mmagent_cache(tmp_path_factory):
    """One cache per test session (tokenizer conversion, shapes worlds), never the user's."""
    path = os.environ.get("MMAGENT_TEST_CACHE") or str(tmp_path_factory.mktemp("mmagent-cache"))
    os.environ["MMAGENT_CACHE"] = path
    return Path(path)


# Fixtures that train or export a model before their first test: the tests using them are the `trains`
# lane; `make test-fast` (pytest -m "not slow and not trains") runs the rest, the unit tests, in a minute or two.
TRAINED_FIXTURES = {"micro_base", "two_runs", "bundle", "agents"}


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.trains)


SMALL_DATA = ["data.train_images=48", "data.eval_images=12", "data.image_size=32"]


@contextlib.contextmanager
def one_broken_image(trainer):
    """The first VQA training image truncated mid-header, with every other example pointing at it;
    restored afterwards. Yields the broken file."""
    victim = Path(trainer.train_records["vqa"][0]["image_path"])
    saved = victim.read_bytes()
    try:
        victim.write_bytes(saved[:40])
        for r in trainer.train_records["vqa"][::2]:
            r["image_path"] = str(victim)
        yield victim
    finally:
        victim.write_bytes(saved)


def small_recipe(tmp: Path, *extra: str, recipe: str = "vqa.toml"):
    from mmagent.train.recipe import load_recipe
    return load_recipe(ROOT / "recipes" / recipe, [f'run.output_dir="{tmp}"', *SMALL_DATA,
                                                  "train.batch_size=4", "train.steps=4", "train.warmup_steps=1",
                                                  "tasks.0.max_eval=4", "train.checkpoint_every=0",
                                                  "train.eval_base=false", *extra])


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory, mmagent_cache) -> Path:
    """A base directory trained for a few steps with method=full: a real saved HF model on disk."""
    from mmagent.train.trainer import Trainer
    out = tmp_path_factory.mktemp("micro-base")
    recipe = small_recipe(out, "model.base=init:tiny", "train.method=full", recipe="align.toml")
    recipe.data.image_size = 64  # the tiny ViT's input size
    Trainer(recipe).run()
    return out / "model"


def train_adapter(out: Path, base: Path, recipe: str, *extra: str) -> Path:
    from mmagent.train.trainer import Trainer
    Trainer(small_recipe(out, f'model.base="{base}"', "data.image_size=64", "train.steps=6", *extra,
                         recipe=recipe)).run()
    return out


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, micro_base) -> list[Path]:
    """A VQA run and a caption run (with a soft prompt) on the micro base."""
    root = tmp_path_factory.mktemp("runs")
    return [train_adapter(root / "vqa", micro_base, "vqa.toml"),
            train_adapter(root / "caption", micro_base, "caption.toml", "soft_prompt.tokens=4")]


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, two_runs) -> Path:
    from mmagent.export.bundle import export_bundle
    out = tmp_path_factory.mktemp("bundles") / "edge"
    export_bundle(two_runs, out, gguf=True, onnx=True, quants=("f16", "q8_0"))
    return out


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory) -> Path:
    import random
    from mmagent.train.data.shapes import draw_scene, sample_scene
    path = tmp_path_factory.mktemp("images") / "scene.png"
    draw_scene(sample_scene(random.Random(0)), 64).save(path)
    return path


@pytest.fixture(scope="module")
def agents(bundle, two_runs):
    """The same two adapters behind both backends: torch (the runs) and edge (their bundle)."""
    from mmagent import Agent
    return {"torch": Agent.load(two_runs), "edge": Agent.load(bundle)}


# The real families' tiny checkpoints, trained through `mmagent train` (and exported) once per session: the
# export tests and the server tests (tests/export/test_families_server.py) share them. They live here, not in
# a tests/export/conftest.py: two conftest modules would both be `conftest`, and `from conftest import ...`
# in the test modules would find the wrong one.
@pytest.fixture(scope="session")
def instructblip_bundle(tmp_path_factory):
    """(run, edge bundle with GGUF + ONNX + merged) of InstructBLIP with Vicuna's SentencePiece tokenizer."""
    from mmagent.export.bundle import export_bundle
    from tiny_checkpoints import instructblip, train_run
    tmp = tmp_path_factory.mktemp("instructblip")
    run = train_run(tmp, instructblip(tmp / "instructblip-vicuna-tiny", tokenizer="spm"), "vqa")
    export_bundle([run], tmp / "bundle", gguf=True, onnx=True, merged=True)
    return run, tmp / "bundle"


@pytest.fixture(scope="session")
def llava_export(tmp_path_factory):
    """(run, edge bundle with GGUF + mmproj + ONNX) of LLaVA-1.5, LoRA on the LLM, projector and vision tower."""
    from mmagent.export.bundle import export_bundle
    from tiny_checkpoints import llava, train_run
    tmp = tmp_path_factory.mktemp("llava")
    run = train_run(tmp, llava(tmp / "llava-1.5-tiny", tokenizer="spm"), "vqa", 'lora.vision=["preset"]')
    export_bundle([run], tmp / "bundle", gguf=True, onnx=True)
    return run, tmp / "bundle"


@pytest.fixture(scope="session")
def blip2_opt_run(tmp_path_factory):
    """The run directory of a VQA adapter (`vqa`) on BLIP-2 + OPT."""
    from tiny_checkpoints import blip2_opt, train_run
    tmp = tmp_path_factory.mktemp("blip2-opt")
    return train_run(tmp, blip2_opt(tmp / "blip2-opt-tiny"), "vqa")


@pytest.fixture(scope="session")
def blip2_t5_run(tmp_path_factory):
    """The run directory of an adapter named `cap` (trained on VQA) on BLIP-2 + Flan-T5."""
    from tiny_checkpoints import blip2_t5, train_run
    tmp = tmp_path_factory.mktemp("blip2-t5")
    return train_run(tmp, blip2_t5(tmp / "blip2-flan-t5-tiny"), "cap")
