"""Tiny random checkpoints of the real transformers classes, saved as the hub checkpoints are laid out.

Each is an HF directory with config.json, safetensors weights, the LLM's tokenizer (SmolLM2's byte-level
BPE, or with tokenizer="spm" a LLaMA-2 style SentencePiece one trained here, tokenizer.model included, as
Vicuna's and LLaVA-1.5's are) with an `<image>` token added as the real processors add it, the image
processor, and the processor files (InstructBLIP's `qformer_tokenizer/` beside the LLM's).
Shapes are tiny; the classes, file layout and token plumbing are the real ones.
"""
from __future__ import annotations

from pathlib import Path

import torch

RECIPE = """# a few steps of a VQA adapter on a tiny checkpoint (tests only)
[run]
name = "{name}"
output_dir = "{out}"
[model]
base = "{base}"
[lora]
r = 4
alpha = 8
llm = ["preset"]
bridge = ["preset"]
[data]
train_images = 24
eval_images = 8
image_size = 32
[train]
steps = 3
batch_size = 4
lr = 5e-3
warmup_steps = 1
checkpoint_every = 0
eval_base = false
max_new_tokens = 4
[[tasks]]
name = "{name}"
kind = "vqa"
max_eval = 4
"""


def train_run(tmp: Path, base: Path, name: str, *overrides: str) -> Path:
    """`mmagent train` on a tiny checkpoint (the CLI itself, in this process): the run directory."""
    from typer.testing import CliRunner

    from cli import app
    recipe = tmp / f"{name}.toml"
    recipe.write_text(RECIPE.format(name=name, out=tmp / name, base=base))
    result = CliRunner().invoke(app, ["train", str(recipe), *overrides])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return tmp / name

IMAGE = 32  # pixels; patch 8 -> 16 patches
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE, patch_size=8)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               encoder_hidden_size=32)
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, tie_word_embeddings=False)
QFORMER_WORDS = ("describe the image answer question with a single word or number what colour is how many "
                 "circle circles square squares triangle triangles red green blue yellow left right top bottom "
                 "middle small large there are shape shapes of in on a an does this caption yes no ? . ,").split()


def llm_tokenizer():
    """SmolLM2's tokenizer (what the builtin bases use) with the `<image>` placeholder added."""
    from mmagent.train.builtin import smollm2_tokenizer
    tok = smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


# LLaVA-1.5's conversation layout (Vicuna v1): "USER: <image>\n... ASSISTANT: ...</s>"
VICUNA_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + ' ' }}"
                   "{% elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
                   "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
SPM_TEXT = [" ".join(QFORMER_WORDS), "You look at one image and answer briefly.", "USER: what is in the picture? "
            "ASSISTANT: a red circle and two blue squares.", "Question: how many triangles are there? Answer: 3",
            "The quick brown fox jumps over the lazy dog 0123456789 times."]


def sentencepiece_model() -> bytes:
    """A tiny tokenizer.model trained as LLaMA's was: BPE, byte fallback, digits split, "▁" word marks,
    <unk>=0 <s>=1 </s>=2, whitespace kept as written."""
    import io

    import sentencepiece as spm
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TEXT * 8), model_writer=out, vocab_size=420, model_type="bpe", byte_fallback=True,
        split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2)
    return out.getvalue()


def spm_tokenizer(folder: Path, added: dict[str, bool], chat_template: str | None = VICUNA_TEMPLATE, pad: str | None = None):
    """A LlamaTokenizer as LLaMA-2 / Vicuna / LLaVA-1.5 checkpoints ship it: tokenizer.model, tokenizer_config.json
    (`legacy: false`, BOS added), special_tokens_map.json, then tokens added on top ({text: special}), e.g.
    LLaVA's `<image>` and `<pad>` or InstructBLIP-Vicuna's `[PAD]`. `folder` keeps tokenizer.model for _save."""
    import json

    from transformers import AddedToken, AutoTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model())
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "add_bos_token": True, "add_eos_token": False, "legacy": False, "padding_side": "left",
         "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False}))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in added.items()])
    tok.add_special_tokens({"additional_special_tokens": [t for t, special in added.items() if special and t != pad],
                            **({"pad_token": pad} if pad else {})})
    tok.chat_template = chat_template
    return tok


def qformer_tokenizer(folder: Path):
    """A BERT WordPiece tokenizer like instructblip's `qformer_tokenizer/` (bert-base-uncased), tiny vocabulary."""
    from transformers import BertTokenizerFast
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(QFORMER_WORDS),
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), *"abcdefghijklmnopqrstuvwxyz0123456789"]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


def image_processor(kind: str = "blip"):
    from transformers import BlipImageProcessor, CLIPImageProcessor
    if kind == "clip":
        return CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    return BlipImageProcessor(size={"height": IMAGE, "width": IMAGE})


def _save(model, tok, processor, out: Path) -> Path:
    model.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json, as hub checkpoints have it
    processor.save_pretrained(out)  # tokenizer(s), image processor and processor config, as the hub has them
    tok.save_pretrained(out)
    spm = Path(getattr(tok, "vocab_file", None) or "")
    if spm.name == "tokenizer.model":  # SentencePiece: hub checkpoints ship it; save_pretrained does not write it
        (out / "tokenizer.model").write_bytes(spm.read_bytes())
    return out


def llm_tok(out: Path, tokenizer: str, added: dict[str, bool], pad: str | None = None, chat_template=VICUNA_TEMPLATE):
    """The LLM tokenizer of a tiny checkpoint: "smollm2" (byte-level BPE) or "spm" (LLaMA-2 style)."""
    if tokenizer == "smollm2":
        return llm_tokenizer()
    return spm_tokenizer(out.parent / f".{out.name}-spm", added, chat_template, pad)


def instructblip(out: Path, seed: int = 0, tokenizer: str = "smollm2") -> Path:
    """instructblip-vicuna's layout; tokenizer="spm": Vicuna's SentencePiece tokenizer with its `[PAD]` and the
    `<image>` token added, no chat template (prompts: `Question: .. Answer:`), as the hub checkpoint has it."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor, LlamaConfig
    tok = llm_tok(out, tokenizer, {"[PAD]": True, "<image>": True}, pad="[PAD]", chat_template=None)
    qtok = qformer_tokenizer(out.parent / f".{out.name}-qformer-vocab")
    torch.manual_seed(seed)
    config = InstructBlipConfig(vision_config=VISION, qformer_config={**QFORMER, "vocab_size": qtok.vocab_size},
                                text_config=LlamaConfig(vocab_size=len(tok), **LLAMA).to_dict(), num_query_tokens=4,
                                image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = InstructBlipForConditionalGeneration(config)
    processor = InstructBlipProcessor(image_processor=image_processor(), tokenizer=tok, qformer_tokenizer=qtok,
                                      num_query_tokens=4)
    return _save(model, tok, processor, out)


def _blip2(out: Path, text_config, tok, seed: int) -> Path:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    torch.manual_seed(seed)
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text_config.to_dict(),
                         num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = Blip2ForConditionalGeneration(config)
    processor = Blip2Processor(image_processor=image_processor(), tokenizer=tok, num_query_tokens=4)
    return _save(model, tok, processor, out)


def plain_tokenizer():
    """The LLM tokenizer without a chat template, as OPT's and Flan-T5's are (prompts: `Question: .. Answer:`)."""
    tok = llm_tokenizer()
    tok.chat_template = None
    return tok


def blip2_opt(out: Path, seed: int = 0) -> Path:
    from transformers import OPTConfig
    tok = plain_tokenizer()
    text = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                     word_embed_proj_dim=32, max_position_embeddings=512, pad_token_id=tok.pad_token_id or 0,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _blip2(out, text, tok, seed)


def blip2_t5(out: Path, seed: int = 0) -> Path:
    from transformers import T5Config
    tok = plain_tokenizer()
    pad = tok.pad_token_id or 0
    text = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=pad,
                    decoder_start_token_id=pad, eos_token_id=tok.eos_token_id)
    return _blip2(out, text, tok, seed)


def llava(out: Path, seed: int = 0, tokenizer: str = "smollm2") -> Path:
    """llava-hf/llava-1.5's layout: CLIP ViT (quick_gelu, features of the second-last layer, CLS dropped),
    a GELU MLP projector, a LLaMA LLM; LlavaProcessor expands `<image>` to one token per patch.
    tokenizer="spm": LLaMA-2's SentencePiece tokenizer with `<image>` and `<pad>` added, the USER/ASSISTANT
    template, and the embedding rows padded to a multiple of 64 (32064 in the real checkpoint)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    tok = llm_tok(out, tokenizer, {"<image>": True, "<pad>": True}, pad="<pad>")
    rows = len(tok) if tokenizer == "smollm2" else -(-len(tok) // 64) * 64
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION, projection_dim=32, hidden_act="quick_gelu").to_dict(),
                         text_config=LlamaConfig(vocab_size=rows, **LLAMA).to_dict(),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(image_processor=image_processor("clip"), tokenizer=tok, patch_size=VISION["patch_size"],
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return _save(model, tok, processor, out)


def prompt_ids_everywhere(run: Path, bundle: Path, base: Path, image, question: str) -> dict:
    """The LLM prompt ids of one VQA question, base model, as each stage makes them: the checkpoint's own processor
    (fed the text without placeholders where it adds the image tokens itself, as users call it), training
    (VLM.encode), the torch backend (what it hands VLM.generate), the edge backend (its segments, image rows
    counted as image tokens), and stock llama.cpp (Llama.tokenize with add_bos over each text segment; the GGUF's
    add_bos decides). Also the prompt text and its text before / after the placeholders."""
    from llama_cpp import Llama
    from transformers import AutoProcessor

    from mmagent import Agent
    from mmagent.backends.edge import EdgeBackend
    from mmagent.prompt import VQA_INSTRUCTION
    backend = Agent.load(run, backend="torch").backend
    vlm = backend.vlm
    text, placeholder = backend.prompt_text(None, VQA_INSTRUCTION, question), vlm.placeholder()
    before, after = text.split(placeholder, 1)
    image_id = vlm.family.image_token_id(vlm.base_model)
    processor = AutoProcessor.from_pretrained(base)
    processed = processor(images=image, text=before + ("<image>" if before else "") + after).input_ids[0]
    handed = []
    generate = vlm.generate
    vlm.generate = lambda pixels, prompts, *a, **k: handed.append(list(prompts[0])) or generate(pixels, prompts, *a, **k)
    backend.generate(image, question, None, "vqa", (), 1, None)
    edge = EdgeBackend(bundle)
    head, rows, tail = edge.prompt_segments(image, question, None, "vqa", ())
    edge.close()
    stock = Llama(model_path=str(bundle / "llm.f16.gguf"), vocab_only=True, verbose=False)
    ids = {"processor": [int(i) for i in processed], "train": vlm.encode(VQA_INSTRUCTION, question, "red").input_ids,
           "torch": handed[0], "edge": head + [image_id] * len(rows) + tail, "edge_segments": (head, tail),
           "stock_llama_cpp": tuple(stock.tokenize(t.encode(), add_bos=True, special=True) if t else []
                                    for t in (before, after))}
    stock.close()
    return ids | {"text": text, "before": before, "after": after, "bos": vlm.bos, "image": image_id,
                  "n_image": len(rows), "vlm": vlm}
