"""Backends behind `Agent`: torch (transformers + PEFT) and edge (llama.cpp + onnxruntime).

Each offers `adapters` (name -> AdapterInfo), `generate(image, question, adapter, kind, history,
max_new_tokens, on_text, stop_at_eos=True, sampling=None, lane=0) -> (tokens, info)` and `decode(tokens)`.
`info` holds the timings (seconds) plus `prompt_tokens`, `finish_reason` ("stop" or "length") and, when a
stop sequence ended the answer, `text` (the answer cut before it). `lanes` says how many generations may
run at once (each on its own lane index); `load_adapter(name)` / `unload_adapter(name)` change the set.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


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


class Cancelled(Exception):
    """Generation was asked to stop (the client left, or its time ran out)."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen and when the answer ends. temperature 0: greedy (the default)."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # the same seed (and request) gives the same answer
    stop: tuple[str, ...] = ()  # the answer ends before the first of these; it is not part of the answer

    def chooser(self) -> Callable[[np.ndarray], int] | None:
        """A function logits -> token id with its own random state, or None for greedy (argmax)."""
        if self.temperature <= 0:
            return None
        rng = np.random.default_rng(self.seed)
        return lambda logits: sample_token(logits, self.temperature, self.top_p, rng)


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Softmax at `temperature`, kept to the smallest set of tokens whose mass reaches `top_p` (nucleus)."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1] if top_p < 1 else order
    q = p[keep] / p[keep].sum()
    return int(keep[rng.choice(len(keep), p=q)])


class TextStream:
    """Turns a growing token list into new text pieces (BPE pieces can split a character), cuts the answer
    at the first stop sequence (holding back text that may be the start of one) and raises Cancelled
    when `cancel` is set."""

    def __init__(self, decode, on_text, stop=(), cancel: threading.Event | None = None):
        self.decode, self.on_text, self.tokens, self.sent = decode, on_text, [], ""
        self.stop, self.cancel = tuple(s for s in stop if s), cancel
        self.text: str | None = None  # the answer cut before a stop sequence, once one appeared

    @property
    def stopped(self) -> bool:
        return self.text is not None

    def push(self, token: int) -> bool:
        """Take one more token; True when a stop sequence has appeared and decoding should end."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled
        self.tokens.append(token)
        if not self.on_text and not self.stop:  # nobody listens and nothing to watch: skip the detokenising
            return False
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut].rstrip()
            self._emit(self.text)
            return True
        if not text.endswith("\ufffd"):
            self._emit(text[:len(text) - self._held_back(text)])
        return False

    def finish(self) -> None:
        """Send what is left, even a character the token cap cut in half."""
        if self.on_text and not self.stopped:
            self._emit(self.decode(self.tokens))

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that could still grow into a stop sequence."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _emit(self, text: str) -> None:
        if self.on_text and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text


def finish_reason(stream: TextStream, n_tokens: int, max_new_tokens: int) -> str:
    return "stop" if stream.stopped or n_tokens < max_new_tokens else "length"
