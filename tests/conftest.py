"""Shared fixtures: an isolated cache, no hub, and one tiny base built once per session."""
from __future__ import annotations

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


SMALL_DATA = ["data.train_images=48", "data.eval_images=12", "data.image_size=32"]


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
