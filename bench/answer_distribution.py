"""What does a model believe the answer is? The mean probability it gives each candidate answer, grouped
by the true answer, for one question type of a VQAv2 split (how docs/RESULTS.md found that the default
could not say "0").

    python bench/answer_distribution.py BASE_DIR [--adapter RUN/adapters/vqa] --world DATA_ROOT \
        [--split train2014] [--question "how many"] [--answers 0 1 2 3] [-n 80]

BASE_DIR is a base model directory (e.g. ~/.cache/mmagent/bases/tiny-*); DATA_ROOT a builtin:shapes world
(~/.cache/mmagent/data/shapes-*) or any folder in the VQAv2 layout (annotations/, <split>/).
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch


def load(base: Path, adapter: Path | None):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    from mmagent.train.vlm import VLM
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).eval()
    return VLM(model, AutoTokenizer.from_pretrained(base), AutoImageProcessor.from_pretrained(base))


@torch.no_grad()
def distribution(vlm, records: list[dict], answers: list[str]) -> dict[str, list[float]]:
    from mmagent.images import load_image
    tok = vlm.tokenizer
    cand = [tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id] for a in answers]
    by_truth = collections.defaultdict(list)
    for r in records:
        e = vlm.encode(r["instruction"], r["input"], None)
        feats = vlm.image_embeds(vlm.pixels([load_image(r["image_path"])]), None, None)
        by_truth[r["output"]].append(vlm.answer_logprobs([e.input_ids], feats, cand)[0].softmax(-1))
    return {k: torch.stack(v).mean(0).tolist() + [len(v)] for k, v in sorted(by_truth.items())}


def main() -> None:
    from mmagent.train.data.records import vqa_v2
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--split", default="train2014")
    ap.add_argument("--question", default="how many")
    ap.add_argument("--answers", nargs="+", default=["0", "1", "2", "3"])
    ap.add_argument("-n", type=int, default=80)
    args = ap.parse_args()
    ann = args.world / "annotations"
    records = vqa_v2(ann / f"v2_OpenEnded_mscoco_{args.split}_questions.json",
                     ann / f"v2_mscoco_{args.split}_annotations.json", args.world / args.split)
    records = [r for r in records if r["input"].startswith(args.question + " ")][: args.n]
    rows = distribution(load(args.base, args.adapter), records, args.answers)
    print("| true answer | n | " + " | ".join(f"P({a})" for a in args.answers) + " |")
    print("|---|---|" + "---|" * len(args.answers))
    for truth, row in rows.items():
        print(f"| {truth} | {int(row[-1])} | " + " | ".join(f"{p:.2f}" for p in row[:-1]) + " |")


if __name__ == "__main__":
    main()
