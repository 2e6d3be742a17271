"""Held-out evaluation per task, with its controls: greedy answers to the right image, to a shuffled one
(another held-out scene) and to a blank one (no image information), scored by VQAv2's official accuracy
or COCO's caption metrics. Right minus shuffled is the image gain: what the model got from looking."""
from __future__ import annotations

import random
from collections import Counter

import torch
from PIL import Image

from mmagent.images import ImageError, load_image
from mmagent.train.metrics.caption import caption_scores
from mmagent.train.metrics.vqa import vqa_accuracy

EVAL_BATCH = 32
VQA_MAX_NEW_TOKENS = 8  # VQAv2 answers are one to three words
CONTROLS = ("right", "shuffled", "blank")


def load_eval_images(records: list[dict], max_pixels: int) -> list[Image.Image | None]:
    """Each record's image, None where it cannot be read (counted, never silently dropped)."""
    cache: dict[str, Image.Image | None] = {}
    for r in records:
        if r["image_path"] not in cache:
            try:
                cache[r["image_path"]] = load_image(r["image_path"], max_pixels)
            except ImageError:
                cache[r["image_path"]] = None
    return [cache[r["image_path"]] for r in records]


def control_images(records: list[dict], images: list, control: str, seed: int = 0) -> list:
    """The images a control shows: each record's own, another held-out image's (a seeded derangement over
    distinct images), or one blank image of the held-out images' mean colour."""
    if control == "right":
        return images
    readable = [im for im in images if im is not None]
    if control == "blank":
        pixels = [im.resize((1, 1), Image.BOX).getpixel((0, 0)) for im in readable]  # each image's mean colour
        mean = tuple(int(sum(px[c] for px in pixels) / len(pixels)) for c in range(3)) if pixels else (128, 128, 128)
        blank = Image.new("RGB", readable[0].size if readable else (64, 64), mean)
        return [blank if im is not None else None for im in images]
    paths = sorted({r["image_path"] for r, im in zip(records, images) if im is not None})
    if len(paths) < 2:
        return images
    rng = random.Random(f"shuffle-{seed}")
    moved = paths[:]
    rng.shuffle(moved)
    target = {p: moved[(i + 1) % len(moved)] for i, p in enumerate(moved)}  # a cycle: nobody keeps its own
    by_path = {r["image_path"]: im for r, im in zip(records, images)}
    return [by_path[target[r["image_path"]]] if im is not None else None for r, im in zip(records, images)]


def predict(vlm, records: list[dict], images: list, soft_prompt, max_new_tokens: int, device) -> list[str | None]:
    """Greedy answers for records; None where the image could not be read."""
    n_soft = 0 if soft_prompt is None else soft_prompt.shape[1]
    out: list[str | None] = [None] * len(records)
    ready = [i for i, im in enumerate(images) if im is not None]
    for start in range(0, len(ready), EVAL_BATCH):
        chunk = ready[start:start + EVAL_BATCH]
        encoded = [vlm.encode(records[i]["instruction"], records[i]["input"], None, n_soft) for i in chunk]
        ids = vlm.generate(vlm.pixels([images[i] for i in chunk]).to(device), [e.input_ids for e in encoded],
                           max_new_tokens, soft_prompt, vlm.instruction_inputs([e.instruction for e in encoded], device))
        for i, toks in zip(chunk, ids):
            out[i] = vlm.tokenizer.decode(toks, skip_special_tokens=True).strip()
    return out


def rank_predict(vlm, records: list[dict], images: list, candidates: list[str], device) -> list[str | None]:
    """Closed-vocabulary answers: the candidate (answer tokens + end token) with the highest likelihood.

    How a base that was never taught the answer format is scored fairly: it need not produce the format,
    only prefer the right answer among the answers training uses."""
    tok = vlm.tokenizer
    cand = [tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id] for c in candidates]
    out: list[str | None] = [None] * len(records)
    ready = [i for i, im in enumerate(images) if im is not None]
    per_chunk = max(1, EVAL_BATCH // len(cand))
    for start in range(0, len(ready), per_chunk):
        chunk = ready[start:start + per_chunk]
        encoded = [vlm.encode(records[i]["instruction"], records[i]["input"], None) for i in chunk]
        feats = vlm.image_embeds(vlm.pixels([images[i] for i in chunk]).to(device), None,
                                 vlm.instruction_inputs([e.instruction for e in encoded], device))
        best = vlm.answer_logprobs([e.input_ids for e in encoded], feats, cand).argmax(-1)
        for i, b in zip(chunk, best.tolist()):
            out[i] = candidates[b]
    return out


def vqa_metrics(records: list[dict], predictions: dict[str, list]) -> dict:
    """Official accuracy for each control, by answer type and question type, and how constant the
    answers of each answer type are (a type answered by one constant is not being seen)."""
    right = predictions["right"]
    ok = [i for i, p in enumerate(right) if p is not None]

    def acc(preds, idx) -> float:
        return 100 * sum(vqa_accuracy(preds[i], records[i]["references"]) for i in idx) / max(1, len(idx))

    m = {"vqa_accuracy": acc(right, ok), **{f"{c}_image": acc(predictions[c], ok) for c in CONTROLS[1:]}}
    m["image_gain"] = m["vqa_accuracy"] - m["shuffled_image"]
    for field in ("answer_type", "question_type"):
        groups: dict[str, list[int]] = {}
        for i in ok:
            groups.setdefault(records[i].get(field) or "unknown", []).append(i)
        m[f"by_{field}"] = {}
        for name, idx in sorted(groups.items()):
            top, count = Counter(right[i] for i in idx).most_common(1)[0]
            m[f"by_{field}"][name] = {"accuracy": acc(right, idx), "shuffled_image": acc(predictions["shuffled"], idx),
                                      "blank_image": acc(predictions["blank"], idx), "n": len(idx),
                                      "top_answer": top, "top_answer_share": 100 * count / len(idx)}
    return m


def caption_metrics(records: list[dict], predictions: dict[str, list]) -> dict:
    from mmagent.train.data.shapes import named_objects, objects_in
    ok = [i for i, p in enumerate(predictions["right"]) if p is not None]
    refs = {i: records[i]["references"] for i in ok}
    scores = {c: caption_scores({i: predictions[c][i] for i in ok}, refs) for c in CONTROLS}
    m = {**scores["right"], **{f"{c}_image": scores[c] for c in CONTROLS[1:]}}
    m["image_gain"] = scores["right"]["cider"] - scores["shuffled"]["cider"]
    objects = {i: objects_in(records[i]["references"]) for i in ok}
    total = sum(len(o) for o in objects.values())
    if total:  # worlds whose references list each object (builtin:shapes): share of objects named right
        for c in CONTROLS:
            named = sum(named_objects(predictions[c][i], objects[i]) for i in ok)
            key = "object_recall" if c == "right" else f"{c}_image_object_recall"
            m[key] = 100 * named / total
    return m


def evaluate_task(vlm, task, records: list[dict], soft_prompt, max_new_tokens: int, device,
                  max_pixels: int, seed: int = 0, candidates: list[str] | None = None) -> dict:
    """`candidates` (VQA): rank them instead of generating (rank_predict)."""
    images = load_eval_images(records, max_pixels)
    n_tokens = max_new_tokens if task.kind == "caption" else VQA_MAX_NEW_TOKENS
    if candidates and task.kind != "caption":
        predictions = {c: rank_predict(vlm, records, control_images(records, images, c, seed), candidates, device)
                       for c in CONTROLS}
    else:
        predictions = {c: predict(vlm, records, control_images(records, images, c, seed), soft_prompt, n_tokens,
                                  device) for c in CONTROLS}
    metrics = caption_metrics(records, predictions) if task.kind == "caption" else vqa_metrics(records, predictions)
    ok = [i for i, p in enumerate(predictions["right"]) if p is not None]
    metrics["n"] = len(ok)
    metrics["unreadable_images"] = len(records) - len(ok)
    metrics["examples"] = [{"input": records[i]["input"], "prediction": predictions["right"][i],
                            "shuffled_image": predictions["shuffled"][i], "reference": records[i]["output"],
                            "image": records[i]["image_path"], "references": records[i]["references"]}
                           for i in ok[:5]]  # the report's gallery shows these
    return metrics


def evaluate_tasks(vlm, tasks, eval_records: dict, soft_prompt, max_new_tokens: int, device,
                   max_pixels: int = 40_000_000, seed: int = 0, candidates: dict | None = None) -> dict:
    """`candidates`: task -> answers to rank for that task (the fair protocol for a base); else generate."""
    with torch.no_grad():
        return {t.name: evaluate_task(vlm, t, eval_records[t.name], soft_prompt, max_new_tokens, device,
                                      max_pixels, seed, (candidates or {}).get(t.name))
                for t in tasks if eval_records.get(t.name)}


def answer_vocabulary(records: list[dict], size: int = 50) -> list[str]:
    """The `size` most common training answers: the closed vocabulary a base is ranked over."""
    return [a for a, _ in Counter(r["output"] for r in records).most_common(size)]
