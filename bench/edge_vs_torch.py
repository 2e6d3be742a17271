"""Decode speed and time to first token: the edge bundle (llama.cpp + onnxruntime) against the torch
backend, same model, same prompts, one process, one run.

    python bench/edge_vs_torch.py --runs runs/vqa runs/caption --bundle bundles/bench
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ensure_bundle, images, machine, median

PROMPTS = [("caption", "Describe the image."), ("vqa", "how many circles are there?"),
           ("vqa", "what shape is on the left?")]


N_DECODE = 64  # fixed-length decode (end token ignored): answers here are too short to time decoding


def measure(agent, pictures, repeats: int) -> dict:
    """Median time to first token and decode rate over images x prompts x repeats, adapters switching."""
    first, rates = [], []
    for _ in range(repeats):
        for img in pictures:
            for adapter, prompt in PROMPTS:
                kind = agent.adapter_info(adapter).kinds[0]
                _, t = agent.backend.generate(img, prompt, adapter, kind, (), N_DECODE, None, stop_at_eos=False)
                first.append(t["first_token"])
                rates.append(t["tokens_per_s"])
    return {"ttft_ms": 1000 * median(first), "decode_tok_s": median(rates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", nargs="+", type=Path, default=[Path("runs/vqa"), Path("runs/caption")])
    ap.add_argument("--bundle", type=Path, default=Path("bundles/bench"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: all cores)")
    args = ap.parse_args()
    import torch
    from mmagent import Agent
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = ensure_bundle(args.runs, args.bundle)
    pictures = images()
    agents = {"torch": Agent.load(args.runs, "torch"), "edge f16": Agent.load(bundle, "edge", n_threads=args.threads)}
    if "q8_0" in json.loads((bundle / "manifest.json").read_text())["llm"]:
        agents["edge q8_0"] = Agent.load(bundle, "edge", quant="q8_0", n_threads=args.threads)
    for agent in agents.values():  # warm-up: first calls pay for allocations and graph building
        measure(agent, pictures[:1], 1)
    results = {name: measure(agent, pictures, args.repeats) for name, agent in agents.items()}
    base = results["torch"]
    print(f"machine: {machine()}")
    print(f"{'backend':10} {'TTFT ms':>9} {'decode tok/s':>13} {'decode x torch':>15} {'TTFT x torch':>13}")
    for name, r in results.items():
        print(f"{name:10} {r['ttft_ms']:9.2f} {r['decode_tok_s']:13.0f} "
              f"{r['decode_tok_s'] / base['decode_tok_s']:15.1f} {base['ttft_ms'] / r['ttft_ms']:13.1f}")


if __name__ == "__main__":
    main()
