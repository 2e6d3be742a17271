"""Model families: one file each, behind one small interface, the single source of what differs.

A family knows which modules are the vision tower, the bridge (Q-Former or projector) and the LLM, which
LoRA targets each part offers (`lora.<part> = ["preset"]` asks for them), the image size and how image
tokens enter the prompt, and what the exporters need (the image path for ONNX, the LLM for GGUF). Dispatch
tries each family's `matches` in order, first match wins, like PEFT's `dispatch_*` functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

PRESET = "preset"  # in lora.llm / lora.bridge / lora.vision: the family's own targets for that part


@dataclass(frozen=True)
class Parts:
    """Module-name prefixes of the three parts (and of a projection between bridge and LLM, if any) and
    the default LoRA target leaves of each part."""
    vision: str
    bridge: str
    llm: str
    presets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # part -> default leaf names
    projection: str | None = None  # BLIP-2's language_projection: on the image path, in no LoRA part

    @property
    def image_path(self) -> tuple[str, ...]:
        """Module prefixes of everything between pixels and the LLM's input embeddings (the ONNX graph)."""
        return tuple(p for p in (self.vision, self.bridge, self.projection) if p)


class Family(Protocol):
    name: str
    parts: Parts
    reads_instruction: bool  # InstructBLIP: the Q-Former reads the instruction's tokens too
    image_first: bool  # the processor puts the image tokens before the tokenised text, BOS after them (BLIP-2)

    def matches(self, config) -> bool: ...
    def presets(self, model) -> dict[str, tuple[str, ...]]:
        """LoRA target leaves per part for this model (the LLM's depend on its architecture)."""
    def image_features(self, model, pixel_values: torch.Tensor, instruction=None) -> torch.Tensor:
        """(B, n_image_tokens, llm_hidden): what the LLM sees in place of the image. `instruction`:
        (qformer_input_ids, qformer_attention_mask) for families that read it, else None."""
    def unused_modules(self, model) -> tuple[str, ...]:
        """Module-name prefixes (ending in '.') whose output never reaches the LLM (LLaVA's ViT layers after
        the feature layer): LoRA there changes nothing, so exporters leave it out."""
    def decoder(self, model) -> torch.nn.Module:
        """The decoder-only LLM stack without its head (inputs_embeds -> last_hidden_state)."""
    def head(self, model) -> torch.nn.Module: ...
    def embed_tokens(self, model) -> torch.nn.Module: ...
    def encoder_decoder(self, model) -> bool:
        """True when the LLM is an encoder-decoder (Flan-T5): the prompt is encoded, the answer decoded."""
    def causal_lm(self, model) -> torch.nn.Module:
        """The LLM with its head as one transformers model (what GGUF and the seq2seq path use)."""
    def gguf_prefix(self) -> str:
        """Where the LLM's decoder stack sits in PEFT keys (`base_model.model.<this>layers.N...`)."""
    def n_image_tokens(self, model) -> int: ...
    def image_token_id(self, model) -> int: ...
    def image_size(self, model) -> int: ...
    def text_config(self, model): ...
    def context_length(self, model) -> int: ...


def _families() -> list:
    from mmagent.train.families import blip2, instructblip, llava
    return [instructblip.FAMILY, blip2.FAMILY, llava.FAMILY]


def family_for(model_or_config) -> Family:
    config = getattr(model_or_config, "config", model_or_config)
    for fam in _families():
        if fam.matches(config):
            return fam
    known = ", ".join(f.name for f in _families())
    raise ValueError(f"model type `{config.model_type}` has no mmagent family; supported: {known}. "
                     "Add one file under train/families/ to support it.")


def expand_presets(lora_cfg, family, model):
    """A copy of the recipe's LoRA section with `preset` in a part's list replaced by the family's leaves."""
    from dataclasses import replace
    presets = family.presets(model)
    parts = {}
    for part in ("vision", "bridge", "llm"):
        leaves = []
        for leaf in getattr(lora_cfg, part):
            for x in (presets.get(part, ()) if leaf == PRESET else (leaf,)):
                if x not in leaves:
                    leaves.append(x)
        parts[part] = leaves
    return replace(lora_cfg, **parts)
