"""LLaVA-1.5: CLIP ViT patch features -> 2-layer MLP projector -> causal LM; one LLM token per patch.

Image tokens: the processor expands one `<image>` into one placeholder per patch feature (576 for
336 px / patch 14), each filled by one projected feature, exactly as transformers' forward does.
"""
from __future__ import annotations

import torch

from mmagent.train.families import Parts


class LlavaFamily:
    name = "llava"
    reads_instruction = False
    image_first = False  # the processor tokenises the whole prompt, `<image>` inside: BOS comes first
    parts = Parts(
        vision="model.vision_tower", bridge="model.multi_modal_projector", llm="model.language_model",
        presets={"vision": ("q_proj", "v_proj"), "bridge": ("linear_1", "linear_2"), "llm": ("q_proj", "v_proj")},
    )

    def matches(self, config) -> bool:
        return config.model_type == "llava"

    def presets(self, model) -> dict[str, tuple[str, ...]]:
        return dict(self.parts.presets)

    def image_features(self, model, pixel_values: torch.Tensor, instruction=None) -> torch.Tensor:
        """transformers' get_image_features as one batched tensor (it returns a list per image, which would
        fix the batch size of an exported graph): the chosen ViT layer, CLS dropped, then the projector."""
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):  # several layers concatenated: transformers' own path
            out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
            return torch.stack(list(out.pooler_output))
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        feats = hidden[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return model.model.multi_modal_projector(feats)

    def encoder_decoder(self, model) -> bool:
        return False

    def unused_modules(self, model) -> tuple[str, ...]:
        """Module prefixes (ending in '.') after the feature layer: nothing there reaches the LLM."""
        vc, layer = model.config.vision_config, model.config.vision_feature_layer
        if not isinstance(layer, int):
            return ()
        first = layer if layer >= 0 else vc.num_hidden_layers + 1 + layer
        return (f"{self.parts.vision}.post_layernorm.",
                *(f"{self.parts.vision}.encoder.layers.{i}." for i in range(first, vc.num_hidden_layers)))

    def decoder(self, model) -> torch.nn.Module:
        return model.model.language_model

    def head(self, model) -> torch.nn.Module:
        return model.lm_head

    def causal_lm(self, model) -> torch.nn.Module:
        """The LLM as a plain transformers causal LM sharing this model's modules (no copy): what goes to GGUF."""
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(self.text_config(model))
        lm.model, lm.lm_head = model.model.language_model, model.lm_head
        return lm

    def gguf_prefix(self) -> str:
        return "base_model.model.model.language_model."

    def embed_tokens(self, model) -> torch.nn.Module:
        return model.get_input_embeddings()

    def n_image_tokens(self, model) -> int:
        vc = model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + (1 if model.config.vision_feature_select_strategy == "full" else 0)

    def image_token_id(self, model) -> int:
        return model.config.image_token_id

    def image_size(self, model) -> int:
        return model.config.vision_config.image_size

    def text_config(self, model):
        return model.config.text_config

    def context_length(self, model) -> int:
        """Prompt + answer positions the LLM takes (T5's relative positions: its n_positions)."""
        tc = self.text_config(model)
        return int(getattr(tc, "max_position_embeddings", None) or getattr(tc, "n_positions", 512))


FAMILY = LlavaFamily()
