"""BLIP-2: ViT -> Q-Former (learned queries, cross-attention) -> linear projection -> any causal LM.

Image tokens: `n_query_tokens` placeholders (config.image_token_id) in the user turn, each replaced by
one projected Q-Former output, the same mechanism transformers' own forward uses.
"""
from __future__ import annotations

import torch

from mmagent.train.families import Parts


class Blip2Family:
    name = "blip2"
    model_types = ("blip-2",)
    parts = Parts(
        vision="vision_model", bridge="qformer", llm="language_model",
        presets={"vision": ("qkv",), "bridge": ("query", "value"), "llm": ("q_proj", "v_proj")},
    )
    projection = "language_projection"
    reads_instruction = False

    def matches(self, config) -> bool:
        return config.model_type in self.model_types

    def image_features(self, model, pixel_values: torch.Tensor, instruction_ids=None) -> torch.Tensor:
        return model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output

    def decoder(self, model) -> torch.nn.Module:
        return model.language_model.model

    def head(self, model) -> torch.nn.Module:
        return model.language_model.lm_head

    def causal_lm(self, model) -> torch.nn.Module:
        """The LLM with its head as one transformers causal LM: what goes to GGUF."""
        return model.language_model

    def embed_tokens(self, model) -> torch.nn.Module:
        return model.get_input_embeddings()

    def n_image_tokens(self, model) -> int:
        return model.config.num_query_tokens

    def image_token_id(self, model) -> int:
        tid = getattr(model.config, "image_token_id", None)
        if tid is None:
            raise ValueError("this BLIP-2 config has no `image_token_id`; re-save it with a current "
                             "transformers (its processor adds an <image> token) or set config.image_token_id")
        return tid

    def image_size(self, model) -> int:
        return model.config.vision_config.image_size

    def text_config(self, model):
        return model.config.text_config


FAMILY = Blip2Family()
