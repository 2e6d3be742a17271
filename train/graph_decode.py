"""Batch-1 greedy decoding on CUDA: a static KV cache, and each decode step replayed as one CUDA graph.

Why: at batch 1 a decode step is a few hundred small kernels; launched one by one from Python (dynamic
cache) the GPU idles between them (transformers' generate: 45 tok/s on a 7B where the memory bound is
over 200). A static cache keeps every tensor at a fixed address, so one step (embed -> decoder ->
head -> argmax -> next input) is captured once and replayed; the step after is launched before the host
reads the current token, so the GPU never waits on Python.

One graph per (active adapter state, cache length bucket): PEFT's LoRA branches are baked into the
captured kernels, so switching adapters picks (or captures) another graph. `use_graphs=False` runs the
same static-cache steps eagerly (CPU tests check them against VLM.generate).

`compile_mode` (also MMAGENT_TORCH_COMPILE): the step goes through torch.compile before it is captured, so
inductor fuses the ~20 small kernels a layer runs eagerly (RMSNorm's six, RoPE's ten, SiLU·mul, residual
adds, the mask) into a few; the matrix-vector products stay cuBLAS's. A replayed graph still pays each
kernel's start and tail, so fewer kernels is what makes a 7B step approach its weights' read time. Modes:
torch.compile's ("default", "max-autotune-no-cudagraphs"; never its own CUDA graphs: we capture), or a
backend name ("aot_eager", for tests). Compiling costs a minute on a 7B, once per adapter state.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
from collections import OrderedDict

import torch

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "aot_eager")
BUCKET = 256  # cache lengths round up to this, so prompts of similar length share a graph
MAX_GRAPHS = 8  # least recently used graphs beyond this are dropped (each holds a KV cache)


class _Step:
    """A static KV cache of `length` positions, the decode step's fixed inputs, and its CUDA graph."""

    def __init__(self, config, length: int, device):
        from transformers.cache_utils import StaticCache
        self.cache = StaticCache(config=config, max_cache_len=length)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)  # the step's input, its output after
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # position of `token`
        self.kv_index = torch.arange(length, device=device)
        self.graph = None
        self.captured = False  # capture tried (a failed capture leaves graph None: eager steps)


class GraphDecoder:
    def __init__(self, vlm, use_graphs: bool | None = None, compile_mode: str | None = None):
        self.vlm = vlm
        self.use_graphs = use_graphs
        self.compile_mode = compile_mode if compile_mode is not None else os.environ.get("MMAGENT_TORCH_COMPILE")
        if self.compile_mode and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"torch.compile mode `{self.compile_mode}` (MMAGENT_TORCH_COMPILE?) is not one of "
                             f"{', '.join(COMPILE_MODES)}; leave it unset to decode without compiling")
        self._compiled = None
        self.steps: OrderedDict = OrderedDict()
        self.pool = None
        self.capture_errors: list[str] = []
        decoder = vlm.family.decoder(vlm.base_model)
        params = inspect.signature(decoder.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.24
        self._takes_cache_position = "cache_position" in params

    # ---- the model's pieces ----------------------------------------------------------------------------
    def _forward(self, step: _Step, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Last hidden state of `embeds` at `positions`, attending to cached positions <= each one."""
        allowed = step.kv_index[None, :] <= positions[:, None]  # (q, L)
        dtype = embeds.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=embeds.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[None, None]  # 4-D: transformers uses it as it is
        kw = {self._cache_arg: step.cache, "use_cache": True, "position_ids": positions[None]}
        if self._takes_cache_position:
            kw["cache_position"] = positions
        decoder = self.vlm.family.decoder(self.vlm.base_model)
        return decoder(inputs_embeds=embeds, attention_mask=mask, **kw).last_hidden_state

    def _next(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vlm.family.head(self.vlm.base_model)(hidden[:, -1]).argmax(-1)

    def _decode_step(self, step: _Step) -> None:
        """token -> next token, in place; pos moves on. Everything here is capturable (no host sync)."""
        embeds = self.vlm.family.embed_tokens(self.vlm.base_model)(step.token)
        step.token.copy_(self._next(self._forward(step, embeds, step.pos))[:, None])
        step.pos.add_(1)

    def _step_fn(self):
        """The decode step as run and captured: compiled once (guards recompile it per adapter state)."""
        if not self.compile_mode:
            return self._decode_step
        if self._compiled is None:
            how = {"backend": "aot_eager"} if self.compile_mode == "aot_eager" else {"mode": self.compile_mode}
            self._compiled = torch.compile(self._decode_step, dynamic=False, **how)
        return self._compiled

    # ---- graphs ------------------------------------------------------------------------------------------
    def _adapter_state(self) -> tuple:
        """What the captured kernels depend on besides the base: which LoRA weights are applied."""
        module = self._lora_layer()
        if module is None:
            return ()
        active = tuple(module.active_adapters)
        return (bool(module.disable_adapters),
                tuple((a, module.lora_A[a].weight.data_ptr()) for a in active if a in module.lora_A))

    def _lora_layer(self):
        """One of PEFT's LoRA layers (all switch together), found once: a 7B has thousands of modules."""
        layer = getattr(self, "_layer", None)
        if layer is None:
            from peft.tuners.tuners_utils import BaseTunerLayer
            layer = self._layer = next((m for m in self.vlm.model.modules()
                                        if isinstance(m, BaseTunerLayer) and hasattr(m, "lora_A")), None)
        return layer

    def _step_for(self, length: int, device) -> _Step:
        key = (self._adapter_state(), length)
        if key in self.steps:
            self.steps.move_to_end(key)
            return self.steps[key]
        if len(self.steps) >= MAX_GRAPHS:
            self.steps.popitem(last=False)
        config = self.vlm.family.text_config(self.vlm.base_model)
        self.steps[key] = _Step(config, length, device)
        return self.steps[key]

    def clear(self) -> None:
        """Drop every graph and cache (after adapters were loaded or unloaded)."""
        self.steps.clear()
        self.__dict__.pop("_layer", None)  # the LoRA layer found before may be gone with its PeftModel

    def _advance(self, step: _Step, graphs: bool) -> None:
        if step.graph is not None:
            step.graph.replay()
            return
        if not graphs or step.captured:
            self._step_fn()(step)
            return
        # First use: this step runs eagerly on a side stream (warm-up, as CUDA graph capture asks), then the
        # next one is captured (capture records, it computes nothing) for every later step to replay.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles here too, outside the capture
            self._step_fn()(step)
        torch.cuda.current_stream().wait_stream(side)
        step.captured = True
        try:
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                self._step_fn()(step)
            step.graph = graph
        except RuntimeError as e:  # slower, still right: this graph's steps run eagerly
            self.capture_errors.append(str(e).splitlines()[0])
            logging.getLogger("mmagent").warning("CUDA graph capture failed (%s); decoding without graphs",
                                                 self.capture_errors[-1])

    # ---- decoding ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, max_new_tokens: int, on_token=None, stop_at_eos: bool = True) -> list[int]:
        """Greedy tokens after the prompt `embeds` (1, n, H), as VLM.generate: the end token is not returned;
        `on_token(step, [token])` returning True stops; `stop_at_eos=False` decodes exactly max_new_tokens."""
        if embeds.shape[0] != 1:
            raise ValueError(f"GraphDecoder decodes one sequence at a time, got a batch of {embeds.shape[0]}")
        if max_new_tokens <= 0:
            return []
        device, n = embeds.device, embeds.shape[1]
        graphs = device.type == "cuda" if self.use_graphs is None else self.use_graphs
        step = self._step_for(BUCKET * math.ceil((n + max_new_tokens + 1) / BUCKET), device)
        step.cache.reset()
        step.token.copy_(self._next(self._forward(step, embeds, torch.arange(n, device=device)))[:, None])
        step.pos.fill_(n)
        host = torch.empty(max_new_tokens, dtype=torch.long, pin_memory=device.type == "cuda")

        def fetch(k: int):  # the token now in step.token, copied out before the next step overwrites it
            host[k:k + 1].copy_(step.token[0], non_blocking=True)
            if device.type != "cuda":
                return None
            event = torch.cuda.Event()
            event.record()
            return event

        eos = self.vlm.tokenizer.eos_token_id if stop_at_eos else -1
        out, ready = [], fetch(0)
        for k in range(max_new_tokens):
            following = None
            if k + 1 < max_new_tokens:  # queue the next step before waiting on this one
                self._advance(step, graphs)
                following = fetch(k + 1)
            if ready is not None:
                ready.synchronize()
            token = int(host[k])
            if token != eos:
                out.append(token)
            if (on_token and on_token(k, [token])) or token == eos:
                break
            ready = following
        return out
