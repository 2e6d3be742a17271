"""From a recipe's [[tasks]] to records: resolve builtin:shapes paths, read the official files, check images."""
from __future__ import annotations

from pathlib import Path

from mmagent.files import cache_root
from mmagent.train.data.records import (DataError, caption_matching, coco_captions, missing_images, read_jsonl,
                                        vqa_v2)


def data_root() -> Path:
    return cache_root() / "data"


def shapes_files(data_cfg) -> dict[str, str]:
    """Write (once) and locate the builtin:shapes world for these settings."""
    from mmagent.train.data.shapes import write_world
    root = data_root() / (f"shapes-{data_cfg.world}-{data_cfg.train_images}-{data_cfg.eval_images}-"
                          f"{data_cfg.image_size}")
    write_world(root, data_cfg.train_images, data_cfg.eval_images, image_size=data_cfg.image_size,
                world=data_cfg.world)
    ann = root / "annotations"
    return {
        "comp_captions": ann / "captions_valcomp2014.json", "comp_images": root / "valcomp2014",
        "comp_questions": ann / "v2_OpenEnded_mscoco_valcomp2014_questions.json",
        "comp_annotations": ann / "v2_mscoco_valcomp2014_annotations.json",
        "captions": ann / "captions_train2014.json", "images": root / "train2014",
        "questions": ann / "v2_OpenEnded_mscoco_train2014_questions.json",
        "annotations": ann / "v2_mscoco_train2014_annotations.json",
        "eval_captions": ann / "captions_val2014.json", "eval_images": root / "val2014",
        "eval_questions": ann / "v2_OpenEnded_mscoco_val2014_questions.json",
        "eval_annotations": ann / "v2_mscoco_val2014_annotations.json",
    }


def task_records(task, data_cfg, split: str) -> list[dict]:
    """Records of one task for split 'train', 'eval' (held out) or 'comp' (builtin:shapes' compositional
    split: colour x shape pairs never seen in training)."""
    files = {k: getattr(task, k) for k in ("jsonl", "captions", "questions", "annotations", "images",
                                           "eval_captions", "eval_questions", "eval_annotations", "eval_images")}
    if data_cfg.source == "builtin:shapes":
        files = {**{k: str(v) for k, v in shapes_files(data_cfg).items()}, **{k: v for k, v in files.items() if v}}
    pre = {"eval": "eval_", "comp": "comp_"}.get(split, "")

    def need(key: str) -> str:
        if not files.get(pre + key):
            raise DataError(f"task `{task.name}` has no {split} data: set `tasks[].{pre + key}` in the recipe "
                            "(the official file for that split)")
        return files[pre + key]

    if split == "train" and files.get("jsonl"):
        records = read_jsonl(files["jsonl"])
    elif task.kind == "caption":
        records = coco_captions(need("captions"), need("images"), task.name, task.instruction)
    elif task.kind == "match":
        records = caption_matching(need("captions"), need("images"), task.name, task.instruction)
    else:
        records = vqa_v2(need("questions"), need("annotations"), need("images"), task.name, task.instruction)
    if not records:
        raise DataError(f"task `{task.name}` has no {split} examples; check its files")
    return records


def eval_subset(records: list[dict], kind: str, n: int, seed: int = 0) -> list[dict]:
    """Captions: one record per image (all captions are references). VQA: one per question. n = 0 keeps
    all; else a seeded sample spread over every image (round-robin over images, shuffled), not the first n."""
    if kind == "caption":
        seen, out = set(), []
        for r in records:
            if r["image_id"] not in seen:
                seen.add(r["image_id"])
                out.append(r)
        records = out
    if not n or n >= len(records):
        return records
    import random
    by_image: dict = {}
    for r in records:
        by_image.setdefault(r["image_id"], []).append(r)
    rng = random.Random(f"eval-{seed}")
    groups = [rng.sample(g, len(g)) for g in by_image.values()]
    rng.shuffle(groups)
    spread = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
    order = {id(r): i for i, r in enumerate(records)}
    return sorted(spread[:n], key=lambda r: order[id(r)])


def check_images_exist(records: list[dict], task: str) -> None:
    """Every image the records name is a file; the count is of images, not of their captions/questions."""
    missing = missing_images(records)
    if missing:
        named = len({r["image_path"] for r in records})
        raise DataError(f"task `{task}`: {len(missing)} of {named} image file(s) missing, e.g. `{missing[0]}`; "
                        "check the task's `images` folder")


def file_digests(records: list[dict]) -> dict[str, str]:
    """sha256 of each distinct image file's bytes -> one of its paths: equal images under other names
    collide (the shapes world writes identical scenes as identical bytes); unreadable files are left out."""
    from mmagent.files import sha256_file
    out: dict[str, str] = {}
    for path in sorted({r["image_path"] for r in records}):
        try:
            out.setdefault(sha256_file(path), path)
        except OSError:
            continue
    return out
