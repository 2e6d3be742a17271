"""`builtin:shapes`: a synthetic image world written in the official COCO-captions and VQAv2 formats.

Each image holds 1-3 shapes in distinct cells of a 3x3 grid, each with a colour and a size. Everything
is drawn from one seed, so the same seed writes the same bytes.

Held out by content, not by file: a scene's split follows from what it shows. Scenes with a held-out
colour x shape pair (HELD_OUT_PAIRS) never occur in training and form the compositional split
(`valcomp2014`); of the others, a fixed fifth of all possible scenes (by a hash of the scene) is
held out (`val2014`), so no held-out image equals a training image.

World `base`: 3 shapes x 4 colours. World `shift` adds two colours and a shape the base never saw (a
domain shift for adapter experiments).

    mmagent data shapes data/shapes
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmagent.files import atomic_write_json

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
WORLDS = {"base": (SHAPES, COLOURS),
          "shift": (SHAPES + ("cross",), {**COLOURS, "purple": (140, 50, 190), "orange": (245, 130, 20)})}
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})
VAL_SHARE = 5  # one scene in five (by content) is held out
COLUMNS = ("left", "middle", "right")
ROWS = ("top", "middle", "bottom")
NUMBER_WORDS = ("zero", "one", "two", "three")
SPLITS = {"train": "train2014", "val": "val2014", "comp": "valcomp2014"}
WORLD_VERSION = 6  # bump when the generator's output changes, so cached worlds are rewritten


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


def sample_scene(rng: random.Random, world: str = "base") -> list[Shape]:
    shapes, colours = WORLDS[world]
    cells = sorted(rng.sample(range(9), rng.randint(1, 3)))
    return [Shape(rng.choice(shapes), rng.choice(list(colours)), rng.random() < 0.5, c // 3, c % 3) for c in cells]


def scene_key(scene: list[Shape]) -> str:
    """What the image shows, independent of drawing order: equal keys, identical pixels."""
    return json.dumps(sorted((s.kind, s.colour, s.large, s.row, s.col) for s in scene))


def split_of(scene: list[Shape]) -> str:
    if any((s.colour, s.kind) in HELD_OUT_PAIRS for s in scene):
        return "comp"
    digest = int(hashlib.sha256(scene_key(scene).encode()).hexdigest()[:8], 16)
    return "val" if digest % VAL_SHARE == 0 else "train"


def draw_scene(scene: list[Shape], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for s in scene:
        cx, cy = (s.col + 0.5) * cell, (s.row + 0.5) * cell
        r = cell * (0.45 if s.large else 0.27)
        fill = WORLDS["shift"][1][s.colour]
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.kind == "cross":
            w = r * 0.35
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _count_phrase(n: int, colour: str | None, kind: str) -> str:
    words = [NUMBER_WORDS[n]] + ([colour] if colour else []) + [kind + ("s" if n > 1 else "")]
    return " ".join(words)


def _inventory(scene: list[Shape], pairs: list[tuple[str, str]], world: str) -> str:
    """"red circle: 2" a line per colour x shape, then "squares: 0" for each shape the scene lacks.

    Without the zeros no caption says "0", and a language model trained from scratch on captions never
    learns the most common answer to "how many ...?" (measured: it gave "0" 2% of the probability)."""
    lines = [f"{c} {k}: {sum((s.colour, s.kind) == (c, k) for s in scene)}" for c, k in pairs]
    return "\n".join(lines + [f"{k}s: 0" for k in WORLDS[world][0] if all(s.kind != k for s in scene)])


def captions(scene: list[Shape], rng: random.Random, world: str = "base") -> list[str]:
    """Five captions in different styles, like COCO's five annotators; each names every object's colour
    and shape, so a caption that leaves one out is wrong, not just another style."""
    parts = [s.phrase() for s in scene]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    pairs = sorted({(s.colour, s.kind) for s in scene})
    counted = [_count_phrase(sum((s.colour, s.kind) == p for s in scene), *p) for p in pairs]
    counts = counted[0] if len(counted) == 1 else ", ".join(counted[:-1]) + " and " + counted[-1]
    n = len(scene)
    out = [
        f"{listing}.",
        f"a picture of {counts}.",
        f"{n} shape{'s' if n > 1 else ''}: {listing}.",
        "\n".join(f"{s.colour} {s.kind} {s.place}" for s in scene),  # one object a line
        _inventory(scene, pairs, world),  # counts, zeros included
    ]
    rng.shuffle(out)
    return out


def named_objects(caption: str, scene_objects: list[tuple[str, str]]) -> int:
    """How many of the scene's (colour, shape) objects the caption names as "<colour> <shape>"."""
    text = " " + " ".join(caption.lower().replace(".", " ").replace(",", " ").replace(":", " ").split()) + " "
    return sum(f" {c} {k} " in text or f" {c} {k}s " in text for c, k in scene_objects)


def objects_in(references: list[str], world: str = "base") -> list[tuple[str, str]]:
    """The scene's objects as (colour, shape), read back from its one-object-a-line reference caption."""
    shapes, colours = WORLDS["shift"]
    for ref in references:
        lines = [line.split() for line in ref.splitlines()]
        if lines and all(len(w) >= 2 and w[0] in colours and w[1] in shapes and ":" not in ref for w in lines):
            return [(w[0], w[1]) for w in lines]
    return []


def questions(scene: list[Shape], rng: random.Random, world: str = "base") -> list[tuple[str, str, str, str]]:
    """(question, answer, question_type, answer_type) tuples, balanced across the three answer types."""
    shapes, colours = WORLDS[world]
    qs: list[tuple[str, str, str, str]] = []
    kind = rng.choice(shapes)
    n = sum(s.kind == kind for s in scene)
    qs.append((f"how many {kind}s are there?", str(n), "how many", "number"))
    kind = rng.choice(shapes)
    present = any(s.kind == kind for s in scene)
    qs.append((f"is there a {kind}?", "yes" if present else "no", "is there a", "yes/no"))
    colour = rng.choice(list(colours))
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


def scenes(split: str, n: int, seed: int, world: str) -> list[list[Shape]]:
    """n scenes of this split (sampled until the content-based split matches)."""
    rng = random.Random(f"shapes-{seed}-{split}-{world}")
    out = []
    while len(out) < n:
        scene = sample_scene(rng, world)
        if split_of(scene) == split:
            out.append(scene)
    return out


def write_split(root: Path, split: str, n_images: int, seed: int, image_size: int, first_id: int,
                world: str = "base") -> None:
    subtype = SPLITS[split]
    rng = random.Random(f"shapes-{seed}-{split}-{world}-text")
    (root / subtype).mkdir(parents=True, exist_ok=True)
    images, caps, qs, anns = [], [], [], []
    for i, scene in enumerate(scenes(split, n_images, seed, world)):
        image_id = first_id + i
        file_name = f"COCO_{subtype}_{image_id:012d}.png"
        draw_scene(scene, image_size).save(root / subtype / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for text in captions(scene, rng, world):
            caps.append({"id": len(caps) + image_id * 10, "image_id": image_id, "caption": text})
        for j, (q, a, qtype, atype) in enumerate(questions(scene, rng, world)):
            qid = image_id * 10 + j
            qs.append({"image_id": image_id, "question": q, "question_id": qid})
            answers = [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                       for k, x in enumerate(ten_answers(a, atype, rng))]
            anns.append({"question_type": qtype, "multiple_choice_answer": a, "answers": answers,
                         "image_id": image_id, "answer_type": atype, "question_id": qid})
    info = {"description": f"mmagent builtin:shapes, world {world}, split {split}", "version": "1.0", "year": 2026}
    ann_dir = root / "annotations"
    atomic_write_json(ann_dir / f"captions_{subtype}.json",
                      {"info": info, "licenses": [], "images": images, "annotations": caps})
    atomic_write_json(ann_dir / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                      {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                       "data_subtype": subtype, "questions": qs})
    atomic_write_json(ann_dir / f"v2_mscoco_{subtype}_annotations.json",
                      {"info": info, "license": {}, "data_subtype": subtype, "annotations": anns})


def write_world(root: str | Path, n_train: int = 2000, n_val: int = 200, seed: int = 0,
                image_size: int = 64, world: str = "base") -> Path:
    """Write the train, val (held out by content) and compositional splits under `root`; return `root`."""
    if world not in WORLDS:
        raise ValueError(f"no shapes world `{world}`; worlds: {', '.join(WORLDS)}")
    root = Path(root)
    stamp = {"n_train": n_train, "n_val": n_val, "seed": seed, "image_size": image_size, "world": world,
             "version": WORLD_VERSION}
    marker = root / "world.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return root
    for split, first_id in (("train", 1), ("val", 1_000_000), ("comp", 2_000_000)):
        write_split(root, split, n_train if split == "train" else n_val, seed, image_size, first_id, world)
    atomic_write_json(marker, stamp)
    return root
