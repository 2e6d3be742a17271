"""Our trainer at 7B scale: the InstructBLIP-Vicuna-7B shape (random weights, the real configuration saved as
an HF directory and loaded through `model.base`), against shared/bench/baseline_train_7b.py on the same card.

    python bench/train_7b.py base DIR            # the HF directory (bf16 random weights, tokenizers, processor)
    python bench/train_7b.py data DIR --text 128 # JSONL + images: every example 32 image + 128 text tokens
    python bench/train_7b.py speed BASE DATA --case "4" --case "16 train.compile=true"  # a JSON line a case
    python bench/train_7b.py steps BASE DATA RUN [--resume] [key=value ...]  # a logged run (accelerate launch: N GPUs)

bench/gpu_train_7b.sh runs the whole comparison on the device machine; `--tiny` builds the same classes at
toy sizes, so the whole path is checked on a CPU first. Throughput does not depend on weight values.
Sequences match the baseline's: 32 image placeholders + T text tokens, the loss on the last T/2.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, IMAGE_TOKEN_ID, N_QUERY = 32001, 32000, 32  # Vicuna's vocabulary + <image>, InstructBLIP's 32 queries
ANSWER_WORDS = 50  # answers drawn from 50 words: a loss that can fall (to ln 50) on random weights


def configs(tiny: bool) -> dict:
    """InstructBLIP-Vicuna-7B's shapes (ViT-g 39 layers, Q-Former 12, LLaMA-7B), or toy ones of the same classes."""
    if tiny:
        return dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                image_size=32, patch_size=8),
                    qformer=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 encoder_hidden_size=32, vocab_size=30523),
                    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=VOCAB, max_position_embeddings=2048))
    return dict(vision=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                            image_size=224, patch_size=14),
                qformer=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             encoder_hidden_size=1408, vocab_size=30523),
                text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          vocab_size=VOCAB, max_position_embeddings=2048))


def word_tokenizer(n_words: int, extra: dict, template: str | None):
    """A word-level tokenizer (one token a word) with `n_words` words: sequence lengths are exact by design."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(n_words - 3)})
    vocab.update(extra)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<unk>", additional_special_tokens=list(extra))
    tok.chat_template = template
    return tok


CHAT = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}")


def make_base(out: Path, tiny: bool) -> None:
    import torch
    from transformers import (BlipImageProcessor, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig)
    c = configs(tiny)
    tok = word_tokenizer(IMAGE_TOKEN_ID, {"<image>": IMAGE_TOKEN_ID}, CHAT)
    cfg = InstructBlipConfig(vision_config=InstructBlipVisionConfig(**c["vision"]).to_dict(),
                             qformer_config=InstructBlipQFormerConfig(**c["qformer"]).to_dict(),
                             text_config=LlamaConfig(**c["text"], bos_token_id=1, eos_token_id=2, pad_token_id=0).to_dict(),
                             num_query_tokens=N_QUERY, image_token_index=IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 7B initialises in seconds on a GPU
        model = InstructBlipForConditionalGeneration(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    size = c["vision"]["image_size"]
    BlipImageProcessor(size={"height": size, "width": size}).save_pretrained(out)
    word_tokenizer(c["qformer"]["vocab_size"], {}, None).save_pretrained(out / "qformer_tokenizer")
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")


def make_data(out: Path, text: int, size: int, n_train: int = 256, mixed: bool = False) -> None:
    """JSONL records whose prompt is 32 placeholders + text/2 tokens and whose answer is text/2 tokens
    (eos included), as the baseline labels its sequences; a COCO-captions file for the held-out split.
    mixed: each record's instruction and answer take between half and all of those lengths (batches of
    several lengths, as real data has)."""
    import numpy as np
    from PIL import Image
    from mmagent.prompt import DEFAULT_SYSTEM, chat_prompt
    tok = word_tokenizer(IMAGE_TOKEN_ID, {"<image>": IMAGE_TOKEN_ID}, CHAT)
    fixed = len(tok(chat_prompt(tok, DEFAULT_SYSTEM, "<image>" * N_QUERY, ""), add_special_tokens=False).input_ids)
    n_instruction, n_answer = N_QUERY + text // 2 - fixed, text // 2 - 1
    assert n_instruction > 0, f"--text {text} is shorter than the chat template ({fixed} tokens)"
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 16), ("eval", 2)):
        (out / split).mkdir(exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out / split / f"{i}.png")
    words = random.Random(0)
    lines = []
    for i in range(n_train):
        n_i, n_a = ((words.randint(max(1, n_instruction // 2), n_instruction), words.randint(max(1, n_answer // 2), n_answer))
                    if mixed else (n_instruction, n_answer))
        instruction = " ".join(f"w{words.randrange(VOCAB - 10)}" for _ in range(n_i))
        answer = " ".join(f"w{words.randrange(ANSWER_WORDS)}" for _ in range(n_a))
        lines.append(json.dumps({"image_path": str(out / "train" / f"{i % 16}.png"), "instruction": instruction,
                                 "input": "", "output": answer, "task": "caption"}))
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(2)],
            "annotations": [{"id": i, "image_id": i, "caption": "w1 w2 w3"} for i in range(2)]}
    (out / "eval.json").write_text(json.dumps(coco))
    print(f"wrote {out}: {n_train} examples of {'up to ' if mixed else ''}{N_QUERY + text} tokens "
          f"({n_answer + 1} answer tokens{' at most' if mixed else ''})")


def recipe(base: str, data: Path, run: Path, overrides: list[str]):
    from mmagent.train.recipe import apply_overrides, recipe_from_dict
    raw = {"run": {"name": "bench7b", "output_dir": str(run)},
           "model": {"base": base},
           "data": {"source": "files"},
           "train": {"steps": 1000, "lr": 1e-4, "warmup_steps": 5, "checkpoint_every": 0, "eval_base": False,
                     "log_every": 1},
           "tasks": [{"name": "caption", "kind": "caption", "jsonl": str(data / "train.jsonl"), "max_eval": 2,
                      "eval_captions": str(data / "eval.json"), "eval_images": str(data / "eval")}]}
    return recipe_from_dict(apply_overrides(raw, overrides), "bench/train_7b.py")


def matmul_rate() -> float:
    """bf16 matmul FLOP/s on this card, the baseline's own measurement."""
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t)


def speed(base: str, data: Path, batch: int, overrides: list[str], warmup: int, steps: int, rate: float) -> dict:
    """Median step time of Trainer.train_step (data preparation overlapped, as in training) and peak memory."""
    import torch
    from rich.console import Console
    from mmagent.train.trainer import Trainer, prefetched
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated() / 2 ** 30 if cuda else 0.0  # what an earlier case left behind: ~0
    run = Path(tempfile.mkdtemp(prefix="bench7b-"))
    r = recipe(base, data, run, [f"train.batch_size={batch}", *overrides])
    trainer = Trainer(r, console=Console(quiet=True))
    t0 = time.perf_counter()
    trainer.setup()
    setup_s = time.perf_counter() - t0
    trainer.vlm.model.train()
    stream = trainer.mixture.examples(0)
    source = prefetched(lambda: trainer.step_batches(stream))
    times, losses = [], []
    try:
        for i in range(warmup + steps):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            losses.append(trainer.train_step(source))  # .item() inside: the step has finished
            times.append(time.perf_counter() - t)
    finally:
        source.close()
    step_s = statistics.median(times[warmup:])
    tokens = trainer.step_tokens
    llm = trainer.vlm.family.causal_lm(trainer.vlm.base_model)
    n_llm = sum(p.numel() for p in llm.parameters())
    n_train = sum(p.numel() for p in trainer.params.values())
    flops = (4 if r.train.method == "lora" else 6) * n_llm * tokens  # the baseline's LLM-FLOPs estimate
    out = {"who": "mmagent", "B": batch, "T": tokens // batch - N_QUERY, "overrides": overrides,
           "precision": trainer.precision, "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s),
           "samples_per_s": round(batch / step_s, 2), "trainable_M": round(n_train / 1e6, 2),
           "peak_GiB": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
           "cuda_graphs": len(trainer.graphs.graphs) if getattr(trainer, "graphs", None) else 0,
           "first_step_s": round(times[0], 2), "held_before_GiB": round(held, 2), "setup_s": round(setup_s, 1), "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)]}
    if rate:
        out["mfu_llm_est"] = round(flops / step_s / rate, 3)
    trainer.close()
    return out


def free_memory() -> None:
    import gc
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def logged_run(base: str, data: Path, run: Path, resume: bool, overrides: list[str]) -> None:
    """Trainer.setup + train (no final evaluation): metrics.jsonl and checkpoints, on 1 or N processes."""
    from mmagent.train.trainer import Trainer
    import torch
    trainer = Trainer(recipe(base, data, run, overrides), resume=resume)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.close()
    if torch.cuda.is_available():  # each process's own peak (FSDP: a shard's share)
        print(json.dumps({"rank": trainer.ranks.rank, "world": trainer.ranks.world, "overrides": overrides,
                          "peak_GiB": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["base", "data", "speed", "steps"])
    ap.add_argument("paths", nargs="+", help="base: DIR; data: DIR; speed: BASE DATA; steps: BASE DATA RUN")
    ap.add_argument("--tiny", action="store_true", help="toy sizes of the same classes (a CPU check)")
    ap.add_argument("--text", type=int, default=128, help="text tokens a sequence (data)")
    ap.add_argument("--mixed", action="store_true", help="data: lengths between half and all of --text")
    ap.add_argument("--case", action="append", default=[],
                    help='speed: "BATCH [key=value ...]", one process for all cases (the base loads per case)')
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--rate", type=float, default=0.0, help="bf16 matmul FLOP/s (measured here when 0 on a GPU)")
    args, unknown = ap.parse_known_args(argv)
    overrides = [a for a in args.paths + unknown if "=" in a]  # key=value: recipe overrides
    args.paths = [a for a in args.paths if "=" not in a]
    if args.what == "base":
        make_base(Path(args.paths[0]), args.tiny)
    elif args.what == "data":
        make_data(Path(args.paths[0]), args.text, configs(args.tiny)["vision"]["image_size"], mixed=args.mixed)
    elif args.what == "speed":
        import torch
        rate = args.rate or (matmul_rate() if torch.cuda.is_available() else 0.0)
        print(json.dumps({"bf16_matmul_TFLOPs": round(rate / 1e12, 1), "gpu": torch.cuda.get_device_name(0)
                          if torch.cuda.is_available() else "cpu"}), flush=True)
        for case in args.case:
            batch, *keys = case.split()
            try:
                result = speed(args.paths[0], Path(args.paths[1]), int(batch), keys + overrides, args.warmup,
                               args.steps, rate)
            except torch.OutOfMemoryError:
                result = {"who": "mmagent", "B": int(batch), "overrides": keys, "error": "OOM"}
            except Exception as e:  # one case failing (a capture, a compile) must not cost the others
                result = {"who": "mmagent", "B": int(batch), "overrides": keys, "error": f"{type(e).__name__}: {e}"[:600]}
            print(json.dumps(result), flush=True)
            free_memory()
    else:
        logged_run(args.paths[0], Path(args.paths[1]), Path(args.paths[2]), args.resume, overrides)


if __name__ == "__main__":
    main()
