"""Held-out evaluation per task: greedy answers, then VQAv2 accuracy or COCO caption metrics."""
from __future__ import annotations

import torch

from mmagent.images import ImageError, load_image
from mmagent.train.metrics.caption import caption_scores
from mmagent.train.metrics.vqa import vqa_accuracy

EVAL_BATCH = 32
VQA_MAX_NEW_TOKENS = 8  # VQAv2 answers are one to three words


def predict(vlm, records: list[dict], soft_prompt, max_new_tokens: int, device) -> list[str | None]:
    """Greedy answers for records; None where the image could not be read."""
    n_soft = 0 if soft_prompt is None else soft_prompt.shape[1]
    out: list[str | None] = []
    for i in range(0, len(records), EVAL_BATCH):
        chunk, images, prompts, slots = records[i:i + EVAL_BATCH], [], [], []
        for j, r in enumerate(chunk):
            try:
                images.append(load_image(r["image_path"]))
            except ImageError:
                continue
            prompts.append(vlm.encode(r["instruction"], r["input"], None, n_soft).input_ids)
            slots.append(j)
        answers: list[str | None] = [None] * len(chunk)
        if prompts:
            ids = vlm.generate(vlm.pixels(images).to(device), prompts, max_new_tokens, soft_prompt)
            for j, toks in zip(slots, ids):
                answers[j] = vlm.tokenizer.decode(toks, skip_special_tokens=True).strip()
        out += answers
    return out


def evaluate_tasks(vlm, tasks, eval_records: dict, soft_prompt, max_new_tokens: int, device) -> dict:
    results = {}
    with torch.no_grad():
        for task in tasks:
            recs = eval_records[task.name]
            n_tokens = max_new_tokens if task.kind == "caption" else VQA_MAX_NEW_TOKENS
            preds = predict(vlm, recs, soft_prompt, n_tokens, device)
            ok = [(r, p) for r, p in zip(recs, preds) if p is not None]
            if task.kind in ("vqa", "match"):  # matching is scored like a yes/no VQA question
                acc = sum(vqa_accuracy(p, r["references"]) for r, p in ok) / max(1, len(ok))
                metrics = {"vqa_accuracy": 100 * acc}
            else:
                metrics = caption_scores({i: p for i, (r, p) in enumerate(ok)},
                                         {i: r["references"] for i, (r, p) in enumerate(ok)})
            metrics["n"] = len(ok)
            metrics["examples"] = [{"input": r["input"], "prediction": p, "reference": r["output"]} for r, p in ok[:5]]
            results[task.name] = metrics
    return results
