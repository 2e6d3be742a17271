"""Backends behind `Agent`: torch (transformers + PEFT) and edge (llama.cpp + onnxruntime).

Each offers `adapters` (name -> AdapterInfo), `generate(image, question, adapter, kind, history,
max_new_tokens, on_text, stop_at_eos=True) -> (tokens, timings)` and `decode(tokens)`.
"""
from __future__ import annotations


class PromptTooLong(ValueError):
    """The prompt (system, history, image and soft-prompt positions, question) does not fit the context."""


def check_image(image) -> None:
    """Backends are handed decoded images (Agent runs mmagent.images.load_image); a caller that skips it
    still gets the same refusal for an image without pixels."""
    w, h = getattr(image, "size", (1, 1))
    if not w or not h:
        from mmagent.images import ImageError
        raise ImageError(f"the image is empty ({w}x{h} pixels); pass an image with at least one pixel")


def check_fits(n_prompt: int, n_ctx: int) -> None:
    """Refuse a prompt that leaves no position for the answer, the same way on every backend."""
    if n_prompt >= n_ctx:
        raise PromptTooLong(f"the prompt is {n_prompt} tokens (image and soft-prompt positions and any earlier "
                            f"turns included), but the model's context holds {n_ctx}, leaving no room for the "
                            f"answer; shorten the question by at least {n_prompt - n_ctx + 1} tokens or send "
                            "fewer earlier turns (history)")


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
