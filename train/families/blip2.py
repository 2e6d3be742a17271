"""BLIP-2: ViT -> Q-Former (learned queries, cross-attention) -> linear projection -> an LLM.

The LLM is a causal LM (LLaMA, OPT) or an encoder-decoder (Flan-T5). Image tokens: `n_query_tokens`
placeholders (config.image_token_id) in the user turn, each replaced by one projected Q-Former output,
the same mechanism transformers' own forward uses (for T5 in the encoder's input).
"""
from __future__ import annotations

import torch

from mmagent.train.families import Parts

# LoRA leaves of each LLM architecture's attention (query and value, as the LoRA paper adapts)
LLM_PRESETS = {"llama": ("q_proj", "v_proj"), "opt": ("q_proj", "v_proj"), "t5": ("q", "v")}


class Blip2Family:
    name = "blip2"
    model_types = ("blip-2",)
    parts = Parts(
        vision="vision_model", bridge="qformer", llm="language_model", projection="language_projection",
        presets={"vision": ("qkv",), "bridge": ("query", "value"), "llm": ("q_proj", "v_proj")},
    )
    reads_instruction = False
    image_first = True  # the processor puts the image tokens before the tokenised text (and its BOS)

    def matches(self, config) -> bool:
        return config.model_type in self.model_types

    def presets(self, model) -> dict[str, tuple[str, ...]]:
        llm_type = self.text_config(model).model_type
        return {**self.parts.presets, "llm": LLM_PRESETS.get(llm_type, self.parts.presets["llm"])}

    def image_features(self, model, pixel_values: torch.Tensor, instruction=None) -> torch.Tensor:
        return model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output

    def unused_modules(self, model) -> tuple[str, ...]:
        return ()  # the Q-Former reads the ViT's last layer; every module reaches the LLM

    def encoder_decoder(self, model) -> bool:
        return bool(getattr(self.text_config(model), "is_encoder_decoder", False))

    def decoder(self, model) -> torch.nn.Module:
        if self.encoder_decoder(model):
            raise ValueError("an encoder-decoder LLM (T5) has no decoder-only stack; use the seq2seq path")
        return model.language_model.model

    def head(self, model) -> torch.nn.Module:
        return model.language_model.lm_head

    def causal_lm(self, model) -> torch.nn.Module:
        """The LLM with its head as one transformers model: what goes to GGUF (T5: the seq2seq model)."""
        return model.language_model

    def gguf_prefix(self) -> str:
        return "base_model.model.language_model.model."

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

    def context_length(self, model) -> int:
        """Prompt + answer positions the LLM takes (T5's relative positions: its n_positions)."""
        tc = self.text_config(model)
        return int(getattr(tc, "max_position_embeddings", None) or getattr(tc, "n_positions", 512))


FAMILY = Blip2Family()
