"""Can the builtin ViT see the shapes world at all? The same ViT as builtin:tiny (train/builtin.py: 2 layers,
128 wide, patch 8, 64 px), trained directly on per-cell labels (shape and colour of each of the 3x3 cells,
through 9 learned queries) on training scenes, scored on held-out ones. A diagnostic of the architecture, not
a way to train the default: the labels are the scene's structure, which a caption-trained model never gets.

    python bench/vit_probe.py [--steps 1000] [--patch 8] [--size 64] [--layers 2]
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
import torch.nn.functional as F


def batch(rng: random.Random, n: int, split: str, size: int):
    from mmagent.train.data.shapes import COLOURS, SHAPES, draw_scene, sample_scene, split_of
    xs, shape, colour = [], [], []
    while len(xs) < n:
        scene = sample_scene(rng)
        if split_of(scene) != split:
            continue
        xs.append(torch.tensor(np.asarray(draw_scene(scene, size), dtype=np.float32) / 255).permute(2, 0, 1))
        s, c = [0] * 9, [0] * 9
        for o in scene:
            s[o.row * 3 + o.col], c[o.row * 3 + o.col] = 1 + SHAPES.index(o.kind), 1 + list(COLOURS).index(o.colour)
        shape.append(s)
        colour.append(c)
    return (torch.stack(xs) - 0.5) / 0.25, torch.tensor(shape), torch.tensor(colour)


class CellProbe(torch.nn.Module):
    def __init__(self, vit, width: int):
        super().__init__()
        self.vit, self.cells = vit, torch.nn.Parameter(torch.randn(9, width) * 0.02)
        self.attn = torch.nn.MultiheadAttention(width, 4, batch_first=True)
        self.shape, self.colour = torch.nn.Linear(width, 4), torch.nn.Linear(width, 5)

    def forward(self, x):
        h = self.vit(pixel_values=x).last_hidden_state
        out, _ = self.attn(self.cells.expand(len(x), -1, -1), h, h)  # (B, 9, width): one query per cell
        return self.shape(out), self.colour(out)


def main() -> None:
    from transformers import Blip2VisionConfig, Blip2VisionModel
    from mmagent.train.builtin import VISION
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--patch", type=int, default=VISION["patch_size"])
    ap.add_argument("--size", type=int, default=VISION["image_size"])
    ap.add_argument("--layers", type=int, default=VISION["num_hidden_layers"])
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    vit = Blip2VisionModel(Blip2VisionConfig(**{**VISION, "image_size": args.size, "patch_size": args.patch,
                                                "num_hidden_layers": args.layers}))
    probe = CellProbe(vit, VISION["hidden_size"])
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    xv, sv, cv = batch(rng, 512, "val", args.size)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, s, c = batch(rng, 32, "train", args.size)
        ls, lc = probe(x)
        loss = F.cross_entropy(ls.reshape(-1, 4), s.reshape(-1)) + F.cross_entropy(lc.reshape(-1, 5), c.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0:
            with torch.no_grad():
                ls, lc = probe(xv)
            occupied = sv > 0
            print(f"step {step}: held-out shape accuracy {(ls.argmax(-1) == sv)[occupied].float().mean():.3f}, "
                  f"colour {(lc.argmax(-1) == cv)[occupied].float().mean():.3f} (occupied cells), "
                  f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
