import pytest

from mmagent.train.metrics.caption import caption_scores
from mmagent.train.metrics.vqa import normalize, vqa_accuracy


def test_vqa_accuracy_follows_the_official_formula():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("no", ["yes"] * 10) == 0.0
    # two of ten annotators: each leave-one-out subset holds 2 (8 subsets) or 1 (2 subsets) matches
    assert vqa_accuracy("red", ["red", "red"] + ["blue"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy("3", ["3"] * 3 + ["2"] * 7) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)


def test_normalisation_maps_number_words_articles_and_punctuation():
    assert normalize("Two.") == "2"
    assert normalize("A red circle!") == "red circle"
    assert vqa_accuracy("three", ["3"] * 10) == 1.0


def test_caption_scores_rank_a_right_caption_above_a_wrong_one():
    refs = {0: ["a red circle on the left.", "one red circle."], 1: ["two blue squares.", "a picture of two squares."]}
    good = caption_scores({0: "a red circle on the left", 1: "two blue squares"}, refs)
    bad = caption_scores({0: "two blue squares", 1: "a red circle on the left"}, refs)
    assert good["cider"] > bad["cider"] + 50 and good["bleu4"] > bad["bleu4"]
