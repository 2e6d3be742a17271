"""The vision side of an edge bundle in onnxruntime: ViT + Q-Former + projection, task LoRAs per run. No torch."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

INPUT, OUTPUT = "pixel_values", "image_embeds"  # the exported graph's input and output
# InstructBLIP's graph also reads the instruction: its Q-Former token ids and their attention mask (int64)
INSTRUCTION_INPUTS = ("qformer_input_ids", "qformer_attention_mask")


class VisionSession:
    """One onnxruntime session, any number of task adapters; `run` is safe from several threads."""

    def __init__(self, onnx_path, providers=None):
        options = ort.SessionOptions()
        options.log_severity_level = 3  # else one warning per LoRA input: "initializer appears in graph inputs"
        # Idle intra-op threads sleep instead of spinning: spinning they held the cores that llama.cpp's threads
        # decode on next (the tiny default on 2 cores: 2 llama.cpp threads 1,165-1,194 tok/s instead of 874-897)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The CPU unless told otherwise: with onnxruntime-gpu installed, "every available provider" would put
        # the graph on a GPU nobody asked for (and fail where none is visible). EdgeBackend(device=...) decides.
        self.session = ort.InferenceSession(str(onnx_path), options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.adapters: dict[str, ort.LoraAdapter] = {}

    def load_adapter(self, name: str, path) -> None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        self.adapters[name] = adapter

    def unload_adapter(self, name: str) -> None:
        """Forget adapter `name`. The caller makes sure no run still uses it (onnxruntime holds a bare pointer)."""
        self.adapters.pop(name)

    @property
    def reads_instruction(self) -> bool:
        return INSTRUCTION_INPUTS[0] in {i.name for i in self.session.get_inputs()}

    def run(self, pixel_values: np.ndarray, adapter: str | None = None, instruction=None) -> np.ndarray:
        """`instruction`: (token ids, mask), each (batch, tokens), for a graph that reads it (InstructBLIP)."""
        # RunOptions per call: the active adapter belongs to this run only, so concurrent runs don't mix.
        options = ort.RunOptions()
        if adapter is not None:
            if adapter not in self.adapters:
                raise KeyError(f"adapter `{adapter}` is not loaded; loaded: {', '.join(self.adapters) or 'none'}")
            options.add_active_adapter(self.adapters[adapter])
        feed = {INPUT: np.ascontiguousarray(pixel_values, dtype=np.float32)}
        if self.reads_instruction:
            if instruction is None:
                raise ValueError("this vision graph reads the instruction (InstructBLIP): pass its Q-Former "
                                 "token ids and mask")
            feed |= {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in zip(INSTRUCTION_INPUTS, instruction)}
        return self.session.run([OUTPUT], feed, options)[0]
