"""`builtin:shapes`: a synthetic image world written in the official COCO-captions and VQAv2 formats.

Each image holds 1-3 shapes (circle, square, triangle) in distinct cells of a 3x3 grid, each with a
colour and a size. Everything is drawn from one seed, so the same seed writes the same bytes.

    python -c "from mmagent.train.data.shapes import write_world; write_world('data/shapes')"
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmagent.files import atomic_write_json

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
COLUMNS = ("left", "middle", "right")
ROWS = ("top", "middle", "bottom")
NUMBER_WORDS = ("zero", "one", "two", "three")
SPLITS = {"train": "train2014", "val": "val2014"}
WORLD_VERSION = 3  # bump when the generator's output changes, so cached worlds are rewritten


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    large: bool
    row: int
    col: int

    @property
    def place(self) -> str:
        if self.row == 1 and self.col == 1:
            return "in the centre"
        if self.row == 1:
            return f"on the {COLUMNS[self.col]}"
        if self.col == 1:
            return f"at the {ROWS[self.row]}"
        return f"at the {ROWS[self.row]} {COLUMNS[self.col]}"

    def phrase(self) -> str:
        size = "large" if self.large else "small"
        return f"a {size} {self.colour} {self.kind} {self.place}"


def sample_scene(rng: random.Random) -> list[Shape]:
    cells = rng.sample(range(9), rng.randint(1, 3))
    return [Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.random() < 0.5, c // 3, c % 3) for c in cells]


def draw_scene(scene: list[Shape], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for s in scene:
        cx, cy = (s.col + 0.5) * cell, (s.row + 0.5) * cell
        r = cell * (0.45 if s.large else 0.27)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _count_phrase(n: int, colour: str | None, kind: str) -> str:
    words = [NUMBER_WORDS[n]] + ([colour] if colour else []) + [kind + ("s" if n > 1 else "")]
    return " ".join(words)


def captions(scene: list[Shape], rng: random.Random) -> list[str]:
    """Five captions in different styles, like COCO's five annotators."""
    parts = [s.phrase() for s in scene]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    kinds = sorted({s.kind for s in scene})
    counts = " and ".join(_count_phrase(sum(s.kind == k for s in scene), None, k) for k in kinds)
    n = len(scene)
    inventory = "\n".join(f"{k}: {sum(s.kind == k for s in scene)}" for k in SHAPES)
    out = [
        f"{listing}.",
        f"a picture of {counts}.",
        f"{n} shape{'s' if n > 1 else ''}: {listing}.",
        "\n".join(f"{s.colour} {s.kind} {s.place}" for s in scene),  # one object a line
        inventory,  # "circle: 1\nsquare: 0\ntriangle: 2"
    ]
    rng.shuffle(out)
    return out


def questions(scene: list[Shape], rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(question, answer, question_type, answer_type) tuples, balanced across the three answer types."""
    qs: list[tuple[str, str, str, str]] = []
    kind = rng.choice(SHAPES)
    n = sum(s.kind == kind for s in scene)
    qs.append((f"how many {kind}s are there?", str(n), "how many", "number"))
    kind = rng.choice(SHAPES)
    present = any(s.kind == kind for s in scene)
    qs.append((f"is there a {kind}?", "yes" if present else "no", "is there a", "yes/no"))
    colour = rng.choice(list(COLOURS))
    present = any(s.colour == colour for s in scene)
    qs.append((f"is there anything {colour}?", "yes" if present else "no", "is there", "yes/no"))
    unique = [s for s in scene if sum(t.kind == s.kind for t in scene) == 1]
    if unique:
        s = rng.choice(unique)
        qs.append((f"what color is the {s.kind}?", s.colour, "what color is the", "other"))
    s = rng.choice(scene)
    qs.append((f"what shape is {s.place}?", s.kind, "what shape", "other"))
    return qs


def ten_answers(answer: str, answer_type: str, rng: random.Random) -> list[str]:
    """Ten annotators: mostly agreeing, with the occasional disagreement real VQAv2 has."""
    answers = [answer] * 10
    for i in rng.sample(range(10), rng.choice((0, 0, 1, 2))):
        if answer_type == "yes/no":
            answers[i] = "no" if answer == "yes" else "yes"
        elif answer_type == "number":
            answers[i] = NUMBER_WORDS[int(answer)] if rng.random() < 0.5 else str(min(3, int(answer) + 1))
        else:
            answers[i] = rng.choice([answer + "s", "unknown", answer])
    return answers


def write_split(root: Path, split: str, n_images: int, seed: int, image_size: int, first_id: int) -> None:
    subtype = SPLITS[split]
    rng = random.Random(f"shapes-{seed}-{split}")
    (root / subtype).mkdir(parents=True, exist_ok=True)
    images, caps, qs, anns = [], [], [], []
    for i in range(n_images):
        image_id = first_id + i
        scene = sample_scene(rng)
        file_name = f"COCO_{subtype}_{image_id:012d}.png"
        draw_scene(scene, image_size).save(root / subtype / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for text in captions(scene, rng):
            caps.append({"id": len(caps) + image_id * 10, "image_id": image_id, "caption": text})
        for j, (q, a, qtype, atype) in enumerate(questions(scene, rng)):
            qid = image_id * 10 + j
            qs.append({"image_id": image_id, "question": q, "question_id": qid})
            answers = [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                       for k, x in enumerate(ten_answers(a, atype, rng))]
            anns.append({"question_type": qtype, "multiple_choice_answer": a, "answers": answers,
                         "image_id": image_id, "answer_type": atype, "question_id": qid})
    info = {"description": "mmagent builtin:shapes", "version": "1.0", "year": 2026}
    ann_dir = root / "annotations"
    atomic_write_json(ann_dir / f"captions_{subtype}.json",
                      {"info": info, "licenses": [], "images": images, "annotations": caps})
    atomic_write_json(ann_dir / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                      {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                       "data_subtype": subtype, "questions": qs})
    atomic_write_json(ann_dir / f"v2_mscoco_{subtype}_annotations.json",
                      {"info": info, "license": {}, "data_subtype": subtype, "annotations": anns})


def write_world(root: str | Path, n_train: int = 2000, n_val: int = 200, seed: int = 0,
                image_size: int = 64) -> Path:
    """Write train and val splits (disjoint image ids and scenes) under `root`; return `root`."""
    root = Path(root)
    stamp = {"n_train": n_train, "n_val": n_val, "seed": seed, "image_size": image_size, "version": WORLD_VERSION}
    marker = root / "world.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return root
    write_split(root, "train", n_train, seed, image_size, first_id=1)
    write_split(root, "val", n_val, seed, image_size, first_id=1_000_000)
    atomic_write_json(marker, stamp)
    return root
