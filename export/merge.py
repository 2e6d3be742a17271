"""Merged export: one task adapter's LoRA folded into the LLM and the Q-Former, saved as a plain
transformers directory (what transformers and vLLM load with no PEFT at all)."""
from __future__ import annotations

from pathlib import Path


def merge_adapter(backend, name: str, out: Path) -> None:
    from peft import PeftModel

    from mmagent.train.adapters import save_soft_prompt
    merged = PeftModel.from_pretrained(backend.fresh_base(), backend.adapter_paths[name]).merge_and_unload()
    merged.save_pretrained(out)
    backend.vlm.tokenizer.save_pretrained(out)
    backend.vlm.image_processor.save_pretrained(out)
    soft = backend.soft_prompts.get(name)
    if soft is not None:  # a soft prompt cannot be folded into weights: it travels beside them
        save_soft_prompt(out, soft)
