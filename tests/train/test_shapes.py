import hashlib
import json

from mmagent.train.data.records import caption_matching, coco_captions, vqa_v2
from mmagent.train.data.shapes import write_world


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_world(tmp_path / "a", 10, 4, seed=1, image_size=32)
    b = write_world(tmp_path / "b", 10, 4, seed=1, image_size=32)
    c = write_world(tmp_path / "c", 10, 4, seed=2, image_size=32)
    assert digest(a) == digest(b) != digest(c)


def test_official_formats(tmp_path):
    root = write_world(tmp_path, 8, 4, image_size=32)
    caps = json.loads((root / "annotations/captions_train2014.json").read_text())
    assert {"info", "licenses", "images", "annotations"} <= caps.keys()
    per_image = {}
    for a in caps["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a["caption"])
    assert all(len(v) == 5 for v in per_image.values()) and len(per_image) == 8
    qs = json.loads((root / "annotations/v2_OpenEnded_mscoco_train2014_questions.json").read_text())
    anns = json.loads((root / "annotations/v2_mscoco_train2014_annotations.json").read_text())
    assert qs["task_type"] == "Open-Ended" and qs["data_subtype"] == "train2014"
    for a in anns["annotations"]:
        assert len(a["answers"]) == 10
        assert a["answer_type"] in ("yes/no", "number", "other")
        assert a["question_type"]
    assert {q["question_id"] for q in qs["questions"]} == {a["question_id"] for a in anns["annotations"]}


def test_held_out_split_uses_other_images(tmp_path):
    root = write_world(tmp_path, 8, 4, image_size=32)
    train = coco_captions(root / "annotations/captions_train2014.json", root / "train2014")
    val = vqa_v2(root / "annotations/v2_OpenEnded_mscoco_val2014_questions.json",
                 root / "annotations/v2_mscoco_val2014_annotations.json", root / "val2014")
    assert val and train
    assert not {r["image_path"] for r in train} & {r["image_path"] for r in val}
    assert all(r["image_path"].endswith(".png") for r in val)


def test_every_vqa_answer_is_a_word_stage_one_teaches(tmp_path):
    """A builtin base's LLM learns its words from stage 1 alone (recipes/align.toml: captions and image-text
    matching): an answer neither says (it was "0") is one the VQA adapter has to learn from nothing, and in
    practice never did."""
    root = write_world(tmp_path, 40, 4, image_size=32)
    ann = root / "annotations"
    stage1 = (coco_captions(ann / "captions_train2014.json", root / "train2014")
              + caption_matching(ann / "captions_train2014.json", root / "train2014"))
    words = {w.strip(".,:") for r in stage1 for w in r["output"].split()}
    answers = {r["output"] for r in vqa_v2(ann / "v2_OpenEnded_mscoco_train2014_questions.json",
                                           ann / "v2_mscoco_train2014_annotations.json", root / "train2014")}
    assert "0" in answers and answers <= words, answers - words
