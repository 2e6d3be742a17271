"""Write the LLM half of a vision-language model, and its LoRA adapters, as GGUF files for llama.cpp.

Only llama-type LLMs are handled, with a byte-level BPE tokenizer (SmolLM2's, written as llama.cpp's "gpt2"
model) or a SentencePiece BPE one with its tokenizer.model (LLaMA-2, Vicuna, LLaVA-1.5: llama.cpp's "llama"
model, written as llama.cpp's convert_hf_to_gguf.py writes it); other LLMs and tokenizers are refused with a
pointer to the ONNX or merged-PyTorch exports.
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


class UnsupportedTokenizer(ValueError):
    pass


# What the writer can write: tokenizer.ggml.model -> which tokenizers, for the refusal of anything else.
TOKENIZER_KINDS = {"gpt2": "byte-level BPE (GPT-2 style, as SmolLM2's)",
                   "llama": "SentencePiece BPE with its tokenizer.model (LLaMA-2, Vicuna, LLaVA-1.5)"}
WRITE_ELSEWHERE = ("export with --onnx --merged instead and convert the merged directory with llama.cpp's "
                   "convert_hf_to_gguf.py, or use an LLM with one of those tokenizers")


def tokenizer_kind(tokenizer) -> str:
    """llama.cpp's tokenizer model for this HF tokenizer: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    Both say "BPE" in tokenizer.json; SentencePiece's has byte fallback and "▁" word marks (Metaspace)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, around = spec["model"], json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
    if model["type"] == "BPE" and "ByteLevel" in around and not model.get("byte_fallback"):
        return "gpt2"
    if model["type"] == "BPE" and (model.get("byte_fallback") or "\u2581" in around or "▁" in around):
        return "llama"
    raise UnsupportedTokenizer(f"GGUF export: this LLM's tokenizer is a {model['type']} one that mmagent's GGUF "
                               f"writer cannot write (it writes {' and '.join(TOKENIZER_KINDS.values())}); "
                               + WRITE_ELSEWHERE)


def check_tokenizer(tokenizer) -> str:
    """Refuse, before any work, a tokenizer this writer would write wrongly; its GGUF tokenizer model else."""
    kind = tokenizer_kind(tokenizer)
    if kind == "llama":
        _sentencepiece_model(tokenizer)
    return kind


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


def _add_special_ids(writer: gguf.GGUFWriter, tokenizer) -> None:
    special_ids = {writer.add_bos_token_id: tokenizer.bos_token_id, writer.add_eos_token_id: tokenizer.eos_token_id,
                   writer.add_pad_token_id: tokenizer.pad_token_id, writer.add_unk_token_id: tokenizer.unk_token_id}
    for add, token_id in special_ids.items():
        if token_id is not None:
            add(token_id)


def adds_bos(tokenizer) -> bool:
    """Whether transformers starts a text with the tokenizer's BOS: then stock llama.cpp must too (add_bos),
    and our prompts start with it (mmagent.train.vlm.added_bos, mmagent.prompt.prompt_ids)."""
    from mmagent.train.vlm import added_bos
    bos = added_bos(tokenizer)
    return bos is not None and bos == tokenizer.bos_token_id


def _add_byte_level_bpe(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens, types = _vocab_table(tokenizer, vocab_size)
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    _add_special_ids(writer, tokenizer)
    writer.add_add_bos_token(adds_bos(tokenizer))  # SmolLM2: none (its template writes <|im_start|>)


# ---- SentencePiece (LLaMA-2, Vicuna, LLaVA-1.5) ---------------------------------------------------------------

UNUSED_SCORE, ADDED_SCORE = -10000.0, -1000.0  # llama.cpp's converter's scores for padding and added rows


def _sentencepiece_model(tokenizer):
    """(SentencePieceProcessor, ModelProto) of the tokenizer.model the HF tokenizer was made from. Refused when
    it is missing (transformers' save_pretrained does not copy it), not BPE, or not the tokenizer's vocabulary."""
    from pathlib import Path

    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm_pb
    path = getattr(tokenizer, "vocab_file", None) or Path(tokenizer.name_or_path or ".") / "tokenizer.model"
    if not Path(path).is_file():
        raise UnsupportedTokenizer(
            f"GGUF export: the LLM's tokenizer is SentencePiece-style, and llama.cpp needs its tokenizer.model "
            f"(piece scores and types), which is not in `{tokenizer.name_or_path}`; copy the checkpoint's "
            "tokenizer.model beside its tokenizer.json (the hub checkpoints ship it) and export again")
    proto = spm_pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    if proto.trainer_spec.model_type != spm_pb.TrainerSpec.BPE:
        raise UnsupportedTokenizer(f"GGUF export: `{path}` is a SentencePiece "
                                   f"{spm_pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)} model; "
                                   "llama.cpp's llama tokenizer is written here for BPE ones only; " + WRITE_ELSEWHERE)
    sp = SentencePieceProcessor(model_file=str(path))
    vocab = tokenizer.get_vocab()
    wrong = [i for i in range(sp.vocab_size()) if vocab.get(sp.id_to_piece(i)) != i]
    if wrong:
        i = wrong[0]
        raise UnsupportedTokenizer(f"GGUF export: `{path}` is not this tokenizer's model: piece {i} is "
                                   f"{sp.id_to_piece(i)!r} there and id {vocab.get(sp.id_to_piece(i))} in the "
                                   f"tokenizer ({len(wrong)} pieces differ); put the checkpoint's own tokenizer.model "
                                   "beside its tokenizer.json")
    return sp, proto


def _piece_type(sp, i: int) -> int:
    for test, kind in ((sp.is_unknown, gguf.TokenType.UNKNOWN), (sp.is_control, gguf.TokenType.CONTROL),
                       (sp.is_unused, gguf.TokenType.UNUSED), (sp.is_byte, gguf.TokenType.BYTE)):
        if test(i):
            return kind
    return gguf.TokenType.NORMAL


def sentencepiece_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types for ids 0..vocab_size-1: the SentencePiece pieces (their scores rank the
    merges llama.cpp makes), then the HF tokenizer's added tokens (LLaVA's `<image>`, a `[PAD]`), then
    unused [PADn] rows up to the LLM's embedding rows."""
    sp, _ = _sentencepiece_model(tokenizer)
    n = sp.vocab_size()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [UNUSED_SCORE] * vocab_size, [gguf.TokenType.UNUSED] * vocab_size
    for i in range(n):
        tokens[i], scores[i], types[i] = sp.id_to_piece(i), sp.get_score(i), _piece_type(sp, i)
    for i, added in sorted(tokenizer.added_tokens_decoder.items()):
        if i >= vocab_size:
            raise ValueError(f"tokenizer has id {i} ({added.content!r}) but the LLM's vocabulary has only "
                             f"{vocab_size} rows")
        if i < n and tokens[i] == added.content:
            continue  # <unk>, <s>, </s>: SentencePiece's own types
        special = added.special
        # llama.cpp matches user-defined tokens in the raw text, before spaces become "▁"
        tokens[i] = added.content if special else added.content.replace("▁", " ")
        scores[i] = ADDED_SCORE
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    return tokens, scores, types


def _add_sentencepiece(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    tokens, scores, types = sentencepiece_vocab(tokenizer, vocab_size)
    _, proto = _sentencepiece_model(tokenizer)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_special_ids(writer, tokenizer)
    # What transformers adds around a text (its post-processor; the config's add_bos_token may be gone in a
    # re-saved tokenizer): stock llama.cpp then starts a prompt with <s> as transformers does
    ids = tokenizer("a").input_ids
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    if check_tokenizer(tokenizer) == "llama":
        _add_sentencepiece(writer, tokenizer, vocab_size)
    else:
        _add_byte_level_bpe(writer, tokenizer, vocab_size)


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
