"""Decode speed of a LLaMA-7B-shaped LLM (random weights, batch 1) on one GPU against the memory-bandwidth
bound measured in the same process: bound = copy bandwidth (bytes read + written by a device-to-device
copy) / weight bytes one decode step reads (every weight but the input embedding table, of which a step
reads one row; LoRA weights included).

    python bench/decode_7b.py torch --work DIR --out torch.json
        builtin:tiny's vision side with the 7B LLM, in bf16 on CUDA; writes DIR/llm.f16.gguf through our
        GGUF writer and a random rank-16 q/v LoRA as DIR/lora.gguf (MM_7B_GGUF=0: not); times the torch
        backend's decode (static cache + CUDA graphs, train/graph_decode.py) with the projections fused
        (q|k|v, gate|up: the default) and not, base and with the LoRA, against transformers' generate on the
        same LLM (dynamic and static cache: /work/shared/bench/baseline_decode_7b.py; MM_7B_HF=0 skips them),
        and the fused graphs over a torch.compile'd step for each mode in MM_7B_COMPILE (comma-separated:
        default, max-autotune-no-cudagraphs, default+cdt = inductor's coordinate-descent tuning; off: none)
    python bench/decode_7b.py write --work DIR --out w.json    (only the two GGUF files)
    python bench/decode_7b.py llama --work DIR --out llama.json
        quantises DIR/llm.f16.gguf to q4_k_m (llama.cpp); for f16 and q4_k_m with the LoRA: the SDK's
        llama.cpp runtime (LlamaCppLM, what the edge backend decodes with) against llama-cpp-python's plain
        `Llama` on the same file, all layers on the GPU (LLAMA_CPP_LIB_PATH: a CUDA build); and both with
        one setting at a time changed (LLAMA_ROWS)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT  # noqa: F401  (puts the repo on sys.path)

N_PROMPT, N_DECODE, REPEATS = 64, 128, 3
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
LORA_RANK, LORA_ALPHA = 16, 32


DEVICE = "cuda"  # --smoke: "cpu", a 2-layer LLM, to try the script without a GPU


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Bytes per second a 2 GiB device-to-device copy moves, read + write (as baseline_decode_7b.py)."""
    x = torch.empty(2 * 2**30 if DEVICE == "cuda" else 2**26, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 10 * 2 * x.numel() / (time.perf_counter() - t)


OUT: Path | None = None


def save(res: dict) -> None:
    """Write what is measured so far (a step that overruns its time limit loses only itself)."""
    if OUT is not None:
        OUT.write_text(json.dumps(res, indent=1))


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke run)"


def rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


# ---- torch ---------------------------------------------------------------------------------------------------

def build(tok):
    from transformers import Blip2ForConditionalGeneration, LlamaConfig
    from mmagent.train.builtin import blip2_config
    text = LlamaConfig(**LLAMA_7B, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = Blip2ForConditionalGeneration(blip2_config(text, tok))
    torch.set_default_dtype(torch.float32)
    return model.eval()


def add_lora(model):
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights=False,
                        target_modules=r".*language_model.*\.(q_proj|v_proj)")
    return get_peft_model(model, config, adapter_name="task")


def graph_decode(vlm, decoder, embeds, tokens: list | None = None) -> float:
    """Median decode rate over REPEATS after a first run (which captures, and compiles); `tokens` gets the
    greedy tokens."""
    rates = []
    for _ in range(REPEATS + 1):
        stamps = []
        got = decoder.generate(embeds, N_DECODE, lambda k, ids: stamps.append(time.perf_counter()) and False,
                               stop_at_eos=False)
        rates.append(rate(stamps))
    if tokens is not None:
        tokens[:] = got
    return statistics.median(rates[1:])


def compiled_row(vlm, embeds, eager_tokens: list, res: dict, mode: str) -> None:
    """The fused graph decode over a torch.compile'd step: rate, compile + capture time, and how many greedy
    tokens match the uncompiled graphs' (fused kernels round differently; random weights make near-ties)."""
    from mmagent.train.graph_decode import GraphDecoder
    key = "compiled_" + mode.replace("-", "_").replace("+", "_")
    torch._dynamo.reset()
    torch._inductor.config.coordinate_descent_tuning = mode.endswith("+cdt")
    try:
        decoder = GraphDecoder(vlm, use_graphs=DEVICE == "cuda", compile_mode=mode.removesuffix("+cdt"))
        t = time.perf_counter()
        decoder.generate(embeds, 3, stop_at_eos=False)  # step 1 compiles (a warm-up), step 2 is captured
        sync()
        res[f"{key}_compile_and_capture_s"] = round(time.perf_counter() - t, 1)
        tokens: list = []
        res[f"ours_{key}_base_tok_s"] = graph_decode(vlm, decoder, embeds, tokens)
        res[f"{key}_same_tokens"] = next((i for i, (a, b) in enumerate(zip(tokens, eager_tokens)) if a != b),
                                         len(tokens))
        res[f"{key}_capture_errors"] = decoder.capture_errors
        decoder.clear()
    except Exception as e:  # noqa: BLE001 - reported, the rest still runs
        res[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:500]}"


def hf_generate(lm, ids, static: bool) -> float:
    kw = dict(max_new_tokens=N_DECODE, min_new_tokens=N_DECODE, do_sample=False)
    if static:
        kw["cache_implementation"] = "static"
    for _ in range(2):
        lm.generate(ids, **kw)
    sync()
    t = time.perf_counter()
    lm.generate(ids, **kw)
    sync()
    return N_DECODE / (time.perf_counter() - t)


def run_torch(work: Path, measure: bool = True) -> dict:
    from peft import get_peft_model_state_dict
    from mmagent.export.gguf.writer import write_llm_gguf, write_lora_gguf
    from mmagent.train.builtin import smollm2_tokenizer
    from mmagent.train.graph_decode import GraphDecoder
    from mmagent.train.vlm import VLM
    tok = smollm2_tokenizer()
    bw = copy_bandwidth()
    model = build(tok)
    lm = model.language_model
    res = {"gpu": gpu_name(), "torch": torch.__version__, "copy_GBps": round(bw / 1e9)}
    work.mkdir(parents=True, exist_ok=True)
    gguf = os.environ.get("MM_7B_GGUF", "1") != "0"
    t = time.perf_counter()
    if gguf:
        write_llm_gguf(lm, tok, work / "llm.f16.gguf")
        res["gguf_write_s"] = round(time.perf_counter() - t, 1)
    save(res)
    peft_model = add_lora(model)
    if gguf:
        write_lora_gguf(get_peft_model_state_dict(peft_model, adapter_name="task"), LORA_ALPHA, work / "lora.gguf",
                        config=lm.config, prefix="base_model.model.language_model.model.")
    if not measure:  # `write`: the files for the llama phase only
        return res
    vlm = VLM(peft_model, tok, None)
    embed_bytes = lm.get_input_embeddings().weight.nbytes
    base_bytes = sum(p.nbytes for n, p in lm.named_parameters() if "lora_" not in n) - embed_bytes
    lora_bytes = sum(p.nbytes for n, p in lm.named_parameters() if "lora_" in n)
    ids = torch.randint(0, 32000, (1, N_PROMPT), device=DEVICE)
    embeds = lm.get_input_embeddings()(ids)
    with torch.no_grad():
        res["bound_base_tok_s"] = bw / base_bytes
        res["bound_lora_tok_s"] = bw / (base_bytes + lora_bytes)
        res["weights_GB_per_token"] = round(base_bytes / 1e9, 3)
        runs = {}
        for fused in (False, True):  # the unfused projections first: the previous runs' path
            name = "ours" if fused else "ours_unfused"
            decoder = GraphDecoder(vlm, use_graphs=DEVICE == "cuda", fuse=fused)
            res[f"{name}_lora_tok_s"] = graph_decode(vlm, decoder, embeds)
            with peft_model.disable_adapter():
                eager_tokens: list = []
                res[f"{name}_base_tok_s"] = graph_decode(vlm, decoder, embeds, eager_tokens)
            runs[fused] = eager_tokens
            res[f"{name}_capture_errors"] = decoder.capture_errors
            decoder.clear()
            save(res)
        res["fused_same_tokens"] = next((i for i, (a, b) in enumerate(zip(runs[True], runs[False])) if a != b),
                                        len(runs[True]))
        with peft_model.disable_adapter():
            for mode in filter(None, os.environ.get("MM_7B_COMPILE", "default").replace("off", "").split(",")):
                compiled_row(vlm, embeds, eager_tokens, res, mode)
                save(res)
            for mode in ("dynamic", "static") if os.environ.get("MM_7B_HF", "1") != "0" else ():
                try:
                    res[f"hf_{mode}_tok_s"] = hf_generate(lm, ids, mode == "static")
                except Exception as e:  # noqa: BLE001 - reported, the rest still runs
                    res[f"hf_{mode}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                save(res)
    for key in [k.removesuffix("_tok_s") for k in list(res) if k.endswith("_tok_s") and not k.startswith("bound")]:
        bound = res["bound_lora_tok_s"] if "_lora" in key else res["bound_base_tok_s"]
        res[f"{key}_of_bound"] = res[f"{key}_tok_s"] / bound
    return res


# ---- llama.cpp ---------------------------------------------------------------------------------------------

def gguf_bytes(path: Path, skip=("token_embd.weight",)) -> int:
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name not in skip)


def sdk_decode(path: Path, lora: Path, prompt: list[int], threads: int | None = None, **kw) -> float:
    from mmagent.backends.llama_cpp import LlamaCppLM
    rates = []
    with LlamaCppLM(path, n_ctx=512, n_threads=threads, n_gpu_layers=-1 if DEVICE == "cuda" else 0, **kw) as lm:
        lm.load_adapter("task", lora)
        lm.set_adapter("task")
        for _ in range(REPEATS + 1):
            stamps = []
            lm.generate([prompt], N_DECODE, lambda t: stamps.append(time.perf_counter()), stop_at_eos=False)
            rates.append(rate(stamps))
    return statistics.median(rates[1:])


def plain_decode(path: Path, lora: Path, prompt: list[int], mmap: bool = False) -> float:
    """llama-cpp-python's `Llama` given the LoRA (it then reads the GGUF without mmap); `mmap=True`: given
    none, the adapter set afterwards through the same C call `Llama` makes, so the file stays mapped."""
    import ctypes
    import llama_cpp
    from llama_cpp import Llama
    llm = Llama(str(path), n_gpu_layers=-1 if DEVICE == "cuda" else 0, n_ctx=512, n_batch=512,
                lora_path=None if mmap else str(lora), verbose=False)
    adapter = None
    if mmap:
        adapter = llama_cpp.llama_adapter_lora_init(llm._model.model, str(lora).encode())
        if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                             (ctypes.c_float * 1)(1.0)):
            raise RuntimeError("llama_set_adapters_lora failed")
    rates = []
    for _ in range(REPEATS + 1):
        stamps = []
        for _token in llm.generate(prompt, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == N_DECODE:
                break
        rates.append(rate(stamps))
    if adapter is not None:  # before the model, which frees its adapters itself (as `Llama` orders it)
        llama_cpp.llama_adapter_lora_free(adapter)
    llm.close()
    return statistics.median(rates[1:])


# Each row but the first two changes one setting: the SDK with llama.cpp's flash attention "auto" (its default
# before 2026-11-28's run, 9-12% behind `Llama` on an H200), `Llama` with the GGUF mapped; "sdk_again" repeats
# the first row last, so that an order effect (clocks, page cache) shows as a gap between the two SDK rows.
# (Ruled out on that run: no mmap, extra buffer types, one thread; bench/results/gpu_kernels_h200_2026-11-28d.)
LLAMA_ROWS = {
    "sdk": sdk_decode,
    "plain_llama": plain_decode,
    "sdk_flash_attn_auto": lambda *a: sdk_decode(*a, flash_attn="auto"),
    "plain_llama_mmap": lambda *a: plain_decode(*a, mmap=True),
    "sdk_again": sdk_decode,
}


def run_llama(work: Path) -> dict:
    import llama_cpp
    from mmagent.export.gguf.writer import quantize
    res = {"gpu": gpu_name(), "llama_cpp_python": llama_cpp.__version__,
           "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())}
    t = time.perf_counter()
    quantize(work / "llm.f16.gguf", work / "llm.q4_k_m.gguf", "q4_k_m")
    res["quantize_s"] = round(time.perf_counter() - t, 1)
    bw = copy_bandwidth()
    res["copy_GBps"] = round(bw / 1e9)
    lora = work / "lora.gguf"
    prompt = [int(i) for i in np.random.default_rng(0).integers(0, 32000, N_PROMPT)]
    for q in ("f16", "q4_k_m"):
        path = work / f"llm.{q}.gguf"
        bound = bw / (gguf_bytes(path) + gguf_bytes(lora, ()))
        row = {"GB_per_token": round((gguf_bytes(path) + gguf_bytes(lora, ())) / 1e9, 3), "bound_tok_s": bound}
        for name, fn in LLAMA_ROWS.items():
            try:
                row[f"{name}_tok_s"] = fn(path, lora, prompt)
                row[f"{name}_of_bound"] = row[f"{name}_tok_s"] / bound
            except Exception as e:  # noqa: BLE001 - reported, the rest still runs
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if "sdk_tok_s" in row and "plain_llama_tok_s" in row:
            row["sdk_overhead"] = row["plain_llama_tok_s"] / row["sdk_tok_s"] - 1
        res[q] = row
        save(res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["torch", "write", "llama"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, 2 layers, 8 tokens: try the script")
    args = ap.parse_args()
    global OUT, DEVICE, N_DECODE, REPEATS
    OUT = args.out
    if args.smoke:
        DEVICE, N_DECODE, REPEATS = "cpu", 8, 1
        LLAMA_7B.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4)
    res = run_llama(args.work) if args.phase == "llama" else run_torch(args.work, args.phase == "torch")
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
