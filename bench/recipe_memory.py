"""Peak GPU memory of the 7B-class recipes (issue 10): each real checkpoint's shapes with random bf16 weights,
saved as an HF directory, trained for a few steps by our Trainer with the recipe's own [lora] and [train]
settings (batch_size, grad_accum, precision), only the data and the step count replaced.

    python bench/recipe_memory.py WORK [--tiny] [--steps 2] [--only instructblip,llava,blip2_opt]

One JSON line per recipe: peak allocated and reserved GiB (torch's allocator: nvidia-smi shows the reserved
figure plus the CUDA context, about 0.5 GiB), tokens per example, step time. Sequences: the recipe's
prompt layout with a 12-word question and a 3-word answer (VQA) or a 6-word instruction and a 20-word
caption, as VQAv2 and COCO examples run; LLaVA's prompt holds its 576 image tokens.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_7b import CHAT, configs, word_tokenizer  # noqa: E402

RECIPES = {"instructblip": "recipes/instructblip_vicuna7b_vqa.toml", "llava": "recipes/llava15_7b_vqa.toml",
           "blip2_opt": "recipes/blip2_opt27b_caption.toml"}
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                max_position_embeddings=4096)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
OPT_27B = dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
               word_embed_proj_dim=2560, max_position_embeddings=2048)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=4096)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=336,
                 patch_size=14, projection_dim=32, hidden_act="quick_gelu")
TINY_OPT = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=2048)


def build(kind: str, out: Path, tiny: bool) -> int:
    """Random bf16 weights of the real checkpoint's shapes as an HF directory; returns the image size."""
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessor, CLIPImageProcessor,
                              CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, OPTConfig)
    if kind == "instructblip":
        from train_7b import make_base
        make_base(out, tiny)
        return configs(tiny)["vision"]["image_size"]
    c = configs(tiny)
    if kind == "llava":  # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336, GELU MLP projector, Vicuna-7B (32,064 ids)
        tok = word_tokenizer(32000, {"<image>": 32000, "<pad>": 32001}, CHAT)
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(**(TINY_CLIP if tiny else CLIP_L_336)).to_dict(),
                          text_config=LlamaConfig(**(TINY_LLAMA if tiny else LLAMA_7B), vocab_size=32064,
                                                  pad_token_id=32001).to_dict(),
                          image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu")
        cls, size = LlavaForConditionalGeneration, 336
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:  # Salesforce/blip2-opt-2.7b: ViT-g, Q-Former, OPT-2.7B (50,272 ids), no chat template
        tok = word_tokenizer(50265, {"<image>": 50265}, None)
        cfg = Blip2Config(vision_config=c["vision"], qformer_config={**c["qformer"], "vocab_size": 30522},
                          text_config=OPTConfig(**(TINY_OPT if tiny else OPT_27B), vocab_size=50272, pad_token_id=1,
                                                bos_token_id=2, eos_token_id=2).to_dict(),
                          num_query_tokens=32, image_token_index=50265)
        cls, size = Blip2ForConditionalGeneration, c["vision"]["image_size"]
        processor = BlipImageProcessor(size={"height": size, "width": size})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = cls(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    return size


def make_data(out: Path, size: int, caption: bool, n: int = 64) -> None:
    import numpy as np
    from PIL import Image
    rng, words = np.random.default_rng(0), random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)
    for path in [out / f"{i}.png" for i in range(4)] + [out / "eval" / "0.png"]:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    n_in, n_out = (6, 20) if caption else (12, 3)
    lines = [json.dumps({"image_path": str(out / f"{i % 4}.png"), "task": "t", "input": "",
                         "instruction": " ".join(f"w{words.randrange(30000)}" for _ in range(n_in)),
                         "output": " ".join(f"w{words.randrange(50)}" for _ in range(n_out))}) for i in range(n)]
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    coco = {"images": [{"id": 0, "file_name": "0.png"}], "annotations": [{"id": 0, "image_id": 0, "caption": "w1"}]}
    (out / "eval.json").write_text(json.dumps(coco))


def measure(kind: str, base: Path, data: Path, steps: int) -> dict:
    import torch
    from rich.console import Console
    from mmagent.train.recipe import recipe_from_dict
    from mmagent.train.trainer import Trainer, prefetched
    raw = tomllib.loads((ROOT / RECIPES[kind]).read_text())
    raw["run"]["output_dir"] = tempfile.mkdtemp(prefix="recipe-mem-")
    raw["model"]["base"] = str(base)
    raw["train"].update(steps=steps, warmup_steps=1, checkpoint_every=0, log_every=1)
    raw["tasks"] = [{"name": "t", "kind": "caption", "jsonl": str(data / "train.jsonl"), "max_eval": 1,
                     "eval_captions": str(data / "eval.json"), "eval_images": str(data / "eval")}]
    r = recipe_from_dict(raw, RECIPES[kind])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(r, console=Console(quiet=True))
    trainer.setup()
    trainer.vlm.model.train()
    stream = trainer.mixture.examples(0)
    source = prefetched(lambda: trainer.step_batches(stream))
    times = []
    try:
        for _ in range(steps):
            t = time.perf_counter()
            trainer.train_step(source)
            times.append(time.perf_counter() - t)
    finally:
        source.close()
        trainer.close()
    t = r.train
    out = {"recipe": RECIPES[kind], "batch_size": t.batch_size, "grad_accum": t.grad_accum, "lora_r": r.lora.r,
           "precision": trainer.precision, "tokens_per_example": trainer.step_tokens // (t.batch_size * t.grad_accum),
           "params_B": round(sum(p.numel() for p in trainer.vlm.model.parameters()) / 1e9, 2),
           "trainable_M": round(sum(p.numel() for p in trainer.params.values()) / 1e6, 2),
           "last_step_s": round(times[-1], 3)}
    if cuda:
        out.update(peak_allocated_GiB=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
                   peak_reserved_GiB=round(torch.cuda.max_memory_reserved() / 2 ** 30, 2),
                   gpu=torch.cuda.get_device_name(0))
    del trainer
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="where the random checkpoints and data go (16 GB each at full size)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes of the same classes (a CPU check)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", default=",".join(RECIPES))
    args = ap.parse_args(argv)
    import gc
    import shutil
    import torch
    for kind in args.only.split(","):
        base = args.work / f"base_{kind}"
        try:
            if not (base / "config.json").exists():
                size = build(kind, base, args.tiny)
            else:
                size = json.loads((base / "preprocessor_config.json").read_text()).get("crop_size", {}).get("height") \
                    or configs(args.tiny)["vision"]["image_size"]
            data = args.work / f"data_{kind}"
            make_data(data, size, caption=kind == "blip2_opt")
            result = measure(kind, base, data, args.steps)
        except Exception as e:  # one recipe failing must not cost the others
            result = {"recipe": RECIPES[kind], "error": f"{type(e).__name__}: {e}"[:400]}
        print(json.dumps(result), flush=True)
        if not args.tiny and kind != "instructblip":
            shutil.rmtree(base, ignore_errors=True)  # 14-16 GB each: the next one needs the room
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
