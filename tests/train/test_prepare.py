import json
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
