"""llama.cpp's settings that the SDK picks for the user, timed on this machine: the CPU thread count (default:
one per usable physical core; until 2026-11-28 one per 256 MB of weights) and flash attention (default:
llama.cpp's "auto" on the CPU, off with the layers on a GPU), on models of SmolLM2-135M's shape (30 layers, 576
wide, 9 query and 3 KV heads) and of a tiny one's (4 layers, 256 wide); random weights, f16 and q8_0.

    CUDA_VISIBLE_DEVICES= python bench/llama_settings.py [--threads 1,2,4,8,16] [--out cpu.json]
    python bench/llama_settings.py --devices cuda [--out cuda.json]     (LLAMA_CPP_LIB_PATH: a CUDA build)

Per case: decode tok/s (N_DECODE tokens after a 64-token prompt, median of REPEATS after a warm-up) and prompt
tok/s. On the CPU: the default thread count and the others given, flash attention "auto" and off; on CUDA every
layer on the GPU, flash attention off and "auto". Hide the GPU for the CPU rows: a visible one takes prompts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import machine

N_PROMPT, N_DECODE, REPEATS = 64, 64, 3
SHAPES = {"smol": dict(n_embd=576, n_ff=1536, n_vocab=49152, n_layers=30, n_head=9, n_head_kv=3),
          "tiny": dict(n_embd=256, n_ff=1024, n_vocab=49152, n_layers=4, n_head=4, n_head_kv=4)}


def measure(path: Path, threads: int | None, flash_attn: str, gpu: bool) -> dict:
    from mmagent.backends.llama_cpp import LlamaCppLM
    prompt = [100 + i for i in range(N_PROMPT)]
    decode, fill = [], []
    with LlamaCppLM(path, n_ctx=256, n_threads=threads, n_gpu_layers=-1 if gpu else 0, flash_attn=flash_attn) as lm:
        for _ in range(REPEATS + 1):
            t = time.perf_counter()
            lm.next_token_logits([prompt])
            fill.append(N_PROMPT / (time.perf_counter() - t))
            stamps = []
            lm.generate([prompt], N_DECODE, lambda token: stamps.append(time.perf_counter()), stop_at_eos=False)
            decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        used = lm.n_threads
    return {"threads": used, "prompt_tok_s": statistics.median(fill[1:]),
            "decode_tok_s": statistics.median(decode[1:]), "decode_runs": decode[1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2,4,8,16", help="CPU thread counts to time, besides the default")
    ap.add_argument("--shapes", default="smol,tiny")
    ap.add_argument("--devices", default="cpu", help="cpu, cuda or cpu,cuda")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from mmagent.backends.llama_cpp import default_threads, write_random_gguf
    devices, default = args.devices.split(","), default_threads()
    # (device, threads (None: the default), flash attention): the same cases for every model
    cases = [("cpu", None, fa) for fa in ("auto", "off") if "cpu" in devices]
    cases += [("cpu", n, "auto") for n in map(int, args.threads.split(",")) if "cpu" in devices and n != default]
    cases += [("cuda", None, fa) for fa in ("off", "auto") if "cuda" in devices]
    rows = []
    print(f"machine: {machine()}")
    print("| shape | weights | device | threads | flash attention | prompt tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            for dtype in ("f16", "q8_0"):
                path = Path(tmp) / f"{shape}.{dtype}.gguf"
                write_random_gguf(path, **SHAPES[shape], dtype=dtype)
                for device, threads, fa in cases:
                    r = measure(path, threads, fa, device == "cuda")
                    rows.append({"shape": shape, "weights": dtype, "device": device, "flash_attn": fa,
                                 "default_threads": threads is None, "MB": path.stat().st_size / 1e6, **r})
                    label = f"{r['threads']}{' (default)' if threads is None else ''}"
                    print(f"| {shape} | {dtype} | {device} | {label} | {fa} | {r['prompt_tok_s']:,.0f} | "
                          f"{r['decode_tok_s']:,.1f} |", flush=True)
                    if args.out:
                        args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
