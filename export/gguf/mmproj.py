"""LLaVA-1.5's image path as an mmproj GGUF that stock llama.cpp loads (llama-mtmd-cli, llama-server
`--mmproj`, llama-cpp-python's MTMDChatHandler): CLIP ViT + 2-layer MLP projector, `clip.projector_type`
mlp, the `clip.vision.*` keys llama.cpp's llava converter writes.

Names are a table (HF -> GGUF, `{bid}` for the layer), as gguf-py keeps them. Two facts of llama.cpp's
llava graph (tools/mtmd/models/llava.cpp) shape what is written: it appends the CLS token after the
patches while adding position rows 0..n in order, so the position table is written with HF's CLS row
last (every token then carries transformers' position); and it runs the layers up to
`clip.vision.feature_layer`, written from the config's vision_feature_layer. Stock llama.cpp then hands the
LLM the rows 1..n of that sequence: patches 2..n and the CLS token, not patches 1..n as transformers does,
one row shifted (measured in tests/export/test_llava_gguf.py); our own edge runtime (ONNX) is exact.

Projector / vision LoRA cannot be switched inside stock llama.cpp, so each adapter that has it gets its
own mmproj with the LoRA merged (`merged_image_path`).
"""
from __future__ import annotations

import os
import re

import gguf
import numpy as np
import torch

from mmagent.files import atomic_path

VISION_TENSORS = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight", "pre_layrnorm.bias": "v.pre_ln.bias",
    "encoder.layers.{bid}.self_attn.q_proj.{wb}": "v.blk.{bid}.attn_q.{wb}",
    "encoder.layers.{bid}.self_attn.k_proj.{wb}": "v.blk.{bid}.attn_k.{wb}",
    "encoder.layers.{bid}.self_attn.v_proj.{wb}": "v.blk.{bid}.attn_v.{wb}",
    "encoder.layers.{bid}.self_attn.out_proj.{wb}": "v.blk.{bid}.attn_out.{wb}",
    "encoder.layers.{bid}.layer_norm1.{wb}": "v.blk.{bid}.ln1.{wb}",
    "encoder.layers.{bid}.layer_norm2.{wb}": "v.blk.{bid}.ln2.{wb}",
    "encoder.layers.{bid}.mlp.fc1.{wb}": "v.blk.{bid}.ffn_up.{wb}",
    "encoder.layers.{bid}.mlp.fc2.{wb}": "v.blk.{bid}.ffn_down.{wb}",
}
PROJECTOR_TENSORS = {"linear_1.{wb}": "mm.0.{wb}", "linear_2.{wb}": "mm.2.{wb}"}
UNUSED = ("post_layernorm.",)  # llava takes features before the last layer norm


def _gguf_name(hf: str, table: dict) -> str | None:
    for pattern, target in table.items():
        regex = re.escape(pattern).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{wb\}", r"(?P<wb>weight|bias)")
        match = re.fullmatch(regex, hf)
        if match:
            return target.format(**match.groupdict())
    return None


def check_llava(model) -> None:
    from mmagent.train.families import family_for
    fam = family_for(model)
    cfg = model.config
    problems = []
    if fam.name != "llava":
        problems.append(f"an mmproj GGUF is written for LLaVA; this is {fam.name}")
    elif cfg.vision_config.model_type != "clip_vision_model":
        problems.append(f"the vision tower is `{cfg.vision_config.model_type}`, not CLIP")
    elif cfg.vision_feature_select_strategy != "default" or cfg.projector_hidden_act != "gelu":
        problems.append("llama.cpp's llava graph drops the CLS token and uses a GELU projector; this config "
                        f"selects `{cfg.vision_feature_select_strategy}` with `{cfg.projector_hidden_act}`")
    if problems:
        raise ValueError(f"cannot write an mmproj GGUF for llama.cpp: {'; '.join(problems)}; export with --onnx "
                         "(our edge runtime) or --merged instead")


def image_path_tensors(model, deltas: dict[str, torch.Tensor] | None = None) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) of the vision tower and projector; `deltas` (module weight name -> delta) are added
    first, which is how an adapter's LoRA is merged."""
    deltas = deltas or {}
    out = []
    for prefix, table in (("model.vision_tower.", VISION_TENSORS), ("model.multi_modal_projector.", PROJECTOR_TENSORS)):
        for hf, tensor in model.get_submodule(prefix.rstrip(".")).state_dict().items():
            if hf.startswith(UNUSED):
                continue
            name = _gguf_name(hf, table)
            if name is None:
                raise ValueError(f"`{prefix}{hf}` has no mmproj tensor in llama.cpp's llava layout")
            t = tensor.detach().float() + deltas.get(prefix + hf, 0)
            if name == "v.position_embd.weight":  # CLS row last: llama.cpp appends CLS after the patches
                t = torch.cat([t[1:], t[:1]])
            out.append((name, t.cpu().numpy()))
    return out


def _dtype(name: str, array: np.ndarray) -> np.dtype:
    return np.dtype(np.float16 if array.ndim == 2 and name.endswith(".weight") and "position" not in name
                    else np.float32)


def write_mmproj(model, image_processor, path: str | os.PathLike, deltas=None, name: str = "mmproj") -> None:
    """Write the image path of a float32 LlavaForConditionalGeneration (plus LoRA `deltas`) for llama.cpp."""
    check_llava(model)
    vc = model.config.vision_config
    layer = model.config.vision_feature_layer
    feature_layer = layer if layer >= 0 else vc.num_hidden_layers + 1 + layer  # 0 = the encoder's input
    tensors = image_path_tensors(model, deltas)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "clip")
        try:
            w.add_name(name)
            w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
            w.add_bool("clip.has_text_encoder", False)
            w.add_bool("clip.has_vision_encoder", True)
            w.add_bool("clip.has_llava_projector", True)
            w.add_string("clip.projector_type", "mlp")
            w.add_bool("clip.use_gelu", vc.hidden_act == "gelu")  # else llama.cpp runs CLIP's quick_gelu
            w.add_uint32("clip.vision.image_size", vc.image_size)
            w.add_uint32("clip.vision.patch_size", vc.patch_size)
            w.add_uint32("clip.vision.embedding_length", vc.hidden_size)
            w.add_uint32("clip.vision.feed_forward_length", vc.intermediate_size)
            w.add_uint32("clip.vision.projection_dim", model.config.text_config.hidden_size)
            w.add_uint32("clip.vision.attention.head_count", vc.num_attention_heads)
            w.add_float32("clip.vision.attention.layer_norm_epsilon", vc.layer_norm_eps)
            w.add_uint32("clip.vision.block_count", vc.num_hidden_layers)
            w.add_array("clip.vision.feature_layer", [feature_layer])
            w.add_array("clip.vision.image_mean", [float(x) for x in image_processor.image_mean])
            w.add_array("clip.vision.image_std", [float(x) for x in image_processor.image_std])
            for tname, array in tensors:
                w.add_tensor(tname, array.astype(_dtype(tname, array)))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()


def lora_deltas(image_state: dict, alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """PEFT LoRA tensors of the image path -> {`<module>.weight`: (alpha / r) B @ A}: the merged change."""
    pairs: dict[str, dict] = {}
    for key, t in image_state.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight", key)
        if m is None:
            raise ValueError(f"`{key}` is not a LoRA A/B weight; an mmproj can merge only those")
        pairs.setdefault(m["module"], {})[m["ab"]] = torch.as_tensor(t).float()
    return {f"{mod}.weight": (alpha / rank) * ab["B"] @ ab["A"] for mod, ab in pairs.items()}


# Multimodal chat clients (llama-cpp-python's MTMDChatHandler, llama-server) hand the template messages whose
# content is a list of parts; a text-only template (SmolLM2's, Vicuna's) concatenates strings. This prelude
# joins each message's text parts (the image already replaced by the media marker) so either form renders.
LIST_CONTENT_PRELUDE = (
    "{%- set ns = namespace(m=[]) -%}{%- for message in messages -%}{%- if message['content'] is string -%}"
    "{%- set ns.m = ns.m + [message] -%}{%- else -%}{%- set ns.m = ns.m + [{'role': message['role'], 'content': "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')}] -%}"
    "{%- endif -%}{%- endfor -%}{%- set messages = ns.m -%}")


def list_content_template(template: str | None) -> str | None:
    return template if not template or "ns.m" in template else LIST_CONTENT_PRELUDE + template
