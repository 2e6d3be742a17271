"""The tiny default on one GPU machine: the edge bundle on CUDA (llama.cpp, every layer on the GPU; fp16 vision
graph on onnxruntime's CUDA provider) against the torch backend on CUDA (bf16, static cache + CUDA graphs)
and the edge bundle on the same machine's CPU. Per backend: time to first token for an image question
(adapters alternating, so every call switches), decode tok/s (64 tokens, end token ignored), adapter
switch p50/p99 (bench/adapter_switch.py's measure). Speed only: the runs train a few steps.

    python bench/tiny_gpu.py prepare --work W [--base smol]   an untrained builtin:tiny (or smol: SmolLM2-135M's
                                                              weights) + vqa and caption runs
    CUDA_VISIBLE_DEVICES= python bench/tiny_gpu.py export --work W      the bundle, self-checked on the CPU
    python bench/tiny_gpu.py bench --work W --row edge-cuda --out edge-cuda.json
    (rows: edge-cuda, torch-cuda, edge-cpu (run it with CUDA_VISIBLE_DEVICES= so llama.cpp cannot offload
    prompt batches), edge-cuda-llm (LLM on CUDA, vision on onnxruntime's CPU provider))
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from common import ROOT, images, machine, median, pct

PROMPTS = [("caption", "Describe the image."), ("vqa", "how many circles are there?"),
           ("vqa", "what shape is on the left?")]
N_DECODE, REPEATS, SWITCHES = 64, 2, 2000
SMALL = ["data.train_images=48", "data.eval_images=12", "data.image_size=64", "train.batch_size=4",
         "train.warmup_steps=1", "tasks.0.max_eval=4", "train.checkpoint_every=0", "train.eval_base=false"]


def prepare(work: Path, base: str = "tiny") -> None:
    from mmagent.train.recipe import load_recipe
    from mmagent.train.trainer import Trainer

    def train(name: str, recipe: str, *extra: str) -> None:
        Trainer(load_recipe(ROOT / "recipes" / recipe, [f'run.output_dir="{work / name}"', *SMALL, *extra])).run()
    from mmagent.train.builtin import init_base
    model, tok, processor = init_base(base)  # untrained vision side: these numbers are speed, not answers
    for part in (model, tok, processor):
        part.save_pretrained(work / "base" / "model")
    for name, recipe, extra in (("vqa", "vqa.toml", ()), ("caption", "caption.toml", ("soft_prompt.tokens=4",))):
        train(name, recipe, f'model.base="{work / "base" / "model"}"', "train.steps=6", *extra)


def runs(work: Path) -> list[Path]:
    return [work / "vqa", work / "caption"]


def export(work: Path, gguf: bool = True) -> None:
    from mmagent.export.bundle import export_bundle
    # q8_0 too: `mmagent check --device cuda` reports a quantised variant's agreement beside f16's identity
    export_bundle(runs(work), work / "bundle", gguf=gguf, onnx=True, quants=("f16", "q8_0"), force=True)


def load(row: str, work: Path):
    from mmagent import Agent
    bundle = work / "bundle"
    if row == "edge-cuda":
        return Agent.load(bundle, "edge", device="cuda")
    if row == "edge-cpu":
        return Agent.load(bundle, "edge", device="cpu")
    if row == "edge-cuda-llm":
        return Agent.load(bundle, "edge", n_gpu_layers=-1, providers=["CPUExecutionProvider"])
    if row == "torch-cuda":
        return Agent.load(runs(work), "torch", device="cuda")
    raise SystemExit(f"unknown row {row}")


def measure(agent, pictures) -> dict:
    from adapter_switch import switch_times
    first, rates = [], []
    for repeat in range(REPEATS + 1):  # the first pass warms up (allocations, graph capture per adapter)
        for img in pictures:
            for adapter, prompt in PROMPTS:
                kind = agent.adapter_info(adapter).kinds[0]
                _, t = agent.backend.generate(img, prompt, adapter, kind, (), N_DECODE, None, stop_at_eos=False)
                if repeat:
                    first.append(t["first_token"])
                    rates.append(t["tokens_per_s"])
    switch = switch_times(agent.backend, agent.adapters, SWITCHES)
    return {"ttft_ms": 1000 * median(first), "ttft_p99_ms": 1000 * pct(first, 99), "decode_tok_s": median(rates),
            "switch_p50_us": 1e6 * median(switch), "switch_p99_us": 1e6 * pct(switch, 99), "calls": len(first)}


def bench(row: str, work: Path) -> dict:
    t = time.perf_counter()
    agent = load(row, work)
    res = {"row": row, "load_s": round(time.perf_counter() - t, 2), "machine": machine(),
           "python": platform.python_version()}
    backend = agent.backend
    if hasattr(backend, "vision"):
        res["vision_providers"] = backend.vision.session.get_providers()
        res["vision_graph"] = getattr(backend, "vision_graph", "fp32")
    if hasattr(backend, "dtype"):
        res["torch"] = f"{backend.device} {backend.dtype}"
    res |= measure(agent, images(4))
    decoder = getattr(getattr(backend, "vlm", None), "graph_decoder", None)
    if decoder is not None:
        res["graphs"], res["capture_errors"] = len(decoder.steps), decoder.capture_errors
    agent.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["prepare", "export", "bench"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--row", default="edge-cuda")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--onnx-only", action="store_true", help="export: the vision graph alone (no llama.cpp needed)")
    ap.add_argument("--base", choices=["tiny", "smol"], default="tiny", help="prepare: the builtin architecture")
    args = ap.parse_args()
    if args.phase == "prepare":
        prepare(args.work, args.base)
    elif args.phase == "export":
        export(args.work, not args.onnx_only)
    else:
        res = bench(args.row, args.work)
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))
        print(json.dumps(res))


if __name__ == "__main__":
    main()
