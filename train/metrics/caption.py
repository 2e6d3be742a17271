"""Caption metrics with pycocoevalcap's CIDEr-D and BLEU scorers.

Its PTB tokenizer shells out to Java and Stanford CoreNLP; we tokenise the same way it does for plain
English (lower case, punctuation split off and dropped) so the scorers run without Java.
"""
from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> str:
    return " ".join(_TOKEN.findall(text.lower()))


def caption_scores(predictions: dict, references: dict) -> dict[str, float]:
    """predictions: id -> caption; references: id -> [captions]. Returns CIDEr and BLEU-4 (x100)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    res = {k: [tokenize(v) or "empty"] for k, v in predictions.items()}
    gts = {k: [tokenize(r) for r in references[k]] for k in predictions}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": 100 * float(cider), "bleu4": 100 * float(bleu[3])}
