"""Run an exported GGUF LLM through llama-cpp-python's low-level API, with image embeddings fed as a batch.

Low-level so that a prompt can mix token ids and embedding rows (the vision bridge's output), and so that
LoRA adapters can be switched per request without reloading anything.

llama.cpp's extra CPU buffer types (Intel AMX kernels, repacked weights) are its fast CPU paths, but some
builds' AMX kernels crash: GCC 12's `_tile_loadconfig` tells the optimiser it reads 8 bytes of the
64-byte tile configuration, so the stores that fill it are dropped and `ldtilecfg` loads stack garbage
(a general-protection fault, i.e. SIGSEGV, in `ggml_backend_amx_mul_mat` on the first batch of more
than one row). `make install` builds llama-cpp-python with dead-store elimination off, which keeps the
stores; for any other build a child process probes the batched AMX path once per library and CPU, and
a build that crashes there runs without extra buffer types (slower, correct). docs/BENCHMARKS.md has both.
"""
from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
import numpy as np

from mmagent.adapters import require

Segment = Sequence[int] | np.ndarray  # token ids, or float32 embeddings [n, n_embd]


@llama_cpp.llama_log_callback
def _drop_log(level, text, user_data):
    pass


def silence_llama_cpp() -> None:
    # llama.cpp logs every load to stderr; the callback is module-level so ctypes never frees it.
    llama_cpp.llama_log_set(_drop_log, ctypes.c_void_p(0))


PROBE_VERSION = 1  # bump when the probe changes, so cached verdicts are redone


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode(errors="replace")


def _library_identity() -> str:
    """The loaded CPU backend library and this CPU: a probe verdict holds for exactly this pair."""
    lib = Path(llama_cpp.__file__).parent / "lib"
    files = sorted(lib.glob("libggml-cpu*")) or sorted(lib.glob("*ggml*"))
    stats = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]
    cpu = next((line for line in _read("/proc/cpuinfo").splitlines() if line.startswith("model name")), "")
    return json.dumps([PROBE_VERSION, llama_cpp.__version__, str(lib), stats, cpu, system_info()])


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def extra_buffer_types_usable() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types here. MMAGENT_LLAMA_EXTRA_BUFTS=0/1 decides;
    else yes where the build has no AMX kernels, and where it has them, what a cached child-process probe
    of a batched quantised decode found."""
    forced = os.environ.get("MMAGENT_LLAMA_EXTRA_BUFTS")
    if forced in ("0", "1"):
        return forced == "1"
    if "AMX_INT8 = 1" not in system_info():
        return True
    return _probe_verdict()


@functools.lru_cache(maxsize=1)
def _probe_verdict() -> bool:
    from mmagent.files import atomic_write_json, cache_root
    from mmagent.isolate import NativeCrash, run_isolated
    identity = _library_identity()
    path = cache_root() / "llama-cpp-probe" / (hashlib.sha256(identity.encode()).hexdigest()[:16] + ".json")
    if path.exists():
        return bool(json.loads(path.read_text())["extra_buffer_types"])
    try:
        run_isolated("llama.cpp AMX probe (a batched Q8_0 decode)", "a 1-layer test model", probe_batched_decode,
                     True, timeout=300)
        ok, why = True, "a batched Q8_0 decode with the AMX buffer type ran"
    except NativeCrash as e:
        ok, why = False, str(e).splitlines()[0]
        logging.getLogger("mmagent").warning(
            "llama.cpp's AMX kernels crash with this llama-cpp-python build on this CPU (%s); running without "
            "llama.cpp's extra CPU buffer types, which is slower. `make install` builds a llama-cpp-python whose "
            "AMX kernels work (see README).", why)
    atomic_write_json(path, {"extra_buffer_types": ok, "why": why, "identity": json.loads(identity)})
    return ok


def probe_batched_decode(extra_buffer_types: bool) -> bool:
    """Decode an 8-token batch through a 1-layer Q8_0 model (the shape of work that reaches llama.cpp's
    AMX tile kernels). Run in a child process: a broken build dies here, not in the caller."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.q8_0.gguf"
        write_random_gguf(path)
        with LlamaCppLM(path, n_ctx=32, n_threads=1, extra_buffer_types=extra_buffer_types) as lm:
            logits = lm.next_token_logits([list(range(8))])
    return bool(np.isfinite(logits).all())


def write_random_gguf(path: Path, n_embd: int = 64, n_ff: int = 128, n_vocab: int = 64, n_layers: int = 1,
                      n_head: int = 2, n_head_kv: int = 2, dtype: str = "q8_0") -> None:
    """A LLaMA with random weights (matrices in q8_0 or f16) and no vocabulary: the AMX probe's model (1 layer,
    shapes those kernels accept), or a stand-in of a real model's shape for timing llama.cpp's settings."""
    import gguf
    rng = np.random.default_rng(0)
    kind = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16}[dtype]

    def matrix(*shape):
        return gguf.quants.quantize(rng.normal(0, 0.05, shape).astype(np.float32), kind)

    w = gguf.GGUFWriter(str(path), "llama")
    head_dim = n_embd // n_head
    for add, value in ((w.add_context_length, 2048), (w.add_embedding_length, n_embd), (w.add_block_count, n_layers),
                       (w.add_feed_forward_length, n_ff), (w.add_head_count, n_head), (w.add_head_count_kv, n_head_kv),
                       (w.add_rope_dimension_count, head_dim), (w.add_layer_norm_rms_eps, 1e-5),
                       (w.add_vocab_size, n_vocab), (w.add_tokenizer_model, "none")):
        add(value)
    w.add_tensor("token_embd.weight", rng.normal(0, 0.05, (n_vocab, n_embd)).astype(np.float32))
    w.add_tensor("output.weight", matrix(n_vocab, n_embd), raw_dtype=kind)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    kv = n_head_kv * head_dim
    for i in range(n_layers):
        for name, shape in (("attn_q", (n_embd, n_embd)), ("attn_k", (kv, n_embd)), ("attn_v", (kv, n_embd)),
                            ("attn_output", (n_embd, n_embd)), ("ffn_gate", (n_ff, n_embd)),
                            ("ffn_up", (n_ff, n_embd)), ("ffn_down", (n_embd, n_ff))):
            w.add_tensor(f"blk.{i}.{name}.weight", matrix(*shape), raw_dtype=kind)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(n_embd, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _usable_cpus() -> set[int]:
    # The CPUs this process may run on (taskset, container limits), not all the host has.
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs' worth of time a container's cgroup grants (`docker --cpus=2`: 2), None when unlimited. Affinity
    still shows every host CPU there, and llama.cpp's spin-waiting threads beyond the quota stall each other."""
    v2 = _read(cgroup / "cpu.max").split()  # "max 100000" or "200000 100000"
    v1 = [_read(cgroup / "cpu" / f"cpu.cfs_{x}_us").strip() for x in ("quota", "period")]
    quota, period = v2[:2] if len(v2) == 2 else v1
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max", or no such files
        return None
    return max(1, -(-quota_us // period_us)) if quota_us > 0 and period_us > 0 else None


def _physical_cores(cpus: set[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """How many physical cores `cpus` are on: hyperthread siblings share one (sysfs topology; a CPU whose
    topology is unreadable counts as a core of its own)."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        core = (_read(topology / "physical_package_id").strip(), _read(topology / "core_id").strip())
        cores.add(core if all(core) else ("cpu", str(cpu)))
    return max(1, len(cores))


def default_threads(offloaded: bool = False, lanes: int = 1) -> int:
    """MMAGENT_THREADS wins; else, as llama.cpp's own default, one thread per usable physical core (no more
    than a container's CPU quota), shared by the `lanes` that decode at once (llama.cpp's threads spin-wait,
    so oversubscribing them stalls all). Measured on a 16-core host: SmolLM2-135M's shape decoded 3.3-8x
    faster on 16 threads than on the 1-2 that the earlier one-thread-per-256-MB rule gave, a 4-layer tiny
    shape 2.9-3.8x faster than on 1 (bench/llama_settings.py; docs/BENCHMARKS.md). Layers on the GPU: half the usable CPUs, as
    llama-cpp-python's `Llama` takes; the CPU then only looks up token embeddings."""
    if os.environ.get("MMAGENT_THREADS"):
        value = os.environ["MMAGENT_THREADS"]
        if not value.isdigit():
            raise ValueError(f"MMAGENT_THREADS={value!r}: expected a whole number of threads, e.g. MMAGENT_THREADS=1")
        return max(1, int(value))
    cpus = _usable_cpus()
    limit = _cpu_quota() or len(cpus)
    if offloaded:
        return max(1, min(len(cpus), limit) // 2)
    return max(1, min(_physical_cores(cpus), limit) // max(1, lanes))


FLASH_ATTN_TYPES = {"on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}


def flash_attn_mode(mode: str | None = None, offloaded: bool = False) -> str:
    """Flash attention for a llama.cpp context: `mode`, else MMAGENT_LLAMA_FLASH_ATTN, else by device. With
    layers on a GPU off (as `Llama` has it): llama.cpp's "auto" decoded a 7B 9-12% slower on an H200 with our
    CUDA build. On the CPU llama.cpp's "auto": on an Intel AMX CPU it decoded SmolLM2-135M 4-19% faster and
    filled prompts 19-65% faster (bench/llama_settings.py, bench/llama_cpu_paths.py; docs/BENCHMARKS.md)."""
    source = "flash_attn"
    if mode is None:
        default = "off" if offloaded else "auto"
        mode, source = os.environ.get("MMAGENT_LLAMA_FLASH_ATTN", default), "MMAGENT_LLAMA_FLASH_ATTN"
    if mode not in FLASH_ATTN_TYPES:
        raise ValueError(f"{source}={mode!r}: expected one of {', '.join(FLASH_ATTN_TYPES)}, "
                         f"e.g. MMAGENT_LLAMA_FLASH_ATTN=on")
    return mode


class SharedLock:
    """Many holders at once, or one exclusive holder; an exclusive waiter goes before new shared ones.

    llama.cpp contexts over one model decode in parallel (shared), but adding or freeing a LoRA adapter
    edits the model's adapter set that every context reads when it builds its graph (exclusive)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = self._waiting = 0
        self._exclusive = False

    @contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not (self._exclusive or self._waiting))
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not (self._exclusive or self._shared))
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class LlamaCppLM:
    """One GGUF LLM in llama.cpp with one context (a single sequence), plus LoRA adapters loaded beside it.

    Each `generate` starts from an empty KV cache; prompts are lists of token-id and embedding segments.
    `lane()` adds another context over the same model and adapters, for one more sequence decoding at once
    from another thread (each context with its own KV cache and its own active adapter).
    """

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None,
                 n_gpu_layers: int = 0, extra_buffer_types: bool | None = None, flash_attn: str | None = None,
                 mmap: bool = True):
        """`flash_attn`: "on", "off" or "auto" (llama.cpp decides); None: `flash_attn_mode`'s default.
        `mmap=False` reads the GGUF into memory instead of mapping it (llama-cpp-python's `Llama` does so
        whenever it is given a LoRA)."""
        self._ctx = self._model = None
        self.flash_attn = flash_attn_mode(flash_attn, n_gpu_layers != 0)  # a bad value stops here, before loading
        self._adapters: dict[str, tuple] = {}  # name -> (adapter, ctypes array of it, ctypes scales)
        self._owner, self._lanes, self._guard = None, [], SharedLock()
        silence_llama_cpp()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        if not mmap:
            model_params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        model_params.use_extra_bufts = (extra_buffer_types_usable() if extra_buffer_types is None
                                        else extra_buffer_types)
        self._model = llama_cpp.llama_model_load_from_file(os.fsencode(gguf_path), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        threads = self.n_threads = n_threads or default_threads(offloaded=n_gpu_layers != 0)
        self._ctx = llama_cpp.llama_init_from_model(self._model, self._context_params(n_ctx, threads, self.flash_attn))
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {gguf_path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_ctx = n_ctx
        self.n_embd = llama_cpp.llama_model_n_embd_inp(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.active_adapter: str | None = None
        self._n_past = 0

    @staticmethod
    def _context_params(n_ctx: int, n_threads: int, flash_attn: str):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx  # one batch holds any prompt that fits the context
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = FLASH_ATTN_TYPES[flash_attn]
        return params

    def lane(self) -> LlamaCppLM:
        """Another context over this model and its adapters (loaded now or later), for one more sequence
        decoding in parallel from another thread. The first LlamaCppLM frees its lanes when it closes."""
        other = copy.copy(self)  # shares the model, the vocabulary, the adapter table and the guard
        other._owner, other._lanes, other._ctx, other.active_adapter, other._n_past = self, [], None, None, 0
        with self._guard.shared():
            params = self._context_params(self.n_ctx, self.n_threads, self.flash_attn)
            other._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not other._ctx:
            raise RuntimeError(f"llama.cpp could not create another context of {self.n_ctx} tokens")
        self._lanes.append(other)
        return other

    # ---- adapters -------------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        if name in self._adapters:
            raise ValueError(f"an adapter named `{name}` is already loaded")
        with self._guard.exclusive():
            adapter = llama_cpp.llama_adapter_lora_init(self._model, os.fsencode(path))
        if not adapter:
            raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path} for this model")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        self._adapters[name] = (adapter, adapters, (ctypes.c_float * 1)(1.0))

    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` (None: the bare base) the one applied; the KV cache, built under the old one, goes."""
        if name is not None:
            require(name, self._adapters)
        _, adapters, scales = self._adapters[name] if name is not None else (None, None, None)
        with self._guard.shared():
            status = llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 0 if name is None else 1, scales)
        if status != 0:
            raise RuntimeError(f"llama.cpp could not switch to adapter `{name}` (status {status})")
        self.active_adapter = name
        self._clear_cache()

    def unload_adapter(self, name: str) -> None:
        """Free adapter `name` on this model (every lane). The caller makes sure no generation still uses it;
        a lane that last applied it lets go of it first."""
        require(name, self._adapters)
        root = self._owner or self
        with self._guard.exclusive():  # no decode or switch runs anywhere meanwhile
            adapter, _, _ = self._adapters.pop(name)
            for lm in (root, *root._lanes):
                if lm.active_adapter == name and lm._ctx:
                    llama_cpp.llama_set_adapters_lora(lm._ctx, None, 0, None)
                    lm.active_adapter = None
            llama_cpp.llama_adapter_lora_free(adapter)

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
            with self._guard.shared():
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
                 on_token: Callable[[int], bool | None] | None = None, stop_at_eos: bool = True,
                 choose: Callable[[np.ndarray], int] | None = None, stop_ids=None) -> list[int]:
        """Feed `segments` in order from an empty cache, then decode until an end token, `max_new_tokens`
        or `on_token` returning True. `choose` picks a token from the logits (default: greedy). The end
        token (one of `stop_ids`; None: llama.cpp's end-of-generation set) is not returned.
        `stop_at_eos=False` decodes exactly `max_new_tokens` (benchmarks)."""
        self._feed(segments)
        out: list[int] = []
        max_new_tokens = min(max_new_tokens, self.n_ctx - self._n_past)  # stop at the context's end
        while len(out) < max_new_tokens:
            logits = self._last_logits()
            token = int(np.argmax(logits)) if choose is None else choose(logits)
            if stop_at_eos and (token in stop_ids if stop_ids is not None else self.is_end(token)):
                break
            out.append(token)
            if on_token is not None and on_token(token):
                break
            if len(out) < max_new_tokens:
                self._decode_tokens([token])
        return out

    def is_end(self, token: int) -> bool:
        """llama.cpp's own end-of-generation set (EOS, EOT and more, e.g. SmolLM2's <|endoftext|> and
        <reponame>); a bundle names the ids torch stops at instead (`stop_ids`), so both stop alike."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # ---- lifetime -------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owner is not None:  # a lane: its context only; the model and adapters are the owner's
            if self._ctx:
                llama_cpp.llama_free(self._ctx)
            self._ctx = None
            return
        for lane in self._lanes:
            lane.close()
        self._lanes = []
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
        for adapter, _, _ in self._adapters.values():
            llama_cpp.llama_adapter_lora_free(adapter)
        if self._model:
            llama_cpp.llama_model_free(self._model)
        self._ctx = self._model = None
        self._adapters.clear()  # the lanes' table too

    def __del__(self):
        self.close()

    def __enter__(self) -> LlamaCppLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
