"""Write the LLM half of a vision-language model, and its LoRA adapters, as GGUF files for llama.cpp.

Only llama-type LLMs (e.g. SmolLM2) with SmolLM2's GPT2-style byte-level BPE tokenizer are handled; other
LLMs are refused with a pointer to the ONNX or merged-PyTorch exports.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
from collections.abc import Iterator, Mapping

import gguf
import numpy as np
import torch

from mmagent.files import atomic_path

ARCH = "llama"
TOKENIZER_MODEL = "gpt2"  # byte-level BPE
TOKENIZER_PRE = "smollm"  # llama.cpp's name for SmolLM2's pre-tokenizer (digits split one by one)
OUTPUT_HEAD = "output.weight"  # absent when tied: llama.cpp then reuses token_embd.weight
# llama.cpp's file types; plain numbers so that writing needs no native library (quantising does, lazily)
QUANT_FTYPES = {"q8_0": 7, "q4_k_m": 15}  # LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_K_M

# HF names inside the decoder stack (LlamaModel) -> GGUF names.
TENSOR_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}
# llama.cpp rotates adjacent pairs of q/k, HF the two halves of each head: these outputs get regrouped.
ROPE_HEAD_COUNTS = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}
BLOCK = re.compile(r"^layers\.(?P<bid>\d+)\.(?P<rest>.+)$")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
LORA_TARGETS = sorted({k.split(".")[-2] for k in TENSOR_NAMES if k.startswith("layers.") and "proj" in k})


class UnsupportedForLlamaCpp(ValueError):
    pass


# ---- what llama.cpp can run -------------------------------------------------------------------------------

# LLMs llama.cpp cannot run beside an image path of ours: why, for the refusal
NOT_FOR_LLAMA_CPP = {"opt": "llama.cpp has no OPT architecture", "t5": "llama.cpp's T5 support is text-only "
                     "(no embedding input for the image tokens, no LoRA on its encoder)"}


def _unsupported(config) -> list[str]:
    if config.model_type in NOT_FOR_LLAMA_CPP:
        return [f"the LLM is `{config.model_type}`: {NOT_FOR_LLAMA_CPP[config.model_type]}"]
    if config.model_type != "llama":
        return [f"llama.cpp export handles llama-type LLMs only, this one is `{config.model_type}`"]
    reasons = []
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        reasons.append(f"rope scaling `{rope_type}` is not written by this exporter")
    if config.attention_bias or config.mlp_bias:
        reasons.append("attention/MLP biases are not written by this exporter")
    if config.hidden_act != "silu":
        reasons.append(f"activation `{config.hidden_act}` (llama.cpp's llama runs silu)")
    return reasons


def llama_cpp_supports(config) -> bool:
    return not _unsupported(config)


def check_llama_cpp_support(config) -> None:
    reasons = _unsupported(config)
    if reasons:
        raise UnsupportedForLlamaCpp(
            f"cannot export this LLM to GGUF for llama.cpp: {'; '.join(reasons)}. "
            "Export it without --gguf: `--onnx --merged` (the image path for onnxruntime, the LoRA merged into a "
            "transformers directory that transformers and vLLM load).")


# ---- names and tensors -------------------------------------------------------------------------------------

def gguf_tensor_name(hf_name: str) -> str | None:
    """GGUF name of a tensor named as inside the decoder stack (`layers.3.mlp.up_proj.weight`); None if unmapped."""
    block = BLOCK.match(hf_name)
    if block is None:
        return TENSOR_NAMES.get(hf_name)
    template = TENSOR_NAMES.get(f"layers.{{bid}}.{block['rest']}")
    return template.format(bid=block["bid"]) if template else None


def _rope_regrouped(gguf_name: str, rows: np.ndarray, config) -> np.ndarray:
    role = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    if role not in ROPE_HEAD_COUNTS:
        return rows
    n_heads = getattr(config, ROPE_HEAD_COUNTS[role])
    return (rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:])
            .swapaxes(1, 2)
            .reshape(rows.shape))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


def _gguf_dtype(tensor: torch.Tensor) -> np.dtype:
    # Norms (1-D) stay f32: llama.cpp expects them so and they are tiny.
    return np.dtype(np.float16 if tensor.ndim == 2 else np.float32)


def _llm_tensors(causal_lm) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, HF tensor) for every weight llama.cpp needs, in file order."""
    for hf_name, tensor in causal_lm.get_decoder().state_dict().items():
        name = gguf_tensor_name(hf_name)
        if name is None:
            raise UnsupportedForLlamaCpp(f"LLM tensor `{hf_name}` has no GGUF counterpart for llama.cpp")
        yield name, tensor
    head = causal_lm.get_output_embeddings().weight
    if head.data_ptr() != causal_lm.get_input_embeddings().weight.data_ptr():
        yield OUTPUT_HEAD, head


# ---- files --------------------------------------------------------------------------------------------------


def _add_hparams(writer: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def _vocab_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..vocab_size-1; ids the tokenizer lacks become unused [PADn] rows."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(by_id)} but the LLM's vocabulary has only {vocab_size} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def check_byte_level_bpe(tokenizer) -> None:
    """Refuse what this writer would write wrongly: only byte-level BPE (GPT-2 style, as SmolLM2's) is
    written. LLaMA-2, Vicuna and LLaVA-1.5 use SentencePiece-style BPE (byte fallback, "▁" for spaces):
    also of type BPE in tokenizer.json, so the type alone does not tell them apart."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise ValueError(f"GGUF export needs a byte-level BPE tokenizer (SmolLM2's), got a {model['type']} one; "
                         "export with --onnx --merged instead")
    if model.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError("GGUF export: this LLM's tokenizer is SentencePiece-style BPE (byte fallback / "
                         "Metaspace, as LLaMA-2, Vicuna and LLaVA-1.5 use), and mmagent's GGUF writer writes "
                         "byte-level BPE only (SmolLM2's); export with --onnx --merged, and convert the merged "
                         "directory with llama.cpp's convert_hf_to_gguf.py")


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    check_byte_level_bpe(tokenizer)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens, types = _vocab_table(tokenizer, vocab_size)
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    special_ids = {writer.add_bos_token_id: tokenizer.bos_token_id, writer.add_eos_token_id: tokenizer.eos_token_id,
                   writer.add_pad_token_id: tokenizer.pad_token_id, writer.add_unk_token_id: tokenizer.unk_token_id}
    for add, token_id in special_ids.items():
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # the chat template writes <|im_start|> itself


def write_llm_gguf(causal_lm, tokenizer, path: str | os.PathLike, chat_template: str | None = None) -> None:
    """Write `causal_lm` (a llama-type HF causal LM) as an f16 GGUF with its tokenizer.

    `chat_template` defaults to the tokenizer's own. Tensors are converted one at a time while writing, so peak
    memory is the model plus one converted tensor.
    """
    config = causal_lm.config
    check_llama_cpp_support(config)
    tensors = list(_llm_tensors(causal_lm))
    template = chat_template or tokenizer.chat_template
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            _add_hparams(writer, config)
            _add_tokenizer(writer, tokenizer, config.vocab_size)
            if template:
                writer.add_chat_template(template)
            for name, tensor in tensors:
                dtype = _gguf_dtype(tensor)
                writer.add_tensor_info(name, tuple(tensor.shape), dtype, tensor.numel() * dtype.itemsize)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, tensor in tensors:
                writer.write_tensor_data(_rope_regrouped(name, _numpy(tensor), config).astype(_gguf_dtype(tensor)))
        finally:
            writer.close()


# ---- LoRA adapters ----------------------------------------------------------------------------------------

def _lora_pairs(lora_tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module inside the decoder stack: {"A": lora_A, "B": lora_B}}; anything else is refused, never dropped."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora_tensors.items():
        if not key.startswith(prefix):
            raise ValueError(f"LoRA tensor `{key}` is not under `{prefix}` (the LLM's decoder layers); llama.cpp "
                             f"adapters here can target only {', '.join(LORA_TARGETS)} there")
        match = LORA_KEY.match(key.removeprefix(prefix))
        if match is None:
            raise ValueError(f"`{key}` is not a LoRA A/B weight of a Linear layer; llama.cpp adapters hold only those")
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA on `{prefix}{module}` lacks its lora_{'A' if 'B' in pair else 'B'} weight")
        if gguf_tensor_name(module + ".weight") is None:
            raise ValueError(f"LoRA on `{prefix}{module}` has no GGUF mapping for llama.cpp; adapters there can "
                             f"target only {', '.join(LORA_TARGETS)} in the decoder layers")
    return pairs


def write_lora_gguf(lora_tensors: Mapping[str, torch.Tensor], alpha: float, path: str | os.PathLike, *,
                    config, prefix: str) -> None:
    """Write a PEFT LoRA state dict as a llama.cpp GGUF adapter.

    `lora_tensors` holds the LLM's LoRA weights as PEFT saves them (`<prefix>layers.0.self_attn.q_proj.lora_A.weight`),
    `prefix` is the path to the decoder stack (for BLIP-2: `base_model.model.language_model.model.`), `config` the
    LLM's config and `alpha` PEFT's lora_alpha (llama.cpp scales by alpha / r, as PEFT does without rslora).
    """
    check_llama_cpp_support(config)
    pairs = _lora_pairs(lora_tensors, prefix)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
            for module, pair in pairs.items():
                base = gguf_tensor_name(module + ".weight")
                # lora_B's rows are the layer's outputs, so q/k regrouping applies to it; lora_A is untouched.
                writer.add_tensor(f"{base}.lora_a", _numpy(pair["A"]))
                writer.add_tensor(f"{base}.lora_b", _rope_regrouped(base, _numpy(pair["B"]), config))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


# ---- quantization -----------------------------------------------------------------------------------------

def quantize(src_gguf: str | os.PathLike, dst_gguf: str | os.PathLike, kind: str) -> None:
    """Quantize an f16 GGUF with llama.cpp (`q8_0` or `q4_k_m`)."""
    if kind not in QUANT_FTYPES:
        raise ValueError(f"unknown quantization `{kind}`; expected one of {', '.join(QUANT_FTYPES)}")
    import llama_cpp

    from mmagent.backends.llama_cpp import silence_llama_cpp
    silence_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[kind]
    with atomic_path(dst_gguf) as tmp:
        status = llama_cpp.llama_model_quantize(os.fsencode(src_gguf), os.fsencode(tmp), ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama.cpp failed to quantize {src_gguf} to {kind} (status {status})")
