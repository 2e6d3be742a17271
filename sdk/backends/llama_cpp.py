"""Run an exported GGUF LLM through llama-cpp-python's low-level API, with image embeddings fed as a batch.

Low-level so that a prompt can mix token ids and embedding rows (the vision bridge's output), and so that
LoRA adapters can be switched per request without reloading anything.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence

import llama_cpp
import numpy as np

Segment = Sequence[int] | np.ndarray  # token ids, or float32 embeddings [n, n_embd]


@llama_cpp.llama_log_callback
def _drop_log(level, text, user_data):
    pass


def silence_llama_cpp() -> None:
    # llama.cpp logs every load to stderr; the callback is module-level so ctypes never frees it.
    llama_cpp.llama_log_set(_drop_log, ctypes.c_void_p(0))


BYTES_PER_THREAD = 256 << 20  # below this much weight a thread's share costs less than syncing it


def _usable_cpus() -> int:
    # The CPUs this process may run on (taskset, container limits), not all the host has.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads(model_bytes: int) -> int:
    """MMAGENT_THREADS wins; else one thread per 256 MB of weights, up to the usable CPUs. llama.cpp's
    threads spin-wait on each other: for the 16 MB default model one thread decodes 1.8x faster than two."""
    if os.environ.get("MMAGENT_THREADS"):
        value = os.environ["MMAGENT_THREADS"]
        if not value.isdigit():
            raise ValueError(f"MMAGENT_THREADS={value!r}: expected a whole number of threads, e.g. MMAGENT_THREADS=1")
        return max(1, int(value))
    return max(1, min(_usable_cpus(), 1 + model_bytes // BYTES_PER_THREAD))


class LlamaCppLM:
    """One GGUF LLM in llama.cpp with one context (a single sequence), plus LoRA adapters loaded beside it.

    Each `generate` starts from an empty KV cache; prompts are lists of token-id and embedding segments.
    """

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None,
                 n_gpu_layers: int = 0):
        self._ctx = self._model = None
        self._adapters: dict[str, tuple] = {}  # name -> (adapter, ctypes array of it, ctypes scales)
        silence_llama_cpp()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(os.fsencode(gguf_path), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        threads = n_threads or default_threads(llama_cpp.llama_model_size(self._model))
        self._ctx = llama_cpp.llama_init_from_model(self._model, self._context_params(n_ctx, threads))
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {gguf_path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_ctx = n_ctx
        self.n_embd = llama_cpp.llama_model_n_embd_inp(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.active_adapter: str | None = None
        self._n_past = 0

    @staticmethod
    def _context_params(n_ctx: int, n_threads: int):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx  # one batch holds any prompt that fits the context
        params.n_threads = params.n_threads_batch = n_threads
        return params

    # ---- adapters -------------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        if name in self._adapters:
            raise ValueError(f"an adapter named `{name}` is already loaded")
        adapter = llama_cpp.llama_adapter_lora_init(self._model, os.fsencode(path))
        if not adapter:
            raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path} for this model")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        self._adapters[name] = (adapter, adapters, (ctypes.c_float * 1)(1.0))

    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` (None: the bare base) the one applied; the KV cache, built under the old one, goes."""
        if name is not None and name not in self._adapters:
            raise KeyError(f"no adapter `{name}` loaded; loaded: {', '.join(self._adapters) or 'none'}")
        _, adapters, scales = self._adapters[name] if name is not None else (None, None, None)
        status = llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 0 if name is None else 1, scales)
        if status != 0:
            raise RuntimeError(f"llama.cpp could not switch to adapter `{name}` (status {status})")
        self.active_adapter = name
        self._clear_cache()

    # ---- tokens ---------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens such as <|im_start|> parsed; no BOS added."""
        data = text.encode()
        capacity = len(data) + 8
        while True:
            ids = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), ids, capacity, False, True)
            if n >= 0:
                return list(ids[:n])
            capacity = -n

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` with special tokens left out, as HF's decode(skip_special_tokens=True)."""
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        capacity = 16 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(capacity)
            n = llama_cpp.llama_detokenize(self._vocab, tokens, len(ids), buf, capacity, False, False)
            if n >= 0:
                return buf.raw[:n].decode(errors="replace")
            capacity = -n

    # ---- decoding -------------------------------------------------------------------------------------------

    def _clear_cache(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._n_past = 0

    def _decode(self, n: int, fill: Callable[[llama_cpp.llama_batch], None], embd: int) -> None:
        """Decode n positions after the cached ones; `fill` writes the tokens or embeddings into the batch."""
        if self._n_past + n > self.n_ctx:
            raise ValueError(f"prompt and output need {self._n_past + n} positions; the context holds {self.n_ctx}")
        batch = llama_cpp.llama_batch_init(n, embd, 1)
        try:
            batch.n_tokens = n
            fill(batch)
            for i in range(n):
                batch.pos[i] = self._n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n - 1  # only the last position's logits are read
            status = llama_cpp.llama_decode(self._ctx, batch)
        finally:
            llama_cpp.llama_batch_free(batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed (status {status})")
        self._n_past += n

    def _decode_tokens(self, ids: Sequence[int]) -> None:
        def fill(batch):
            for i, token in enumerate(ids):
                batch.token[i] = token
        self._decode(len(ids), fill, 0)

    def _decode_embeddings(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)  # held here until llama.cpp has its own copy
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise ValueError(f"embeddings must be [n, {self.n_embd}], got {list(rows.shape)}")
        self._decode(len(rows), lambda batch: ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes), self.n_embd)

    def _feed(self, segments: Sequence[Segment]) -> None:
        self._clear_cache()
        for segment in segments:
            if len(segment) == 0:
                continue
            if isinstance(segment, np.ndarray):
                self._decode_embeddings(segment)
            else:
                self._decode_tokens(segment)
        if self._n_past == 0:
            raise ValueError("nothing to decode: every segment is empty")

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))

    def next_token_logits(self, segments: Sequence[Segment]) -> np.ndarray:
        """Logits for the token after `segments` (fed from an empty cache), a copy of llama.cpp's buffer."""
        self._feed(segments)
        return self._last_logits().copy()

    def generate(self, segments: Sequence[Segment], max_new_tokens: int,
                 on_token: Callable[[int], None] | None = None, stop_at_eos: bool = True) -> list[int]:
        """Feed `segments` in order from an empty cache, then decode greedily until an end token or
        `max_new_tokens`. The end token is not returned. `stop_at_eos=False` decodes exactly
        `max_new_tokens` (benchmarks)."""
        self._feed(segments)
        out: list[int] = []
        max_new_tokens = min(max_new_tokens, self.n_ctx - self._n_past)  # stop at the context's end
        while len(out) < max_new_tokens:
            token = int(np.argmax(self._last_logits()))
            if stop_at_eos and llama_cpp.llama_vocab_is_eog(self._vocab, token):
                break
            out.append(token)
            if on_token is not None:
                on_token(token)
            if len(out) < max_new_tokens:
                self._decode_tokens([token])
        return out

    # ---- lifetime -------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
        for adapter, _, _ in self._adapters.values():
            llama_cpp.llama_adapter_lora_free(adapter)
        if self._model:
            llama_cpp.llama_model_free(self._model)
        self._ctx = self._model = None
        self._adapters = {}

    def __del__(self):
        self.close()

    def __enter__(self) -> LlamaCppLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
