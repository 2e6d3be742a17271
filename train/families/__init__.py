"""Model families: one file each, behind one small interface.

A family knows how to load a base, which modules are the vision tower, the bridge (Q-Former or projector)
and the LLM, which LoRA targets each part offers, and how image tokens enter the prompt. Dispatch tries
each family's `matches` in order, first match wins, like PEFT's `dispatch_*` functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class Parts:
    """Module-name prefixes of the three parts and the LoRA target presets of each."""
    vision: str
    bridge: str
    llm: str
    presets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # part -> default leaf names


class Family(Protocol):
    name: str
    parts: Parts

    def matches(self, config) -> bool: ...
    def image_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, n_image_tokens, llm_hidden): what the LLM sees in place of the image."""
    def llm(self, model) -> torch.nn.Module:
        """The causal LM (with its head)."""
    def n_image_tokens(self, model) -> int: ...
    def image_token_id(self, model) -> int: ...


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
