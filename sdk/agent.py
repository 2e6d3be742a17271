"""`Agent`: one API over the torch and edge backends for agent code.

    agent = Agent.load("bundle/")                 # a bundle, a run directory, or several runs
    agent.ask("photo.png", "What colour is the circle?")
    with agent.using("caption"): agent.ask("photo.png", "Describe it.")

Thread-safety contract: an Agent may be shared between threads. Each call picks its adapter (argument,
else the calling thread's `using`, else the router) and runs switch + generation on a lane of its own
(the edge backend can have several, `lanes=N`; the torch backend has one), so no call ever sees another
call's adapter. `load_adapter` / `unload_adapter` change the adapters while calls run: a call finishes on
the adapter it started with (an unloaded adapter is freed when its last call ends). Separate Agents
share nothing.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from mmagent.adapters import AdapterInfo, require
from mmagent.artifacts import BUNDLE, kind_of
from mmagent.backends import Sampling
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
    prompt_tokens: int = 0  # positions the prompt took (image and soft-prompt rows included)
    finish_reason: str = "stop"  # "stop": the model or a stop sequence ended it; "length": max_new_tokens did

    def __str__(self) -> str:
        return self.text


class _Cancelled(Exception):
    """Raised inside generation when a stream's consumer has gone away."""


class Agent:
    def __init__(self, backend):
        self.backend = backend
        self._lock = threading.RLock()  # the adapter bookkeeping below (never held while generating)
        self._admin = threading.Lock()  # one adapter load or unload at a time
        self._local = threading.local()
        self.lanes = int(getattr(backend, "lanes", 1))
        self._free_lanes: queue.SimpleQueue[int] = queue.SimpleQueue()
        for lane in range(self.lanes):
            self._free_lanes.put(lane)
        self._in_use: Counter[str] = Counter()  # adapter -> calls running on it
        self._leaving: set[str] = set()  # unloaded, freed when their last call ends (a load revives them)
        self._freeing: set[str] = set()  # being freed now
        self._freed = threading.Condition(self._lock)

    @classmethod
    def load(cls, path, backend: str = "auto", **options) -> "Agent":
        """A bundle (manifest.json), a run directory (adapters/), a merged directory, or a list of runs."""
        paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"`{p}` does not exist; give a bundle, a run directory or a model directory")
        kind = backend if backend != "auto" else ("edge" if kind_of(paths[0]) == BUNDLE else "torch")
        if kind == "edge":
            from mmagent.backends.edge import EdgeBackend
            return cls(EdgeBackend(paths[0], **options))
        if kind == "torch":
            from mmagent.backends.torch import TorchBackend
            return cls(TorchBackend(paths, **options))
        raise ValueError(f"backend must be auto, torch or edge, got {backend!r}")

    def close(self) -> None:
        """Free the backend's native memory (llama.cpp) now rather than at garbage collection; calls that
        are running finish first."""
        with self._every_lane(always=True):
            getattr(self.backend, "close", lambda: None)()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return [n for n in list(self.backend.adapters) if n not in self._leaving | self._freeing]

    def available_adapters(self) -> list[str]:
        """Adapters `load_adapter` can load: a bundle's, as its manifest lists them now (`mmagent export RUN
        --into BUNDLE` adds one), or the runs' this agent was loaded from."""
        return list(self.backend.available_adapters())

    def load_adapter(self, name: str) -> None:
        """Load task adapter `name` (by name only: a bundle's adapter is verified against its manifest first)
        while other calls run."""
        with self._lock:
            if name in self._leaving:  # unloaded, but calls on it still run: it is still in memory
                self._leaving.discard(name)
                return
            if not self._freed.wait_for(lambda: name not in self._freeing, timeout=60):
                raise AdapterBusy(f"adapter `{name}` is still being freed; try again")
            if name in self.backend.adapters:
                raise AdapterBusy(f"adapter `{name}` is already loaded")
        with self._admin, self._every_lane():
            self.backend.load_adapter(name)

    def unload_adapter(self, name: str) -> None:
        """Stop routing to adapter `name` now; its memory is freed when the calls that started on it end."""
        with self._lock:
            if name not in self.adapters:
                raise KeyError(f"no adapter `{name}` is loaded; loaded: {', '.join(self.adapters) or 'none'}")
            self._leaving.add(name)
            now = self._start_freeing(name)
        if now:
            self._free_adapter(name)

    def _start_freeing(self, name: str) -> bool:
        """Under the lock: whether `name` is leaving and no call runs on it, so it is to be freed now."""
        if name not in self._leaving or self._in_use[name] > 0:
            return False
        self._leaving.discard(name)
        self._freeing.add(name)
        return True

    def _free_adapter(self, name: str) -> None:
        try:
            with self._admin, self._every_lane():
                self.backend.unload_adapter(name)
        finally:
            with self._lock:
                self._freeing.discard(name)
                self._freed.notify_all()

    @contextmanager
    def _every_lane(self, always: bool = False):
        """Wait for every running call to end, for backends that cannot change adapters under one (torch)."""
        if getattr(self.backend, "live_adapters", False) and not always:
            yield
            return
        taken = [self._free_lanes.get() for _ in range(self.lanes)]
        try:
            yield
        finally:
            for lane in taken:
                self._free_lanes.put(lane)

    def _claim(self, instruction: str, adapter: str | None) -> Route:
        """Route among the loaded adapters and count the call on the chosen one until `_release`."""
        with self._lock:
            gone = self._leaving | self._freeing
            live = {n: list(a.kinds) for n, a in dict(self.backend.adapters).items() if n not in gone}
            r = self._route(instruction, adapter, live)
            if r.adapter is not None:
                self._in_use[r.adapter] += 1
        return r

    def _release(self, adapter: str | None) -> None:
        if adapter is None:
            return
        with self._lock:
            self._in_use[adapter] -= 1
            if self._in_use[adapter] <= 0:
                del self._in_use[adapter]
            now = self._start_freeing(adapter)
        if now:
            self._free_adapter(adapter)

    def adapter_info(self, name: str) -> AdapterInfo:
        require(name, self.adapters)
        return self.backend.adapters[name]

    def _route(self, instruction: str, adapter: str | None, live: dict[str, list[str]]) -> Route:
        chosen = adapter if adapter is not None else getattr(self._local, "adapter", None)
        return route(instruction, live, chosen)

    @contextmanager
    def using(self, adapter: str):
        """Within the block, this thread's calls use `adapter` unless they name another."""
        require(adapter, self.adapters)
        previous = getattr(self._local, "adapter", None)
        self._local.adapter = adapter
        try:
            yield self
        finally:
            self._local.adapter = previous

    def ask(self, image, question: str, adapter: str | None = None, max_new_tokens: int = 48,
            history=(), on_text=None, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
            stop=(), cancel: threading.Event | None = None) -> Answer:
        """Answer `question` about `image`. temperature 0 (the default) decodes greedily; above 0 it samples
        (nucleus `top_p`; the same `seed` gives the same answer). The answer ends before the first of the
        `stop` strings. Setting `cancel` ends the call with mmagent.backends.Cancelled."""
        sampling = make_sampling(temperature, top_p, seed, stop)
        picture = load_image(image)
        r = self._claim(question, adapter)
        try:
            queued = time.perf_counter()
            lane = self._free_lanes.get()
            try:
                start = time.perf_counter()
                tokens, info = self.backend.generate(picture, question, r.adapter, r.kind, history, max_new_tokens,
                                                     on_text, sampling=sampling, lane=lane, cancel=cancel)
                text = info.pop("text") if "text" in info else self.backend.decode(tokens)
            finally:
                self._free_lanes.put(lane)
        finally:
            self._release(r.adapter)
        prompt_tokens, finish = info.pop("prompt_tokens", 0), info.pop("finish_reason", "stop")
        info.update(total=time.perf_counter() - start, queued=start - queued)
        return Answer(text, r.adapter, r.reason, tokens, info, prompt_tokens, finish)

    def stream(self, image, question: str, adapter: str | None = None, max_new_tokens: int = 48,
               **decoding) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are decoded (`decoding`: as `ask` takes)."""
        # Resolved here, in the caller's thread: `using` is thread-local and the worker below is another thread.
        chosen = adapter if adapter is not None else getattr(self._local, "adapter", None)
        make_sampling(**{k: v for k, v in decoding.items() if k != "cancel"})  # refuse bad values in the caller
        return self._stream(image, question, chosen, max_new_tokens, decoding)

    def _stream(self, image, question, adapter, max_new_tokens, decoding) -> Iterator[str]:
        import queue
        pieces: queue.Queue = queue.Queue()
        done, cancelled = object(), threading.Event()

        def on_text(piece: str) -> None:
            if cancelled.is_set():  # the consumer left: stop decoding and free the agent's lock
                raise _Cancelled
            pieces.put(piece)

        def work():
            try:
                self.ask(image, question, adapter, max_new_tokens, on_text=on_text, **decoding)
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


class AdapterBusy(ValueError):
    """The adapter is already loaded, or still finishing calls after an unload."""


def make_sampling(temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop=()) -> Sampling:
    """Check the decoding options (each error names the option and the fix) and bundle them."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ValueError(f"temperature must be a number from 0 (greedy) to 2, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number above 0 and at most 1, got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return Sampling(float(temperature), float(top_p), seed, stop)
