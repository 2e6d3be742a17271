"""InstructBLIP: BLIP-2 whose Q-Former also reads the instruction, so image features depend on it.

The instruction's Q-Former tokens come from the checkpoint's own `qformer_tokenizer/` (a BERT WordPiece
tokenizer beside the LLM's), in training, evaluation, every backend and the ONNX graph alike.
"""
from __future__ import annotations

import torch

from mmagent.train.families.blip2 import Blip2Family

QFORMER_TOKENIZER = "qformer_tokenizer"  # the sub-folder InstructBlipProcessor.save_pretrained writes


class InstructBlipFamily(Blip2Family):
    name = "instructblip"
    model_types = ("instructblip",)
    reads_instruction = True

    def image_features(self, model, pixel_values: torch.Tensor, instruction=None) -> torch.Tensor:
        if instruction is None:
            raise ValueError("InstructBLIP's Q-Former reads the instruction: pass its Q-Former token ids and "
                             "attention mask (VLM.instruction_inputs builds them)")
        ids, mask = instruction
        out = model.get_image_features(pixel_values=pixel_values, qformer_input_ids=ids,
                                       qformer_attention_mask=mask, return_dict=True)
        return out.pooler_output

    def instruction_tokenizer(self, model):
        """The checkpoint's own Q-Former tokenizer (`<model dir>/qformer_tokenizer/`)."""
        from pathlib import Path

        from transformers import AutoTokenizer
        folder = Path(model.name_or_path or ".") / QFORMER_TOKENIZER
        if not (folder / "tokenizer_config.json").is_file():
            raise ValueError(f"InstructBLIP needs its Q-Former tokenizer, and `{folder}` has none; save the "
                             "checkpoint's processor with `InstructBlipProcessor.save_pretrained(DIR)` (it writes "
                             f"{QFORMER_TOKENIZER}/), or copy that folder from the downloaded checkpoint")
        return AutoTokenizer.from_pretrained(folder)

    def max_instruction_tokens(self, model) -> int:
        return int(model.config.qformer_config.max_position_embeddings)


FAMILY = InstructBlipFamily()
