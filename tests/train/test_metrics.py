"""VQA accuracy and caption tokenisation against the official tools' rules.

Every expected value below was worked out by hand from the rules quoted in the comments: the official
VQA evaluation (GT-Vision-Lab/VQA vqaEval.py) and Stanford PTBTokenizer 3.4.1 as pycocoevalcap runs it.
"""
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from mmagent.train.metrics.caption import NOT_COMPUTED, PUNCTUATIONS, caption_scores, tokenize
from mmagent.train.metrics.vqa import normalize, vqa_accuracy
from mmagent.train.report import primary

# With n = 10 answers of which k equal the prediction (after processing), the k matching annotators'
# leave-one-out subsets hold k - 1 matches and the other 10 - k subsets hold k; each subset scores
# min(1, matches / 3), and the answer scores their mean:
#   k = 1: (1*0 + 9*(1/3)) / 10 = 0.3      k = 2: (2*(1/3) + 8*(2/3)) / 10 = 0.6
#   k = 3: (3*(2/3) + 7*1) / 10 = 0.9      k >= 4: every subset holds >= 3 matches = 1.0
VQA_CASES = [
    # unanimous and split answers
    ("yes", ["yes"] * 10, 1.0),  # k = 10
    ("no", ["yes"] * 10, 0.0),  # k = 0
    ("red", ["red"] + ["blue"] * 9, 0.3),  # k = 1
    ("red", ["red"] * 2 + ["blue"] * 8, 0.6),  # k = 2
    ("red", ["red"] * 3 + ["blue"] * 7, 0.9),  # k = 3
    ("red", ["red"] * 4 + ["blue"] * 6, 1.0),  # k = 4
    # fewer than ten answers: subsets {dog, cat} 1 match, {cat, cat} 2, {cat, dog} 1: (1/3+2/3+1/3)/3 = 4/9
    ("cat", ["cat", "dog", "cat"], 4 / 9),
    # all ground-truth answers identical (after \n, \t -> space and strip): nothing is normalised
    ("Yes", ["yes"] * 10, 0.0),  # "Yes" != "yes": no lower-casing either
    ("two", ["2"] * 10, 0.0),  # number words not mapped
    ("yes.", ["yes"] * 10, 0.0),  # period not stripped
    (" yes\n", ["yes"] * 10, 1.0),  # but the prediction is stripped: "yes", k = 10
    ("Yes", ["yes"] * 9 + ["yes\t"], 0.0),  # "yes\t" strips to "yes": still unanimous, "Yes" != "yes"
    ("Yes", ["yes"] * 9 + ["Yes"], 1.0),  # two distinct answers: all processed to "yes", k = 10
    # number words, articles
    ("Two", ["2"] * 3 + ["3"] * 7, 0.9),  # "two" -> "2", k = 3
    ("none", ["0"] * 2 + ["1"] * 8, 0.6),  # "none" -> "0", k = 2
    ("a dog", ["dog"] * 2 + ["cat"] * 8, 0.6),  # "a" dropped, k = 2
    ("the red one", ["red 1"] * 2 + ["red"] * 8, 0.6),  # "the" dropped, "one" -> "1", k = 2
    # punctuation: deleted when next to a space (or any digit,digit in the answer), else a space
    ("black-and-white", ["black and white"] * 3 + ["gray"] * 7, 0.9),  # '-' -> ' ', k = 3
    ("black - white", ["black-white"] * 4 + ["white"] * 6, 1.0),  # " -" so '-' deleted: "black white";
    # gt "black-white": '-' -> ' ' gives "black white" too, k = 4
    ("red,white", ["red white"] * 3 + ["red"] * 7, 0.9),  # ',' not next to a space -> ' ', k = 3
    ("yes?", ["yes"] * 3 + ["no"] * 7, 0.9),  # '?' -> ' ', "yes " splits to "yes", k = 3
    ("left-hand side (up)", ["left hand side up"] * 3 + ["left"] * 7, 0.9),  # '-' -> ' ', " (" so '('
    # deleted, ')' has no space on either side -> ' ': "left hand side up", k = 3
    ("1,000", ["1000"] * 3 + ["100"] * 7, 0.9),  # digit,digit: ',' deleted, k = 3
    ("1,000-2,000", ["10002000"] * 2 + ["1000"] * 8, 0.6),  # digit,digit anywhere: '-' deleted as well
    # characters outside the official list stay
    ("10:30", ["1030"] * 3 + ["10"] * 7, 0.0),  # ':' kept: "10:30" matches nothing
    ("$5", ["5"] * 4 + ["6"] * 6, 0.0),  # '$' kept
    # periods: deleted unless a digit follows
    ("3.5", ["3.5"] + ["35"] * 3 + ["3"] * 6, 0.3),  # "3.5" stays, only the one "3.5" matches, k = 1
    ("yes.", ["yes"] * 4 + ["no"] * 6, 1.0),  # "yes", k = 4
    ("3.", ["3"] * 2 + ["4"] * 8, 0.6),  # "3", k = 2
    ("u.s.a.", ["usa"] * 3 + ["america"] * 7, 0.9),  # every period is followed by a letter or the end
    # contractions written without apostrophe
    ("dont", ["don't"] * 3 + ["no"] * 7, 0.9),  # "dont" -> "don't"; the gt's apostrophe is not in the list
    ("isnt", ["isn't"] * 4 + ["is"] * 6, 1.0),  # "isnt" -> "isn't", k = 4
    ("im", ["i'm"] * 3 + ["me"] * 7, 0.0),  # the official key is "Im": lower-cased "im" is never mapped
]


@pytest.mark.parametrize("prediction,answers,expected", VQA_CASES)
def test_vqa_accuracy_matches_the_official_evaluation(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


NORMALIZE_CASES = [
    ("Two.", "2"),  # period before the end deleted, lower-cased, "two" -> "2"
    ("A red circle!", "red circle"),  # '!' -> ' ', "a" dropped
    ("black-and-white", "black and white"),
    ("black - white", "black white"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("yes.", "yes"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("Im", "im"),  # lower-cased before the contraction map, whose key is "Im"
    ("  The   dog\t", "dog"),
    ("10:30", "10:30"),
    ("man's", "man's"),  # the apostrophe is not in the official list
    ("." * 33, "."),  # re.UNICODE passed as sub()'s count: only the first 32 periods go
]


@pytest.mark.parametrize("answer,expected", NORMALIZE_CASES)
def test_normalize_is_the_official_answer_processing(answer, expected):
    assert normalize(answer) == expected


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# PTBTokenizer -preserveLines -lowerCase, then pycocoevalcap drops the PUNCTUATIONS tokens.
PTB_CASES = [
    # words split at spaces, final "." its own token (dropped), lower-cased
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    # hyphenated word is one token (HTHING)
    ("A black-and-white photo of a dog.", "a black-and-white photo of a dog"),
    # n't split off the word before it (SWORD/SREDAUX), and kept
    ("A woman who doesn't like cheese isn't eating.", "a woman who does n't like cheese is n't eating"),
    # 's and 're split off (WORD/REDAUX); "," and "!" dropped
    ("The cat's toy is on the floor, next to the sofa!", "the cat 's toy is on the floor next to the sofa"),
    ("They're at a table with a 3.5 inch cake.", "they 're at a table with a 3.5 inch cake"),  # NUMBER
    ("There are 1,000 people at 10:30.", "there are 1,000 people at 10:30"),  # NUMBER with , and :
    # double quotes become `` and '' (dropped)
    ('A sign that says "STOP" in red letters.', "a sign that says stop in red letters"),
    # ( ) become -LRB- -RRB-, lower-cased to -lrb- -rrb-, which the upper-case list does not drop;
    # "..." is one token (LDOTS), dropped
    ("An elephant (or two) walking by the river...", "an elephant -lrb- or two -rrb- walking by the river"),
    # can't -> ca n't, gonna -> gon na (splitAssimilations), "--" dropped
    ("A man can't see -- it's gonna rain", "a man ca n't see it 's gon na rain"),
    # "etc." is an abbreviation and keeps its period; ":" and "," dropped
    ("a bowl of fruit: apples, oranges, etc.", "a bowl of fruit apples oranges etc."),
    # "$" and "%" split off and kept, "&" kept, "!!" is one token not in the list
    ("A $5 bill & 50% off!!", "a $ 5 bill & 50 % off !!"),
    # title abbreviation keeps its period, slashed words (THING3) and o'clock (THING) are one token
    ("Dr. Smith's cat/dog at 12 o'clock", "dr. smith 's cat/dog at 12 o'clock"),
    # right curly quote becomes ' (dropped)
    ("The kids\u2019 bikes", "the kids bikes"),
    # [ ] { } become -LSB- -RSB- -LCB- -RCB-, none of them dropped after lower-casing
    ("[red] {blue}", "-lsb- red -rsb- -lcb- blue -rcb-"),
    # I'm -> i 'm; "U.S." keeps its period
    ("I'm at the U.S. Open", "i 'm at the u.s. open"),
    ("Cannot stop", "can not stop"),  # cannot -> can not
]


@pytest.mark.parametrize("caption,expected", PTB_CASES)
def test_tokenize_follows_the_ptb_tokenizer(caption, expected):
    assert tokenize(caption) == expected


def test_punctuation_list_is_pycocoevalcaps():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS as theirs
    assert PUNCTUATIONS == set(theirs)


def _fuzz_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("a an the man woman dog cat it is isn't don't can't won't I'm they're we've man's kids' cannot "
             "gonna o'clock rock 'n' roll Mr. Dr. St. U.S. etc. e.g. a.m. black-and-white t-shirt 3-year-old "
             "and/or 3.5 1,000 10:30 1/2 5 42 2015").split()
    punct = list(".,;:!?\"'`()[]{}-&$%#*/") + ["--", "...", "!!", "\u2019", "\u201c", "\u201d", "\u2014"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            t = rng.choice(words) if rng.random() < 0.75 else rng.choice(punct)
            if rng.random() < 0.15:
                t = t.capitalize()
            if parts and t in punct and rng.random() < 0.6:
                parts[-1] += t
            else:
                parts.append(t)
        out.append(" ".join(parts))
    return out


def _ptb_jar():
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        return None
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    return jar if jar.exists() and shutil.which("java") else None


@pytest.mark.skipif(_ptb_jar() is None, reason="needs Java and pycocoevalcap's Stanford CoreNLP jar")
def test_tokenize_agrees_with_the_real_ptb_tokenizer(tmp_path):
    """pycocoevalcap's own command on one file; each caption is followed by a neutral line, because the
    jar's rules may look into the next caption (see the caption module's docstring)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS as theirs
    captions = [c for c, _ in PTB_CASES] + _fuzz_captions(400)
    src = tmp_path / "captions.txt"
    src.write_text("\n".join(f"{c}\nx" for c in captions), encoding="utf-8")
    run = subprocess.run(["java", "-cp", str(_ptb_jar()), "edu.stanford.nlp.process.PTBTokenizer",
                          "-preserveLines", "-lowerCase", str(src)], capture_output=True, check=True)
    lines = run.stdout.decode("utf-8").split("\n")
    assert [lines[2 * i + 1].strip() for i in range(len(captions))] == ["x"] * len(captions)
    jar = [" ".join(w for w in lines[2 * i].rstrip().split(" ") if w not in theirs) for i in range(len(captions))]
    assert [tokenize(c) for c in captions] == jar


def test_caption_scores_rank_a_right_caption_above_a_wrong_one():
    refs = {0: ["a red circle on the left.", "one red circle."], 1: ["two blue squares.", "a picture of two squares."]}
    good = caption_scores({0: "a red circle on the left", 1: "two blue squares"}, refs)
    bad = caption_scores({0: "two blue squares", 1: "a red circle on the left"}, refs)
    assert good["cider"] > bad["cider"] + 50 and good["bleu4"] > bad["bleu4"]


def test_caption_scores_say_what_they_leave_out():
    scores = caption_scores({0: "a red circle"}, {0: ["a red circle", "one red circle"]})
    assert scores["not_computed"] == list(NOT_COMPUTED) and {"METEOR", "SPICE"} <= set(NOT_COMPUTED)
    assert all(isinstance(v, float) for k, v in scores.items() if k != "not_computed")
    assert primary(scores) == ("cider", scores["cider"])
