"""VQAv2 accuracy, computed exactly as the official evaluation does it.

Reference: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py at its newest commit
(a013f00, "Fixed processing answers bug", 2021), ``VQAEval.evaluate``. Per question it does:

1. every ground-truth answer and the predicted answer: ``\\n`` and ``\\t`` become spaces, then strip;
2. only if those ground-truth answers are not all identical (``len(set(gtAnswers)) > 1``), every
   ground-truth answer *and* the prediction go through processPunctuation then processDigitArticle
   (``normalize`` below); otherwise nothing more is done to either, so then "Yes" does not match "yes";
3. for each ground-truth answer, with the other answers (all but that one): acc = min(1, matches / 3),
   where matches counts those equal to the prediction; the question scores the mean of these.

The official quirks are kept on purpose:

* processPunctuation decides per character p of its list: if p is next to a space anywhere in the
  answer (``p + ' '`` or ``' ' + p``), or the answer has a digit-comma-digit anywhere, every p is
  deleted, else every p becomes a space ("black-and-white" -> "black and white", "1,000" -> "1000").
  Only the 21 characters of ``_PUNCT`` are treated so; apostrophes, colons, ``$`` etc. stay.
* then periods not followed by a digit are deleted ("3.5" keeps its period, "yes." loses it). The
  official pattern is ``(?!<=\\d)(\\.)(?!\\d)`` (a lookahead where a lookbehind was meant, so only the
  following character counts), and it passes ``re.UNICODE`` positionally, i.e. as the *count*: at most
  32 periods are deleted. The official script is Python 2 without the UNICODE flag, so ``\\d`` means
  ASCII digits only.
* processDigitArticle lower-cases, splits on white space, maps number words ("two" -> "2"), drops
  articles, then maps contractions written without apostrophe ("dont" -> "don't"). The contraction
  keys "Id've", "I'dve", "Im", "Ive" have a capital I and so never match lower-cased words.
* leave-one-out is by position (the official compares answer dicts, whose answer_ids differ).
"""
from __future__ import annotations

import re

# Data tables as in the official vqaEval.py.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)  # sic: see the module docstring
_PERIOD_STRIP_COUNT = 32  # the official passes re.UNICODE (== 32) where sub() takes its count
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)", re.ASCII)


def _clean(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    out = text
    digit_comma_digit = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:  # the tests look at the input text, the replacements at the text so far
        if p + " " in text or " " + p in text or digit_comma_digit:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize(answer: str) -> str:
    """The full official normalisation of one answer: clean, processPunctuation, processDigitArticle.
    vqa_accuracy applies the last two only when the ground-truth answers disagree (see module doc)."""
    return _process_digit_article(_process_punctuation(_clean(answer)))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The official per-question accuracy of prediction against the annotators' answers (ten in VQAv2)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    gts = [_clean(a) for a in answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1:
        gts = [_process_digit_article(_process_punctuation(a)) for a in gts]
        pred = _process_digit_article(_process_punctuation(pred))
    accs = []
    for i in range(len(gts)):
        matching = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1, matching / 3))
    return float(sum(accs)) / len(accs)
