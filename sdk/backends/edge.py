"""The edge backend: llama.cpp for the LLM, onnxruntime for vision + Q-Former, no torch at run time.

Every adapter is loaded once. A request activates the task's GGUF LoRA (`llama_set_adapters_lora`, which
also clears the KV cache of the previous adapter's prompt) and its onnxruntime adapter (per run, through
RunOptions); its soft prompt rows go in front of the image rows in one embedding batch.

`lanes` > 1 adds llama.cpp contexts over the one loaded model, so that many generations run at once, each
with its own KV cache and active adapter; the onnxruntime session is shared (its adapter is per run).
Adapters listed in the bundle's manifest load and unload while it serves (`load_adapter`, `unload_adapter`).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from mmagent.backends import Sampling, TextStream, check_fits, check_image, finish_reason
from mmagent.prompt import prompt_ids, prompt_parts, stop_ids, user_text
from mmagent.bundle import BundleError, read_manifest, verify


class ChatTemplate:
    """Renders the bundle's chat template the way transformers does, without loading a tokenizer."""

    def __init__(self, prompt: dict):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        self.chat_template = prompt["chat_template"]
        self.special = {"bos_token": prompt.get("bos_token"), "eos_token": prompt.get("eos_token")}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(self.chat_template) if self.chat_template else None

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)


def qformer_tokenizer(bundle: Path, prompt: dict):
    """InstructBLIP's Q-Former tokenizer (the `tokenizers` library, no torch), truncated as in training."""
    if not prompt.get("qformer_tokenizer"):
        return None
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(bundle / prompt["qformer_tokenizer"]))
    tok.no_padding()
    tok.enable_truncation(prompt["qformer_max_tokens"])
    return tok


class PromptTokenizer:
    """Token ids of prompt text, as torch's tokenizer makes them.

    llama.cpp's own tokenizer is exact for byte-level BPE (SmolLM2). For SentencePiece LLMs (LLaMA-2, Vicuna,
    LLaVA-1.5) transformers and sentencepiece disagree: transformers puts no "▁" before text that follows a
    special token (`legacy: false`) and does not double a leading space, while sentencepiece, and so llama.cpp,
    does both. Those bundles ship the LLM's tokenizer.json (`prompt.llm_tokenizer`), read here with the
    `tokenizers` library (no torch), so the edge feeds llama.cpp exactly the ids torch trained on; stock
    llama.cpp tokenises such a GGUF as sentencepiece does, as for a GGUF made by llama.cpp's own converter."""

    def __init__(self, bundle: Path, prompt: dict, lm):
        self.lm, self.image_token, self.hf = lm, prompt["image_token"], None
        # the BOS torch starts a prompt with, where it puts it (manifest; older bundles were trained without)
        self.bos, self.image_first = prompt.get("add_bos_id"), prompt.get("image_first", False)
        if prompt.get("llm_tokenizer"):
            from tokenizers import Tokenizer
            self.hf = Tokenizer.from_file(str(bundle / prompt["llm_tokenizer"]))
            self.hf.no_padding()
            self.hf.no_truncation()

    def __call__(self, text: str) -> list[int]:
        """Ids of `text`, special tokens parsed, no BOS added."""
        return self.lm.tokenize(text) if self.hf is None else self.hf.encode(text, add_special_tokens=False).ids

    def prompt(self, text: str) -> list[int]:
        """Ids of a whole prompt as torch makes them: BOS where the checkpoint's tokenizer puts it."""
        return prompt_ids(self, text, self.image_token, self.bos, self.image_first)

    def around(self, prompt: str, placeholder: str) -> tuple[list[int], list[int]]:
        """Ids of the prompt before and after the image placeholders (which `placeholder` spells out), cut
        from the whole prompt's ids: text after a special token depends on what precedes it."""
        ids, image = self.prompt(prompt), self(self.image_token)[0]
        start = ids.index(image)
        return ids[:start], ids[start + placeholder.count(self.image_token):]


def preprocess(image: Image.Image, spec: dict) -> np.ndarray:
    """The checkpoint's image processor, repeated with PIL + numpy as transformers' PIL backend does it:
    (1, 3, H, W) float32. BLIP resizes to a square; CLIP (LLaVA-1.5) resizes the shortest edge and crops the
    centre; LLaVA's own processor with `do_pad` first pads to a square of the mean colour. `spec` is the
    manifest's `prompt.image` (mmagent.export.bundle.image_spec); one without `resize` (written before these
    steps were recorded) resizes to a `size` square."""
    arr = np.asarray(image.convert("RGB"))
    if spec.get("pad_to_square"):
        arr = _pad_to_square(arr, [int(m * 255) for m in spec["mean"]])
    resize = spec["resize"] if "resize" in spec else {"height": spec["size"], "width": spec["size"]}
    if resize:
        height, width = _resized(arr.shape[:2], resize)
        arr = np.asarray(Image.fromarray(arr).resize((width, height), resample=spec.get("resample", 3)))
    if spec.get("crop"):
        arr = _centre_crop(arr, spec["crop"]["height"], spec["crop"]["width"])
    x = (arr.astype(np.float64) * spec.get("rescale", 1 / 255)).astype(np.float32)
    if spec.get("normalize", True):
        x = (x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _pad_to_square(arr: np.ndarray, colour: list[int]) -> np.ndarray:
    h, w = arr.shape[:2]
    if h == w:
        return arr
    out = np.empty((max(h, w), max(h, w), 3), arr.dtype)
    out[:] = colour
    top, left = (max(h, w) - h) // 2, (max(h, w) - w) // 2
    out[top:top + h, left:left + w] = arr
    return out


def _resized(hw: tuple[int, int], resize: dict) -> tuple[int, int]:
    """(height, width) after resizing: a fixed size, or the shortest edge to a length, the other edge scaled
    and truncated (transformers' get_resize_output_image_size)."""
    if "shortest_edge" not in resize:
        return resize["height"], resize["width"]
    h, w = hw
    short, long = min(h, w), max(h, w)
    new_short, new_long = resize["shortest_edge"], int(resize["shortest_edge"] * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _centre_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre height x width; an image smaller than that is zero-padded around first, as transformers does."""
    h, w = arr.shape[:2]
    if h < height or w < width:
        big = np.zeros((max(h, height), max(w, width), arr.shape[2]), arr.dtype)
        top, left = -(-(big.shape[0] - h) // 2), -(-(big.shape[1] - w) // 2)  # ceil, as transformers
        big[top:top + h, left:left + w] = arr
        arr, h, w = big, *big.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return arr[top:top + height, left:left + width]


class EdgeBackend:
    live_adapters = True  # adapters load and unload while other lanes generate

    def __init__(self, bundle, quant: str = "f16", vision: str | None = None, n_threads: int | None = None,
                 n_gpu_layers: int = 0, providers=None, manifest: dict | None = None, lanes: int = 1,
                 device: str | None = None):
        from mmagent.backends.llama_cpp import LlamaCppLM, default_threads
        from mmagent.backends.onnx_vision import VisionSession
        from mmagent.device import check_onnx_session, is_cuda, parse_device, require_llama_cuda, vision_providers
        self.bundle = Path(bundle)
        self.manifest = manifest or read_manifest(self.bundle)
        m = self.manifest
        # device="cuda": every LLM layer on the GPU and the fp16 vision graph on onnxruntime's CUDA provider;
        # a missing CUDA build or provider is an error (DeviceError), never a quiet run on the CPU.
        self.device = parse_device(device)
        vision = self.vision_graph = vision or ("fp16" if is_cuda(self.device) and "fp16" in m["vision"] else "fp32")
        if is_cuda(self.device):
            require_llama_cuda()
            n_gpu_layers = -1  # llama.cpp: negative = all layers
        providers = providers or vision_providers(self.device)
        if quant not in m["llm"] or vision not in m["vision"] or vision not in ("fp32", "fp16"):
            raise BundleError(f"bundle `{bundle}` has no `{quant}` LLM and `{vision}` vision graph for the edge backend "
                              f"(LLM: {', '.join(m['llm']) or 'none'}; vision: "
                              f"{', '.join(k for k in ('fp32', 'fp16') if k in m['vision']) or 'none'}); re-export "
                              "with --gguf --onnx, or load it with backend='torch'")
        needed = [m["llm"][quant], m["vision"][vision]] + [f for a in m["adapters"].values() for f in a["files"].values()] \
            + ([m["prompt"]["llm_tokenizer"]] if m["prompt"].get("llm_tokenizer") else [])
        verify(self.bundle, m, needed)
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        threads = n_threads or default_threads(offloaded=n_gpu_layers != 0, lanes=lanes)  # the lanes share the cores
        self.llm = LlamaCppLM(self.bundle / m["llm"][quant], n_ctx=1024, n_threads=threads, n_gpu_layers=n_gpu_layers)
        self.lanes, self.lms = lanes, [self.llm, *(self.llm.lane() for _ in range(lanes - 1))]
        self.vision = VisionSession(self.bundle / m["vision"][vision], providers)
        check_onnx_session(self.vision.session.get_providers(), self.device)
        self.prompt, self.template = m["prompt"], ChatTemplate(m["prompt"])
        self.stop_ids = stop_ids(self.prompt)  # torch's end tokens, not llama.cpp's wider end-of-generation set
        self.qformer_tokenizer = qformer_tokenizer(self.bundle, self.prompt)  # InstructBLIP's, else None
        self.tokenize = PromptTokenizer(self.bundle, self.prompt, self.llm)
        self.adapters, self.soft_prompts, self.has, self.entries = {}, {}, {}, {}
        for name, a in m["adapters"].items():
            self._add_adapter(name, a)

    def _add_adapter(self, name: str, a: dict) -> None:
        from mmagent.adapters import from_manifest
        files = a["files"]
        if "llm" in files:
            self.llm.load_adapter(name, self.bundle / files["llm"])
        if "bridge" in files:
            self.vision.load_adapter(name, self.bundle / files["bridge"])
        if "soft_prompt" in files:
            from safetensors.numpy import load_file
            self.soft_prompts[name] = load_file(self.bundle / files["soft_prompt"])["vectors"].astype(np.float32)
        self.has[name], self.entries[name] = set(files), a
        self.adapters[name] = from_manifest(name, a)

    def available_adapters(self) -> dict[str, dict]:
        """The adapters the bundle's manifest lists now (`mmagent export RUN --into` adds to it)."""
        return read_manifest(self.bundle)["adapters"]

    def load_adapter(self, name: str) -> None:
        """Load adapter `name` as the bundle's manifest lists it now, after verifying its files (sha256)
        and that the bundle still has the base this backend runs."""
        m = read_manifest(self.bundle)
        if name not in m["adapters"]:
            raise KeyError(f"bundle `{self.bundle}` lists no adapter `{name}`; it lists: "
                           f"{', '.join(m['adapters']) or 'none'} (add one with `mmagent export RUN --into {self.bundle}`)")
        if m["base"]["fingerprint"] != self.manifest["base"]["fingerprint"]:
            raise BundleError(f"bundle `{self.bundle}` now has base {m['base']['fingerprint']}, but this backend "
                              f"runs {self.manifest['base']['fingerprint']}; restart to serve the new bundle")
        verify(self.bundle, m, list(m["adapters"][name]["files"].values()))
        self._add_adapter(name, m["adapters"][name])

    def unload_adapter(self, name: str) -> None:
        """Free adapter `name` everywhere. The caller (Agent) makes sure no generation still uses it."""
        has = self.has.pop(name)
        self.adapters.pop(name)
        self.entries.pop(name)
        self.soft_prompts.pop(name, None)
        if "llm" in has:
            self.llm.unload_adapter(name)
        if "bridge" in has:
            self.vision.unload_adapter(name)

    def instruction_inputs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """(Q-Former token ids, mask), right-padded, for a vision graph that reads the instruction, else None."""
        if self.qformer_tokenizer is None:
            return None
        ids = [e.ids for e in self.qformer_tokenizer.encode_batch(texts)]
        n = max(map(len, ids))
        return (np.array([i + [0] * (n - len(i)) for i in ids], np.int64),
                np.array([[1] * len(i) + [0] * (n - len(i)) for i in ids], np.int64))

    def decode(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).strip()

    def close(self) -> None:
        self.llm.close()  # its lanes too

    def prompt_segments(self, image, question, adapter, kind, history) -> list:
        from mmagent.prompt import chat_prompt
        record = self.adapters.get(adapter) if adapter else None
        instruction, text = prompt_parts(question, kind, record.instructions if record else {})
        soft = self.soft_prompts.get(adapter) if adapter else None
        n_soft = 0 if soft is None else len(soft)
        placeholder = self.prompt["image_token"] * (n_soft + self.prompt["n_image_tokens"])
        system = (record.system if record else None) or self.prompt["system"]  # each adapter's own, as trained
        prompt = chat_prompt(self.template, system, placeholder, instruction, text, history)
        before, after = self.tokenize.around(prompt, placeholder)
        check_fits(len(before) + n_soft + self.prompt["n_image_tokens"] + len(after), self.llm.n_ctx)
        check_image(image)
        bridge = adapter if adapter and "bridge" in self.has[adapter] else None
        said = self.instruction_inputs([user_text(instruction, text)])
        rows = self.vision.run(preprocess(image, self.prompt["image"]), bridge, said)[0]
        if soft is not None:
            rows = np.concatenate([soft, rows])
        return [before, np.ascontiguousarray(rows, dtype=np.float32), after]

    def generate(self, image, question, adapter, kind, history, max_new_tokens, on_text, stop_at_eos=True,
                 sampling: Sampling | None = None, lane: int = 0, cancel=None):
        sampling = sampling or Sampling()
        t0 = time.perf_counter()
        segments = self.prompt_segments(image, question, adapter, kind, history)
        t_image = time.perf_counter() - t0
        lm = self.lms[lane]
        lm.set_adapter(adapter if adapter and "llm" in self.has[adapter] else None)
        stream, first = TextStream(self.decode, on_text, sampling.stop, cancel), []

        def on_token(token: int) -> bool:
            if not first:
                first.append(time.perf_counter())
            return stream.push(token)

        n_prompt = sum(len(s) for s in segments)
        max_new_tokens = min(max_new_tokens, lm.n_ctx - n_prompt)
        tokens = lm.generate(segments, max_new_tokens, on_token, stop_at_eos, sampling.chooser(), self.stop_ids)
        stream.finish()
        end = time.perf_counter()
        start = first[0] if first else end
        info = {"image": t_image, "first_token": start - t0,
                "tokens_per_s": max(0, len(tokens) - 1) / max(1e-9, end - start),
                "prompt_tokens": n_prompt, "finish_reason": finish_reason(stream, len(tokens), max_new_tokens)}
        return tokens, info | ({"text": stream.text} if stream.stopped else {})
