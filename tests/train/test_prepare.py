import json
from pathlib import Path
import subprocess
import sys

from conftest import ROOT
from mmagent.train.data.shapes import write_world


def test_data_prepare_writes_the_unified_jsonl(tmp_path):
    root = write_world(tmp_path / "w", 6, 2, image_size=32)
    ann = root / "annotations"
    out = tmp_path / "train.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "data", "prepare", str(out),
                          "--captions", str(ann / "captions_train2014.json"),
                          "--questions", str(ann / "v2_OpenEnded_mscoco_train2014_questions.json"),
                          "--annotations", str(ann / "v2_mscoco_train2014_annotations.json"),
                          "--images", str(root / "train2014")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["task"] for r in rows} == {"caption", "vqa"}
    assert len([r for r in rows if r["task"] == "caption"]) == 6 * 5
    for r in rows:
        assert {"image_path", "instruction", "input", "output", "task"} <= r.keys()
        assert (root / "train2014" / r["image_path"].rsplit("/", 1)[1]).exists()
    vqa = next(r for r in rows if r["task"] == "vqa")
    assert vqa["input"].endswith("?") and len(vqa["references"]) == 10


def test_data_prepare_without_annotations_is_refused(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "data", "prepare", str(tmp_path / "x.jsonl"),
                          "--questions", "q.json", "--images", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "--annotations" in res.stderr


# ---- malformed official files: each a DataError naming the file, the entry and the fix ----------------------

import pytest  # noqa: E402

from mmagent.train.data.records import DataError, DataWarning, coco_captions, vqa_v2  # noqa: E402

CAPTIONS = "captions_train2014.json"
QUESTIONS = "v2_OpenEnded_mscoco_train2014_questions.json"
ANSWERS = "v2_mscoco_train2014_annotations.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("prep") / "w", 4, 1, image_size=32)


def edited(world, tmp_path, name: str, edit) -> "Path":
    data = json.loads((world / "annotations" / name).read_text())
    edit(data)
    out = tmp_path / name
    out.write_text(json.dumps(data))
    return out


def prepare(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "data", "prepare", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][1].pop("caption"), r"annotations\[1\] \(id \d+\) lacks `caption`; each annotation needs"),
    (lambda d: d["annotations"][2].update(caption=None), r"annotations\[2\] \(id \d+\) has `caption` null, expected text; fix or remove"),
    (lambda d: d["images"][0].pop("file_name"), r"images\[0\] \(id 1\) lacks `file_name`; each image needs"),
    (lambda d: d["images"][0].update(id="1"), r"images\[0\] \(id '1'\) has id '1', a str; ids are whole numbers .*write it as the number 1"),
    (lambda d: d["annotations"][0].update(image_id="1"), r"annotations\[0\] \(id \d+\) has image_id '1', a str"),
])
def test_malformed_captions_name_the_file_and_the_entry(world, tmp_path, edit, message):
    bad = edited(world, tmp_path, CAPTIONS, edit)
    with pytest.raises(DataError, match=rf"COCO captions file `{bad}`: {message}"):
        coco_captions(bad, world / "train2014")


@pytest.mark.parametrize("which, edit, message", [
    ("a", lambda d: d["annotations"][0].update(answers=[x["answer"] for x in d["annotations"][0]["answers"]]),
     r"annotations\[0\] \(question_id \d+\) answers\[0\] is the str '.*'; expected a list of \{\"answer\": \"...\"\} objects"),
    ("a", lambda d: d["annotations"][1].pop("answers"), r"annotations\[1\] \(question_id \d+\) lacks `answers`"),
    ("a", lambda d: d["annotations"][0].update(answers="yes"), r"annotations\[0\] \(question_id \d+\) has `answers` a str"),
    ("q", lambda d: d["questions"][2].pop("question"), r"questions\[2\] \(question_id \d+\) lacks `question`"),
    ("q", lambda d: d["questions"][0].update(question="  "), r"questions\[0\] \(question_id \d+\) has `question` empty"),
    ("q", lambda d: d["questions"][0].update(question_id=str(d["questions"][0]["question_id"])),
     r"questions\[0\] \(question_id '\d+'\) has question_id '\d+', a str"),
])
def test_malformed_vqa_names_the_file_and_the_entry(world, tmp_path, which, edit, message):
    q, a = world / "annotations" / QUESTIONS, world / "annotations" / ANSWERS
    if which == "a":
        a = edited(world, tmp_path, ANSWERS, edit)
    else:
        q = edited(world, tmp_path, QUESTIONS, edit)
    what = f"VQAv2 annotations file `{a}`" if which == "a" else f"VQAv2 questions file `{q}`"
    with pytest.raises(DataError, match=rf"{what}: {message}"):
        vqa_v2(q, a, world / "train2014")


def test_unknown_ids_are_counted_and_reported(world, tmp_path):
    def orphan(d):
        d["annotations"] += [{"id": 99, "image_id": 424242, "caption": "a lost caption"},
                             {"id": 98, "image_id": 424243, "caption": "another"}]
    bad = edited(world, tmp_path, CAPTIONS, orphan)
    with pytest.warns(DataWarning, match=rf"`{bad}`: left out 2 caption\(s\) whose image_id is not in"):
        records = coco_captions(bad, world / "train2014")
    assert len(records) == 4 * 5
    out = tmp_path / "o.jsonl"
    res = prepare(out, "--captions", bad, "--images", world / "train2014")
    assert res.returncode == 0, res.stderr
    assert "warning:" in res.stderr and "left out 2 caption(s)" in " ".join(res.stderr.split())
    assert len(out.read_text().splitlines()) == 4 * 5
    # nothing joins at all: an error, not an empty file
    q = edited(world, tmp_path, QUESTIONS, lambda d: [x.update(question_id=x["question_id"] + 10**9) for x in d["questions"]])
    with pytest.raises(DataError, match="no question of .* has an annotation .*same split"):
        vqa_v2(q, world / "annotations" / ANSWERS, world / "train2014")


def test_missing_images_folder_is_refused_and_nothing_written(world, tmp_path):
    out = tmp_path / "o.jsonl"
    res = prepare(out, "--captions", world / "annotations" / CAPTIONS, "--images", tmp_path / "nope")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"image folder `{tmp_path / 'nope'}` does not exist" in " ".join(res.stderr.split())
    assert not out.exists()


def test_image_paths_are_absolute_so_the_jsonl_works_from_anywhere(world, tmp_path):
    (tmp_path / "data").symlink_to(world)
    out = tmp_path / "o.jsonl"
    res = prepare(out, "--captions", "data/annotations/" + CAPTIONS, "--questions", "data/annotations/" + QUESTIONS,
                  "--annotations", "data/annotations/" + ANSWERS, "--images", "data/train2014", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["image_path"].startswith("/") and Path(r["image_path"]).is_file() for r in rows)


def test_output_that_is_a_folder_is_a_clear_error(world, tmp_path):
    res = prepare(tmp_path, "--captions", world / "annotations" / CAPTIONS, "--images", world / "train2014")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "Errno" not in res.stderr
    assert f"output `{tmp_path}` is a folder; give a file name" in " ".join(res.stderr.split())
