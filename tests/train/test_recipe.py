import re
from pathlib import Path

import pytest

from mmagent.train.recipe import RecipeError, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.tasks, path
    assert path.read_text().startswith("# mmagent "), "each recipe opens with the command that runs it"


def test_all_problems_reported_at_once_with_fixes(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nstepz = 3\nlr = -1\n[lora]\nr = "eight"\n[[tasks]]\nname = "x"\nkind = "vqaa"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    text = str(e.value)
    assert "bad.toml" in text
    assert "`train.stepz`: unknown key; did you mean `train.steps`?" in text
    assert "`train.lr`" in text and "positive" in text
    assert "`lora.r`: expected an integer" in text
    assert "`tasks[0].kind`" in text and "caption, vqa" in text
    assert len(e.value.problems) == 4


def test_broken_toml_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[train\nsteps = 1\n")
    with pytest.raises(RecipeError, match=r"(?s)broken.toml.*not valid TOML.*line 1"):
        load_recipe(bad)


def test_missing_recipe_lists_shipped_ones(tmp_path):
    with pytest.raises(RecipeError, match="vqa.toml"):
        load_recipe(tmp_path / "nope.toml")


def test_overrides_are_typed_and_validated():
    r = load_recipe(ROOT / "recipes/vqa.toml", ["train.steps=7", "lora.llm=[\"q_proj\"]", "model.base=some/dir"])
    assert r.train.steps == 7 and r.lora.llm == ["q_proj"] and r.model.base == "some/dir"
    with pytest.raises(RecipeError, match="train.steps"):
        load_recipe(ROOT / "recipes/vqa.toml", ["train.steps=zero"])


def test_unknown_section_suggests_nearest():
    with pytest.raises(RecipeError, match=r"did you mean `\[train\]`"):
        recipe_from_dict({"trian": {}, "tasks": [{"name": "v", "kind": "vqa"}]})


def test_multitask_ratio_is_two_to_one():
    r = load_recipe(ROOT / "recipes/multitask.toml")
    ratios = {t.name: t.ratio for t in r.tasks}
    assert ratios == {"caption": 2.0, "vqa": 1.0}


def test_counts_and_intervals_are_validated():
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "recipes/vqa.toml", ["train.log_every=0", "train.eval_every=-1", "train.warmup_steps=-2",
                                                "train.checkpoint_every=-5", "data.max_pixels=0",
                                                "data.train_images=0", "data.eval_images=-1", "data.image_size=0",
                                                "tasks.0.max_eval=-1"])
    text = str(e.value)
    for key in ("train.log_every", "train.eval_every", "train.warmup_steps", "train.checkpoint_every",
                "data.max_pixels", "data.train_images", "data.eval_images", "data.image_size", "tasks[0].max_eval"):
        assert f"`{key}`" in text, key
    assert len(e.value.problems) == 9
    r = load_recipe(ROOT / "recipes/vqa.toml", ["train.eval_every=0", "train.warmup_steps=0",
                                                "train.checkpoint_every=0", "tasks.0.max_eval=0"])
    assert r.train.checkpoint_every == 0 and r.tasks[0].max_eval == 0


def test_overrides_that_cannot_be_set_are_problems_like_the_others():
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "recipes/vqa.toml", ["tasks.3.name=x", "train.steps.x=1", "tasks.first.name=x",
                                                "train.lr=-1", "nokey"])
    text = str(e.value)
    assert "vqa.toml" in text and "Traceback" not in text
    assert "`tasks.3.name=x`: `tasks` has 1 entry, so there is no `tasks.3`" in text
    assert re.search(r"`train.steps.x=1`: `train.steps` is a value \(\d+\), not a table", text)
    assert "`tasks.first.name=x`: `tasks` is a list: index it with a number" in text
    assert "`train.lr`" in text and "`nokey`: expected key=value" in text
    assert len(e.value.problems) == 5


def test_a_recipe_that_is_not_utf8_names_the_file(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[run]\nname = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(RecipeError, match=r"(?s)latin1.toml.*not UTF-8 text: byte 0xe9 at line 2.*save the file as "
                                          r"UTF-8"):
        load_recipe(bad)


def test_compile_with_cuda_graphs_is_refused_naming_the_faster_pair():
    with pytest.raises(RecipeError, match="cuda_graphs with train.fused_ops"):
        load_recipe(ROOT / "recipes/vqa.toml", ["train.compile=true", "train.cuda_graphs=true"])
    for alone in ("train.compile=true", "train.cuda_graphs=true"):
        load_recipe(ROOT / "recipes/vqa.toml", [alone])  # each on its own is fine
