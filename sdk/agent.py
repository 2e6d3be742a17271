"""`Agent`: one API over the torch and edge backends for agent code.

    agent = Agent.load("bundle/")                 # a bundle, a run directory, or several runs
    agent.ask("photo.png", "What colour is the circle?")
    with agent.using("caption"): agent.ask("photo.png", "Describe it.")

Thread-safety contract: an Agent may be shared between threads. Each call picks its adapter (argument,
else the calling thread's `using`, else the router) and runs switch + generation under the agent's lock,
so no call ever sees another call's adapter. Separate Agents share nothing.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from mmagent.images import load_image
from mmagent.router import Route, route

if TYPE_CHECKING:
    from mmagent.chat import ChatSession


@dataclass
class Answer:
    text: str
    adapter: str | None
    reason: str
    tokens: list[int] = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # seconds: queued, first_token, total (+ image on edge); tokens_per_s

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    kinds: tuple[str, ...]
    parts: tuple[str, ...]
    soft_prompt_tokens: int


class _Cancelled(Exception):
    """Raised inside generation when a stream's consumer has gone away."""


class Agent:
    def __init__(self, backend):
        self.backend = backend
        self._lock = threading.RLock()
        self._local = threading.local()

    @classmethod
    def load(cls, path, backend: str = "auto", **options) -> "Agent":
        """A bundle (manifest.json), a run directory (adapters/), a merged directory, or a list of runs."""
        paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"`{p}` does not exist; give a bundle, a run directory or a model directory")
        kind = backend if backend != "auto" else ("edge" if (paths[0] / "manifest.json").exists() else "torch")
        if kind == "edge":
            from mmagent.backends.edge import EdgeBackend
            return cls(EdgeBackend(paths[0], **options))
        if kind == "torch":
            from mmagent.backends.torch import TorchBackend
            return cls(TorchBackend(paths, **options))
        raise ValueError(f"backend must be auto, torch or edge, got {backend!r}")

    def close(self) -> None:
        """Free the backend's native memory (llama.cpp) now rather than at garbage collection."""
        with self._lock:
            getattr(self.backend, "close", lambda: None)()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def adapters(self) -> list[str]:
        return list(self.backend.adapters)

    def adapter_info(self, name: str) -> AdapterInfo:
        if name not in self.backend.adapters:
            raise KeyError(f"no adapter `{name}`; this model has: {', '.join(self.adapters)}")
        return self.backend.adapters[name]

    def _route(self, instruction: str, adapter: str | None) -> Route:
        chosen = adapter if adapter is not None else getattr(self._local, "adapter", None)
        return route(instruction, {n: list(a.kinds) for n, a in self.backend.adapters.items()}, chosen)

    @contextmanager
    def using(self, adapter: str):
        """Within the block, this thread's calls use `adapter` unless they name another."""
        if adapter not in self.backend.adapters:
            raise KeyError(f"no adapter `{adapter}`; this model has: {', '.join(self.adapters)}")
        previous = getattr(self._local, "adapter", None)
        self._local.adapter = adapter
        try:
            yield self
        finally:
            self._local.adapter = previous

    def ask(self, image, question: str, adapter: str | None = None, max_new_tokens: int = 48,
            history=(), on_text=None) -> Answer:
        picture = load_image(image)
        r = self._route(question, adapter)
        queued = time.perf_counter()
        with self._lock:
            start = time.perf_counter()
            tokens, timings = self.backend.generate(picture, question, r.adapter, r.kind, history,
                                                    max_new_tokens, on_text)
            text = self.backend.decode(tokens)
        timings.update(total=time.perf_counter() - start, queued=start - queued)
        return Answer(text, r.adapter, r.reason, tokens, timings)

    def stream(self, image, question: str, adapter: str | None = None, max_new_tokens: int = 48) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are decoded."""
        # Resolved here, in the caller's thread: `using` is thread-local and the worker below is another thread.
        chosen = adapter if adapter is not None else getattr(self._local, "adapter", None)
        return self._stream(image, question, chosen, max_new_tokens)

    def _stream(self, image, question, adapter, max_new_tokens) -> Iterator[str]:
        import queue
        pieces: queue.Queue = queue.Queue()
        done, cancelled = object(), threading.Event()

        def on_text(piece: str) -> None:
            if cancelled.is_set():  # the consumer left: stop decoding and free the agent's lock
                raise _Cancelled
            pieces.put(piece)

        def work():
            try:
                self.ask(image, question, adapter, max_new_tokens, on_text=on_text)
            except _Cancelled:
                pass
            except BaseException as e:  # surfaced to the consumer below
                pieces.put(e)
            finally:
                pieces.put(done)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    def chat(self, image, adapter: str | None = None) -> "ChatSession":
        from mmagent.chat import ChatSession
        return ChatSession(self, image, adapter)
