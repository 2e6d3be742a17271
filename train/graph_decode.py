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

`fuse` (default on; MMAGENT_FUSE_PROJECTIONS=0 turns it off): each layer's q|k|v and gate|up projections,
which read one input, run as one matrix-vector product over their concatenated weights (ProjectionGroup):
three and two launches become one each, and one larger product runs closer to copy speed. The weights are
not copied: each Linear's weight becomes a view into the concatenation, and PEFT's LoRA branches still add
their own terms.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
from collections import OrderedDict
from contextlib import contextmanager

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


class FusedOrderError(RuntimeError):
    """A fused projection was called with another input than the first of its group: this model's layers
    call their projections in another order than LLaMA's, so the shared product would be wrong."""


class ProjectionGroup:
    """Linear layers that read one input, in call order (LLaMA's q, k, v; gate, up): the first computes all
    of their outputs in one product and each returns its slice. Their weights become views into one
    concatenated tensor (no copy kept); `enter()` / `exit()` turn the shared product on and off around a
    decode (GraphDecoder._fused)."""

    NAMES = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))

    def __init__(self, linears: list):
        self.linears = linears
        self.weight = torch.cat([m.weight.data for m in linears])
        biases = [m.bias for m in linears]
        self.bias = torch.cat([b.data for b in biases]) if all(b is not None for b in biases) else None
        self.slices, start = [], 0
        for m in linears:
            n = m.weight.shape[0]
            self.slices.append((start, start + n))
            m.weight.data = self.weight[start:start + n]
            if self.bias is not None:
                m.bias.data = self.bias[start:start + n]
            start += n
        self.output = self.input = None

    @classmethod
    def of(cls, decoder) -> list["ProjectionGroup"]:
        """The groups of a LLaMA-style decoder's layers (PEFT's LoRA layers fused through their base
        layers); none where the modules are not plain Linear layers of one dtype."""
        groups = []
        for layer in getattr(decoder, "layers", []):
            for part, names in cls.NAMES:
                mods = [getattr(getattr(layer, part, None), n, None) for n in names]
                if any(m is None for m in mods):
                    continue
                base = [m.get_base_layer() if hasattr(m, "get_base_layer") else m for m in mods]
                if all(type(b) is torch.nn.Linear for b in base) and len({(b.in_features, b.weight.dtype,
                                                                          b.weight.device) for b in base}) == 1 \
                        and len({b.bias is None for b in base}) == 1:
                    groups.append(cls(base))
        return groups

    def intact(self) -> bool:
        """Still views into the concatenation (a merge that replaced a weight's storage breaks that)."""
        return all(m.weight.data_ptr() == self.weight[a:].data_ptr() for m, (a, _) in zip(self.linears, self.slices))

    def _forward(self, index: int):
        start, end = self.slices[index]

        def forward(x):
            if index == 0:
                self.input, self.output = x, torch.nn.functional.linear(x, self.weight, self.bias)
            elif x is not self.input:  # another call order than the one fused: never a wrong slice
                raise FusedOrderError("fused projections called out of order")
            return self.output[..., start:end]
        return forward

    def enter(self) -> None:
        for i, m in enumerate(self.linears):
            m.forward = self._forward(i)

    def exit(self) -> None:
        for m in self.linears:
            m.__dict__.pop("forward", None)
        self.output = self.input = None


class GraphDecoder:
    def __init__(self, vlm, use_graphs: bool | None = None, compile_mode: str | None = None,
                 fuse: bool | None = None):
        self.vlm = vlm
        self.use_graphs = use_graphs
        self.fuse = os.environ.get("MMAGENT_FUSE_PROJECTIONS", "1") != "0" if fuse is None else fuse
        self.groups: list[ProjectionGroup] | None = None  # made at the first decode
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
    @contextmanager
    def _fused(self):
        """The decoder's projections fused (ProjectionGroup) while decoding; made again, with every graph
        dropped, if a weight no longer lies in its group's concatenation."""
        if not self.fuse:
            yield
            return
        if self.groups is None or not all(g.intact() for g in self.groups):
            self.clear()
            self.groups = ProjectionGroup.of(self.vlm.family.decoder(self.vlm.base_model))
        for g in self.groups:
            g.enter()
        try:
            yield
        finally:
            for g in self.groups:
                g.exit()

    def generate(self, embeds: torch.Tensor, max_new_tokens: int, on_token=None, stop_at_eos: bool = True) -> list[int]:
        """Greedy tokens after the prompt `embeds` (1, n, H), as VLM.generate: the end token is not returned;
        `on_token(step, [token])` returning True stops; `stop_at_eos=False` decodes exactly max_new_tokens."""
        try:
            with torch.no_grad(), self._fused():
                return self._generate(embeds, max_new_tokens, on_token, stop_at_eos)
        except FusedOrderError:  # no token was handed out yet: the first step raises
            logging.getLogger("mmagent").warning("this model calls its projections in another order than LLaMA's: "
                                                 "decoding without fusing them")
            self.fuse = False
            self.clear()
            with torch.no_grad():
                return self._generate(embeds, max_new_tokens, on_token, stop_at_eos)

    def _generate(self, embeds: torch.Tensor, max_new_tokens: int, on_token, stop_at_eos: bool) -> list[int]:
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
