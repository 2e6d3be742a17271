"""Merged export: one task adapter's LoRA folded into the LLM and the Q-Former, saved as a plain
transformers directory (what transformers and vLLM load with no PEFT at all)."""
from __future__ import annotations

from pathlib import Path


def merge_adapter(backend, name: str, out: Path) -> None:
    from mmagent.backends.torch import attach
    from mmagent.train.adapters import save_soft_prompt
    adapter = backend.adapters[name]  # the record the backend read: the same LoRA every other writer uses
    merged = attach(backend.fresh_base(), adapter).merge_and_unload()
    merged.save_pretrained(out)
    backend.vlm.tokenizer.save_pretrained(out)
    copy_sentencepiece_model(backend.vlm.tokenizer, out)
    backend.vlm.image_processor.save_pretrained(out)
    if backend.vlm.qformer_tokenizer is not None:  # InstructBLIP reads the instruction with its own tokenizer
        from mmagent.train.families.instructblip import QFORMER_TOKENIZER
        backend.vlm.qformer_tokenizer.save_pretrained(out / QFORMER_TOKENIZER)
    if adapter.soft_prompt is not None:  # a soft prompt cannot be folded into weights: it travels beside them
        save_soft_prompt(out, adapter.soft_prompt)


def copy_sentencepiece_model(tokenizer, out: Path) -> None:
    """A SentencePiece LLM's tokenizer.model beside the saved tokenizer, as the hub checkpoint has it:
    transformers' save_pretrained writes tokenizer.json only, and GGUF converters (ours, llama.cpp's) read the
    piece scores from tokenizer.model."""
    import shutil
    source = Path(getattr(tokenizer, "vocab_file", None) or "")
    if source.name == "tokenizer.model" and source.is_file():
        shutil.copyfile(source, out / "tokenizer.model")
