"""Readers for the official formats, all producing one record shape: the unified instruction example.

    {"image_path", "instruction", "input", "output", "task", "references"}

`references` keeps every ground truth (COCO's captions of the image, VQAv2's ten answers) for scoring.
"""
from __future__ import annotations

import json
from pathlib import Path

CAPTION_INSTRUCTION = "Describe the image."
VQA_INSTRUCTION = "Answer the question with a single word or number."
MATCH_INSTRUCTION = "Does this caption describe the image? Answer yes or no."


def default_instruction(kind: str) -> str:
    return {"caption": CAPTION_INSTRUCTION, "match": MATCH_INSTRUCTION}.get(kind, VQA_INSTRUCTION)


class DataError(ValueError):
    pass


def _read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file `{path}` does not exist; check the path in the recipe's [[tasks]] table")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{what} file `{path}` is not valid JSON ({e})") from e


def _require(obj: dict, keys: tuple[str, ...], path, what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{what} file `{path}` lacks {', '.join(missing)}; is it the official format?")


def coco_captions(captions_json, images_dir, task: str = "caption", instruction: str = "") -> list[dict]:
    """One training record per caption; every caption of the image kept as references."""
    data = _read_json(captions_json, "COCO captions")
    _require(data, ("images", "annotations"), captions_json, "COCO captions")
    by_image: dict[int, list[str]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"].strip())
    out = []
    for img in data["images"]:
        refs = by_image.get(img["id"], [])
        for cap in refs:
            out.append({"image_path": str(Path(images_dir) / img["file_name"]), "image_id": img["id"],
                        "instruction": instruction or CAPTION_INSTRUCTION, "input": "", "output": cap,
                        "task": task, "references": refs})
    return out


def caption_matching(captions_json, images_dir, task: str = "match", instruction: str = "") -> list[dict]:
    """BLIP-2's image-text matching as instructions: a caption of this image (yes) or of another one (no).

    Negatives come from the image `n // 2` places further on, a fixed pairing, so no RNG is involved.
    """
    records = coco_captions(captions_json, images_dir, task)
    by_image: dict[int, list[dict]] = {}
    for r in records:
        by_image.setdefault(r["image_id"], []).append(r)
    ids = sorted(by_image)
    out = []
    for i, image_id in enumerate(ids):
        other = by_image[ids[(i + max(1, len(ids) // 2)) % len(ids)]]
        for j, r in enumerate(by_image[image_id]):
            positive = j % 2 == 0 or len(ids) == 1
            caption = r["output"] if positive else other[j % len(other)]["output"]
            answer = "yes" if positive else "no"
            out.append({**r, "instruction": instruction or MATCH_INSTRUCTION, "input": caption, "output": answer,
                        "references": [answer] * 10})
    return out


def vqa_v2(questions_json, annotations_json, images_dir, task: str = "vqa", instruction: str = "",
           file_pattern: str | None = None) -> list[dict]:
    """VQAv2 questions joined with their annotations; output is the most common answer."""
    qs = _read_json(questions_json, "VQAv2 questions")
    anns = _read_json(annotations_json, "VQAv2 annotations")
    _require(qs, ("questions",), questions_json, "VQAv2 questions")
    _require(anns, ("annotations",), annotations_json, "VQAv2 annotations")
    by_qid = {a["question_id"]: a for a in anns["annotations"]}
    subtype = qs.get("data_subtype", "train2014")
    pattern = file_pattern or f"COCO_{subtype}_{{image_id:012d}}"
    files = _image_files(images_dir)
    out = []
    for q in qs["questions"]:
        a = by_qid.get(q["question_id"])
        if a is None:
            continue
        stem = pattern.format(image_id=q["image_id"])
        out.append({"image_path": str(files.get(stem, Path(images_dir) / f"{stem}.jpg")),
                    "image_id": q["image_id"], "question_id": q["question_id"],
                    "instruction": instruction or VQA_INSTRUCTION, "input": q["question"],
                    "output": a["multiple_choice_answer"], "task": task,
                    "answer_type": a.get("answer_type", ""),
                    "references": [x["answer"] for x in a["answers"]]})
    return out


def _image_files(images_dir) -> dict[str, Path]:
    """Stem -> path, so real COCO (.jpg) and the shapes world (.png) resolve the same way."""
    d = Path(images_dir)
    if not d.is_dir():
        raise DataError(f"image folder `{d}` does not exist; set `images` / `eval_images` in the task")
    return {p.stem: p for p in d.iterdir()}


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"instruction file `{path}` does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"`{path}` line {n} is not JSON ({e})") from e
        missing = {"image_path", "instruction", "output"} - rec.keys()
        if missing:
            raise DataError(f"`{path}` line {n} lacks {', '.join(sorted(missing))}")
        rec.setdefault("input", "")
        rec.setdefault("references", [rec["output"]])
        out.append(rec)
    return out


def write_jsonl(records: list[dict], path) -> None:
    from mmagent.files import atomic_write_bytes
    text = "".join(json.dumps({k: r[k] for k in ("image_path", "instruction", "input", "output", "task",
                                                  "references") if k in r}) + "\n" for r in records)
    atomic_write_bytes(path, text.encode())
