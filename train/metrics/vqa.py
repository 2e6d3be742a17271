"""VQAv2 accuracy as the official evaluation computes it: normalised answers, min(1, matches/3) averaged
over the ten leave-one-annotator-out subsets."""
from __future__ import annotations

import re

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize(answer: str) -> str:
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _PERIOD.sub("", _PUNCT.sub("", text))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    pred = normalize(prediction)
    gts = [normalize(a) for a in answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(g == pred for g in others) / 3))
    return sum(scores) / len(scores)
