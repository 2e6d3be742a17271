"""Readers for the official formats, all producing one record shape: the unified instruction example.

    {"image_path", "instruction", "input", "output", "task", "references"}

`references` keeps every ground truth (COCO's captions of the image, VQAv2's ten answers) for scoring.
"""
from __future__ import annotations

import json
from pathlib import Path

from mmagent.prompt import CAPTION_INSTRUCTION, MATCH_INSTRUCTION, VQA_INSTRUCTION


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
    if not isinstance(obj, dict):
        raise DataError(f"{what} file `{path}` holds a JSON {type(obj).__name__}, not an object; is it the official "
                        "format?")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{what} file `{path}` lacks {', '.join(missing)}; is it the official format?")
    for k in keys:
        if not isinstance(obj[k], list):
            raise DataError(f"{what} file `{path}`: `{k}` is a {type(obj[k]).__name__}, expected a list; is it the "
                            "official format?")


class DataWarning(UserWarning):
    """Something left out of the records on purpose (e.g. an annotation for an image the file does not
    list); the message says how many and why. `mmagent data prepare` prints these as `warning:` lines."""


def _where(section: str, i: int, item, id_key: str) -> str:
    ident = item.get(id_key) if isinstance(item, dict) else None
    return f"{section}[{i}]" + (f" ({id_key} {ident!r})" if ident is not None else "")


def _field(item, key: str, path, what: str, section: str, i: int, id_key: str, fix: str):
    if not isinstance(item, dict):
        raise DataError(f"{what} file `{path}`: {section}[{i}] is a {type(item).__name__}, not an object; {fix}")
    if key not in item:
        raise DataError(f"{what} file `{path}`: {_where(section, i, item, id_key)} lacks `{key}`; {fix}")
    return item[key]


def _int_id(value, path, what: str, where: str, key: str) -> int:
    """Official COCO / VQAv2 ids are JSON numbers; a string id would silently never match."""
    if isinstance(value, bool) or not isinstance(value, int):
        hint = f" (write it as the number {value})" if isinstance(value, str) and value.strip().isdigit() else ""
        raise DataError(f"{what} file `{path}`: {where} has {key} {value!r}, a {type(value).__name__}; ids are "
                        f"whole numbers in the official format{hint}")
    return value


def _text(value, path, what: str, where: str, key: str, fix: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "null" if value is None else "empty" if isinstance(value, str) else f"a {type(value).__name__}"
        raise DataError(f"{what} file `{path}`: {where} has `{key}` {got}, expected text; {fix}")
    return value


def _warn(message: str) -> None:
    import warnings
    warnings.warn(DataWarning(message), stacklevel=3)


def _images_dir(images_dir) -> Path:
    """The image folder as an absolute path, so records work from any working directory."""
    import os
    d = Path(images_dir)
    if not d.is_dir():
        raise DataError(f"image folder `{d}` does not exist; set `images` / `eval_images` in the task "
                        "(`--images` for `mmagent data prepare`) to the folder holding the image files")
    return Path(os.path.abspath(d))


def coco_captions(captions_json, images_dir, task: str = "caption", instruction: str = "") -> list[dict]:
    """One training record per caption; every caption of the image kept as references.

    A malformed entry (missing or null caption / file_name / id, string ids) is a DataError naming the file
    and the entry. Captions of images the file does not list, and listed images without a caption, are left
    out with a DataWarning giving their count; if no caption matches any image, that is a DataError."""
    what = "COCO captions"
    data = _read_json(captions_json, what)
    _require(data, ("images", "annotations"), captions_json, what)
    folder = _images_dir(images_dir)
    fix_ann = "each annotation needs `image_id` and a `caption` text, as in the official captions_*.json"
    fix_img = "each image needs `id` and `file_name`, as in the official captions_*.json"
    images: dict[int, str] = {}
    for i, img in enumerate(data["images"]):
        where = _where("images", i, img, "id")
        image_id = _int_id(_field(img, "id", captions_json, what, "images", i, "id", fix_img), captions_json, what,
                           where, "id")
        name = _text(_field(img, "file_name", captions_json, what, "images", i, "id", fix_img), captions_json,
                     what, where, "file_name", fix_img)
        if image_id in images:
            raise DataError(f"{what} file `{captions_json}`: {where} repeats image id {image_id}; ids must be "
                            "unique")
        images[image_id] = name
    by_image: dict[int, list[str]] = {}
    unknown = 0
    for i, a in enumerate(data["annotations"]):
        where = _where("annotations", i, a, "id")
        image_id = _int_id(_field(a, "image_id", captions_json, what, "annotations", i, "id", fix_ann),
                           captions_json, what, where, "image_id")
        caption = _text(_field(a, "caption", captions_json, what, "annotations", i, "id", fix_ann), captions_json,
                        what, where, "caption", "fix or remove that annotation").strip()
        if image_id not in images:
            unknown += 1
            continue
        by_image.setdefault(image_id, []).append(caption)
    if data["annotations"] and not by_image:
        raise DataError(f"{what} file `{captions_json}`: none of its {len(data['annotations'])} captions is for an "
                        "image in its `images` list; is the file complete?")
    if unknown:
        _warn(f"{what} file `{captions_json}`: left out {unknown} caption(s) whose image_id is not in its `images` "
              "list")
    without = sum(1 for image_id in images if image_id not in by_image)
    if without:
        _warn(f"{what} file `{captions_json}`: {without} image(s) have no caption and give no record")
    out = []
    for image_id, name in images.items():
        refs = by_image.get(image_id, [])
        for cap in refs:
            out.append({"image_path": str(folder / name), "image_id": image_id,
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


def _answers(a, path, where: str) -> list[str]:
    fix = ('expected a list of {"answer": "..."} objects as in the official v2_mscoco_*_annotations.json; '
           "fix or remove that annotation")
    answers = a["answers"]
    if not isinstance(answers, list) or not answers:
        got = "empty" if isinstance(answers, list) else f"a {type(answers).__name__}"
        raise DataError(f"VQAv2 annotations file `{path}`: {where} has `answers` {got}; {fix}")
    out = []
    for j, x in enumerate(answers):
        if not isinstance(x, dict) or not isinstance(x.get("answer"), str):
            got = f"the {type(x).__name__} {x!r}" if not isinstance(x, dict) else f"{x!r} (no `answer` text)"
            raise DataError(f"VQAv2 annotations file `{path}`: {where} answers[{j}] is {got}; {fix}")
        out.append(x["answer"])
    return out


def vqa_v2(questions_json, annotations_json, images_dir, task: str = "vqa", instruction: str = "",
           file_pattern: str | None = None) -> list[dict]:
    """VQAv2 questions joined with their annotations; output is the most common answer.

    A malformed entry (missing question / answers / ids, answers as plain strings, string ids) is a
    DataError naming the file and the entry. Questions without an annotation (and annotations without a
    question) are left out with a DataWarning giving their count; if none match, that is a DataError."""
    qs = _read_json(questions_json, "VQAv2 questions")
    anns = _read_json(annotations_json, "VQAv2 annotations")
    _require(qs, ("questions",), questions_json, "VQAv2 questions")
    _require(anns, ("annotations",), annotations_json, "VQAv2 annotations")
    files = _image_files(images_dir)
    folder = _images_dir(images_dir)
    fix_a = "each annotation needs question_id, answers and multiple_choice_answer, as in the official file"
    fix_q = "each question needs question_id, image_id and question, as in the official file"
    by_qid: dict[int, tuple[dict, list[str], str]] = {}
    for i, a in enumerate(anns["annotations"]):
        qid = _field(a, "question_id", annotations_json, "VQAv2 annotations", "annotations", i, "question_id", fix_a)
        where = _where("annotations", i, a, "question_id")
        qid = _int_id(qid, annotations_json, "VQAv2 annotations", where, "question_id")
        _field(a, "answers", annotations_json, "VQAv2 annotations", "annotations", i, "question_id", fix_a)
        answers = _answers(a, annotations_json, where)
        best = _text(_field(a, "multiple_choice_answer", annotations_json, "VQAv2 annotations", "annotations", i,
                            "question_id", fix_a), annotations_json, "VQAv2 annotations", where,
                     "multiple_choice_answer", fix_a)
        by_qid[qid] = (a, answers, best)
    subtype = qs.get("data_subtype", "train2014")
    pattern = file_pattern or f"COCO_{subtype}_{{image_id:012d}}"
    out, unmatched, seen = [], 0, set()
    for i, q in enumerate(qs["questions"]):
        where = _where("questions", i, q, "question_id")
        qid = _int_id(_field(q, "question_id", questions_json, "VQAv2 questions", "questions", i, "question_id",
                             fix_q), questions_json, "VQAv2 questions", where, "question_id")
        image_id = _int_id(_field(q, "image_id", questions_json, "VQAv2 questions", "questions", i, "question_id",
                                  fix_q), questions_json, "VQAv2 questions", where, "image_id")
        question = _text(_field(q, "question", questions_json, "VQAv2 questions", "questions", i, "question_id",
                                fix_q), questions_json, "VQAv2 questions", where, "question",
                         "fix or remove that question")
        if qid not in by_qid:
            unmatched += 1
            continue
        seen.add(qid)
        a, answers, best = by_qid[qid]
        stem = pattern.format(image_id=image_id)
        out.append({"image_path": str(files.get(stem, folder / f"{stem}.jpg")),
                    "image_id": image_id, "question_id": qid,
                    "instruction": instruction or VQA_INSTRUCTION, "input": question,
                    "output": best, "task": task,
                    "answer_type": a.get("answer_type", ""), "question_type": a.get("question_type", ""),
                    "references": answers})
    if qs["questions"] and not out:
        raise DataError(f"no question of `{questions_json}` has an annotation in `{annotations_json}` (question_ids "
                        "differ); are they the same split (e.g. both train2014)?")
    if unmatched:
        _warn(f"VQAv2: left out {unmatched} question(s) of `{questions_json}` without an annotation in "
              f"`{annotations_json}`")
    if len(by_qid) > len(seen):
        _warn(f"VQAv2: {len(by_qid) - len(seen)} annotation(s) of `{annotations_json}` have no question in "
              f"`{questions_json}` and give no record")
    return out


def _image_files(images_dir) -> dict[str, Path]:
    """Stem -> absolute path, so real COCO (.jpg) and the shapes world (.png) resolve the same way."""
    d = _images_dir(images_dir)
    return {p.stem: p for p in d.iterdir()}


def missing_images(records: list[dict]) -> list[str]:
    """Image paths the records name that are not files."""
    return sorted({r["image_path"] for r in records if not Path(r["image_path"]).is_file()})


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
    """Write the unified JSONL atomically; image paths are written absolute, so the file works from any
    working directory."""
    import os
    from mmagent.files import atomic_write_bytes
    path = Path(path)
    if path.is_dir():
        raise DataError(f"output `{path}` is a folder; give a file name, e.g. {path / 'train.jsonl'}")
    if path.parent.exists() and not path.parent.is_dir():
        raise DataError(f"output `{path}`: `{path.parent}` is a file, not a folder; give another output path")
    keys = ("image_path", "instruction", "input", "output", "task", "references")
    text = "".join(json.dumps({k: os.path.abspath(r[k]) if k == "image_path" else r[k] for k in keys if k in r})
                   + "\n" for r in records)
    atomic_write_bytes(path, text.encode())
