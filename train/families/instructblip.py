"""InstructBLIP: BLIP-2 whose Q-Former also reads the instruction, so image features depend on it."""
from __future__ import annotations

import torch

from mmagent.train.families.blip2 import Blip2Family


class InstructBlipFamily(Blip2Family):
    name = "instructblip"
    model_types = ("instructblip",)
    reads_instruction = True

    def image_features(self, model, pixel_values: torch.Tensor, instruction_ids=None) -> torch.Tensor:
        if instruction_ids is None:
            raise ValueError("InstructBLIP's Q-Former needs the instruction's token ids (`instruction_ids`)")
        out = model.get_image_features(pixel_values=pixel_values, qformer_input_ids=instruction_ids,
                                       qformer_attention_mask=torch.ones_like(instruction_ids), return_dict=True)
        return out.pooler_output


FAMILY = InstructBlipFamily()
