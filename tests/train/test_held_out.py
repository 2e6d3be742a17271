"""Held out by content, the controls every evaluation carries, and the cheaper exact losses (issue 7)."""
from __future__ import annotations

import random
import shutil

import pytest
import torch
from PIL import Image

from mmagent.train.data.records import DataError, coco_captions, vqa_v2
from mmagent.train.data.shapes import (HELD_OUT_PAIRS, named_objects, objects_in, scene_key, scenes, split_of,
                                       write_world)
from mmagent.train.data.tasks import eval_subset
from mmagent.train.evaluate import control_images, vqa_metrics


def test_no_held_out_scene_equals_a_training_scene():
    train = {scene_key(s) for s in scenes("train", 2000, 0, "base")}
    for split in ("val", "comp"):
        held = [scene_key(s) for s in scenes(split, 300, 0, "base")]
        assert not train & set(held), f"{split} shares scenes with training"


def test_the_compositional_split_holds_exactly_the_unseen_colour_shape_pairs():
    pairs = lambda split: {(s.colour, s.kind) for sc in scenes(split, 500, 1, "base") for s in sc}
    assert not pairs("train") & HELD_OUT_PAIRS and not pairs("val") & HELD_OUT_PAIRS
    assert all(any((s.colour, s.kind) in HELD_OUT_PAIRS for s in sc) for sc in scenes("comp", 200, 1, "base"))
    assert HELD_OUT_PAIRS <= pairs("comp")


def test_the_split_follows_content_not_drawing_order():
    rng = random.Random(3)
    for _ in range(200):
        scene = scenes("train", 1, rng.randint(0, 10**6), "base")[0]
        assert split_of(list(reversed(scene))) == split_of(scene) == "train"


def test_the_shift_world_shows_what_the_base_world_never_does(tmp_path):
    shift = {(s.colour, s.kind) for sc in scenes("train", 300, 0, "shift") for s in sc}
    assert {"purple", "orange"} <= {c for c, _ in shift} and "cross" in {k for _, k in shift}
    base = {(s.colour, s.kind) for sc in scenes("train", 300, 0, "base") for s in sc}
    assert not {c for c, _ in base} & {"purple", "orange"} and "cross" not in {k for _, k in base}


def test_training_refuses_held_out_images_that_equal_training_images_under_other_names(tmp_path):
    """The guard compares content: a held-out file copied from a training file under a new name fails."""
    from tests.conftest import small_recipe
    from mmagent.train.trainer import Trainer
    recipe = small_recipe(tmp_path / "run", "model.base=init:tiny")
    trainer = Trainer(recipe)
    trainer._setup_data()  # a clean world passes
    leaked = trainer.eval_records["eval"]["vqa"][0]["image_path"]
    shutil.copyfile(trainer.train_records["vqa"][0]["image_path"], leaked)
    with pytest.raises(DataError, match="show exactly what a training image shows"):
        trainer._check_disjoint()


def test_the_evaluation_sample_is_spread_over_every_image():
    records = [{"image_id": i // 5, "q": i} for i in range(500)]  # 100 images, 5 questions each
    sample = eval_subset(records, "vqa", 100, seed=0)
    assert len(sample) == 100 and len({r["image_id"] for r in sample}) == 100
    assert eval_subset(records, "vqa", 0) == records and sample == eval_subset(records, "vqa", 100, seed=0)


def _images(n):
    return [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(n)]


def test_the_shuffled_control_never_shows_a_record_its_own_image():
    records = [{"image_path": f"im{i % 7}.png"} for i in range(21)]
    images = [_images(7)[i % 7] for i in range(21)]
    shuffled = control_images(records, images, "shuffled", seed=0)
    for r, own, other in zip(records, images, shuffled):
        assert other is not own and other.getpixel((0, 0)) != own.getpixel((0, 0))
    blank = control_images(records, images, "blank")
    assert len({im.getpixel((0, 0)) for im in blank}) == 1 and all(lo == hi for lo, hi in blank[0].getextrema())


def test_vqa_metrics_report_the_controls_the_gain_and_constant_answers():
    records = [{"references": [a] * 10, "answer_type": "yes/no", "question_type": "is there a"}
               for a in ("yes", "no", "yes", "no")]
    preds = {"right": ["yes", "no", "yes", "no"], "shuffled": ["yes"] * 4, "blank": ["no"] * 4}
    m = vqa_metrics(records, preds)
    assert (m["vqa_accuracy"], m["shuffled_image"], m["blank_image"], m["image_gain"]) == (100, 50, 50, 50)
    t = m["by_answer_type"]["yes/no"]
    assert t["top_answer_share"] == 50 and m["by_question_type"]["is there a"]["n"] == 4


def test_caption_object_recall_reads_the_scene_from_its_references(tmp_path):
    root = write_world(tmp_path, 6, 4, image_size=32)
    recs = coco_captions(root / "annotations/captions_val2014.json", root / "val2014")
    refs = recs[0]["references"]
    objects = objects_in(refs)
    assert objects and all(named_objects(c, objects) == len(objects) for c in refs)
    assert named_objects("a picture of nothing", objects) == 0


def test_vqa_records_carry_answer_and_question_types(tmp_path):
    root = write_world(tmp_path, 6, 4, image_size=32)
    recs = vqa_v2(root / "annotations/v2_OpenEnded_mscoco_val2014_questions.json",
                  root / "annotations/v2_mscoco_val2014_annotations.json", root / "val2014")
    assert {r["answer_type"] for r in recs} == {"yes/no", "number", "other"}
    assert "how many" in {r["question_type"] for r in recs}


def test_the_restricted_softmax_is_the_full_softmax_over_those_tokens():
    """VLM.loss with `vocab` equals the full-vocabulary loss with every other token masked out."""
    from mmagent.train.builtin import init_base
    from mmagent.train.vlm import VLM
    model, tok, proc = init_base("tiny")
    vlm = VLM(model, tok, proc)
    encoded = [vlm.encode("Describe the image.", "", "a red circle."), vlm.encode("Describe the image.", "", "two.")]
    n = max(len(e.input_ids) for e in encoded)
    batch = {"input_ids": torch.tensor([e.input_ids + [0] * (n - len(e.input_ids)) for e in encoded]),
             "labels": torch.tensor([e.labels + [-100] * (n - len(e.labels)) for e in encoded]),
             "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * (n - len(e.input_ids)) for e in encoded]),
             "pixel_values": vlm.pixels(_images(2))}
    answer_ids = sorted({int(i) for i in batch["labels"].flatten() if i != -100} | {5, 77})
    vocab = torch.tensor(answer_ids)
    with torch.no_grad():
        restricted = vlm.loss(batch, vocab=vocab)
        logits = vlm.logits(batch)[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        masked = logits[keep].masked_fill(~torch.isin(torch.arange(logits.shape[-1]), vocab), float("-inf"))
        expected = torch.nn.functional.cross_entropy(masked, labels[keep])
    assert torch.allclose(restricted, expected, atol=1e-5)


def test_evaluation_applies_the_recipes_pixel_limit_as_training_does(tmp_path, monkeypatch):
    """data.max_pixels reaches the held-out images too: one over the limit is left out (counted), never decoded."""
    from PIL import ImageFile

    from mmagent.train.evaluate import load_eval_images
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    Image.new("RGB", (10, 10)).save(small)
    Image.new("RGB", (40, 30)).save(big)  # 1,200 pixels
    records = [{"image_path": str(small)}, {"image_path": str(big)}, {"image_path": str(big)}]
    assert [im is None for im in load_eval_images(records, 40_000_000)] == [False, False, False]
    decode = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a refused image")
                        if self.size == (40, 30) else decode(self))
    assert [im is None for im in load_eval_images(records, 1_000)] == [False, True, True]
