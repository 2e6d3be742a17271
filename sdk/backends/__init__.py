"""Backends behind `Agent`: torch (transformers + PEFT) and edge (llama.cpp + onnxruntime).

Each offers `adapters` (name -> AdapterInfo), `generate(image, question, adapter, kind, history,
max_new_tokens, on_text, stop_at_eos=True) -> (tokens, timings)` and `decode(tokens)`.
"""
from __future__ import annotations

from mmagent.train.data.records import default_instruction


def prompt_parts(question: str, kind: str, instructions: dict) -> tuple[str, str]:
    """(instruction, input) in the form the adapter was trained on."""
    instruction = instructions.get(kind) or default_instruction(kind)
    return (instruction, "") if kind == "caption" else (instruction, question)


class TextStream:
    """Turns a growing token list into new text pieces (BPE pieces can split a character)."""

    def __init__(self, decode, on_text):
        self.decode, self.on_text, self.tokens, self.sent = decode, on_text, [], ""

    def push(self, token: int) -> None:
        self.tokens.append(token)
        self._emit(final=False)

    def finish(self) -> None:
        """Send what is left, even a character the token cap cut in half."""
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if not self.on_text:  # nobody listens: skip the detokenising
            return
        text = self.decode(self.tokens)
        if (final or not text.endswith("\ufffd")) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text
