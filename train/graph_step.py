"""A training micro-batch's forward and backward as one CUDA graph replay (recipe `train.cuda_graphs`).

Why: a LoRA step of a 7B VLM at batch 4 launches about 7,500 kernels (ViT, Q-Former, 32 decoder layers,
PEFT's LoRA, and the backward of all of it) that run 61 ms on an H200, while the host needs about 300 ms
to launch them one by one from Python (bench/profile_7b.py, docs/BENCHMARKS.md). Captured once per batch
shape, a replay launches them all at once.

What a capture needs, and the trainer provides: static batches (Trainer.collate pads sequences to a
multiple of PAD_TO and passes the answer positions as indices, so VLM.loss reads nothing back from the
device), one process (no DDP hooks in the graph), and a decoder-only LLM. Gradients of each graph live in
its own buffers; they are copied (first micro-batch) or added (the rest) into the parameters' .grad, and
gradient clipping and AdamW run as before, outside the graph. Dropout draws fresh masks on every replay.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_TO = 32  # sequence lengths are padded to a multiple of this: a handful of shapes, so a handful of graphs
ANSWERS_TO = 64  # answer-token counts likewise (padding entries have target -100 and a loss of 0)
MAX_GRAPHS = 16  # shapes beyond this many run eagerly (each capture costs a few forward-backward passes)


class CaptureError(RuntimeError):
    """A forward-backward that cannot be captured (an op that reads the device from the host, say)."""


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict  # the static batch tensors the graph reads
    scale: torch.Tensor  # the loss scale (world / the step's answer tokens), read by the graph
    tokens: torch.Tensor  # per-answer-token losses the graph writes
    loss: torch.Tensor
    grads: list  # the graph's gradient buffers, one per trained parameter (None: no gradient reached it)


def batch_shape(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor))


class GraphedStep:
    def __init__(self, forward, params: list[torch.Tensor], autocast: bool, vocab=None, warmup: int = 2):
        self.forward, self.params, self.autocast, self.vocab = forward, params, autocast, vocab
        self.warmup = warmup
        self.graphs: dict[tuple, Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: replays run one at a time
        self.grads: list[torch.Tensor] | None = None  # the step's accumulated gradients (the params' .grad)

    def _forward_backward(self, inputs: dict, scale: torch.Tensor):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        # cache_enabled=False: autocast's weight-cast cache must not outlive a capture; cuDNN attention is
        # left out of captures (flash and memory-efficient attention capture well)
        kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False), \
                sdpa_kernel(kernels):
            tokens = self.forward(inputs, self.vocab)
            loss = tokens.sum() * scale
        loss.backward()
        return tokens, loss

    def capture(self, batch: dict) -> Captured:
        inputs = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        scale = torch.zeros((), device=next(iter(inputs.values())).device)
        held = [p.grad for p in self.params]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture: cuBLAS workspaces, autotuning, compiles
                for _ in range(self.warmup):
                    for p in self.params:
                        p.grad = None
                    self._forward_backward(inputs, scale)
            torch.cuda.current_stream().wait_stream(side)
            for p in self.params:
                p.grad = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the warm-up's blocks, cached for the side stream, back for the graph's pool
            graph = torch.cuda.CUDAGraph()
            # thread_local: the data worker thread copies the next batch to the device meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                tokens, loss = self._forward_backward(inputs, scale)
            grads = [p.grad for p in self.params]
        except Exception as e:
            raise CaptureError(f"{type(e).__name__}: {e}") from e
        finally:
            for p, g in zip(self.params, held):
                p.grad = g
        return Captured(graph, inputs, scale, tokens, loss, grads)

    def step(self, batch: dict, scale: float, first: bool):
        """Forward and backward of one micro-batch; gradients copied (first) or added into .grad.
        Returns (per-answer-token losses, loss) of this micro-batch, or None when the shape would exceed
        MAX_GRAPHS (the caller runs it eagerly)."""
        key = batch_shape(batch)
        captured = self.graphs.get(key)
        if captured is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return None
            captured = self.graphs[key] = self.capture(batch)
        for name, t in captured.inputs.items():
            t.copy_(batch[name], non_blocking=True)
        captured.scale.fill_(scale)
        captured.graph.replay()
        self._accumulate(captured.grads, first)
        return captured.tokens, captured.loss

    def _accumulate(self, grads: list, first: bool) -> None:
        """.grad = this graph's gradients (first micro-batch of a step) or .grad + them; .grad may also hold
        what an eager micro-batch of the same step (a shape past MAX_GRAPHS) added."""
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
        if first:
            torch._foreach_zero_(self.grads)
        else:
            for p, a in zip(self.params, self.grads):
                if p.grad is None:
                    a.zero_()
                elif p.grad is not a:
                    a.copy_(p.grad)
        have = [(a, g) for a, g in zip(self.grads, grads) if g is not None]
        if have:
            torch._foreach_add_([a for a, _ in have], [g for _, g in have])
        for p, a in zip(self.params, self.grads):
            p.grad = a
