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
