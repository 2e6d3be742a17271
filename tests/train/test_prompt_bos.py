"""BOS at the start of a prompt exactly where the checkpoint's tokenizer and processor put it (mmagent.prompt.prompt_ids):
LLaMA-2 / Vicuna / LLaVA-1.5 add <s>, OPT </s>, SmolLM2 (the default) and Flan-T5 nothing before the text. The
SentencePiece families end to end: test_llava_gguf.py and test_real_families.py."""
import pytest
import torch
from PIL import Image

from mmagent.prompt import prompt_ids
from mmagent.train.vlm import VLM, added_bos
from tiny_checkpoints import QFORMER, VISION, image_processor, llm_tokenizer, spm_tokenizer

WORDS = {"<img>": 9, "<s>": 1}


def encode(text: str) -> list[int]:
    """A stand-in tokenizer: <img> and <s> are special tokens, every other character one id."""
    ids = []
    while text:
        special = next((t for t in WORDS if text.startswith(t)), None)
        ids.append(WORDS[special] if special else ord(text[0]))
        text = text[len(special or text[0]):]
    return ids


@pytest.mark.parametrize("text,bos,image_first,expected", [
    ("ab<img>c", 1, False, [1, 97, 98, 9, 99]),     # LLaVA: BOS first
    ("<img><img>ab", 1, False, [1, 9, 9, 97, 98]),  # LLaVA's processor tokenises the whole text
    ("<img><img>ab", 1, True, [9, 9, 1, 97, 98]),   # BLIP-2 / InstructBLIP: the image tokens, then <s> text
    ("ab<img>c", 1, True, [1, 97, 98, 9, 99]),      # placeholders inside a chat turn: BOS first
    ("<s>ab<img>", 1, False, [1, 97, 98, 9]),       # a template that renders <s>: no second one
    ("<img><s>ab", 1, True, [9, 1, 97, 98]),
    ("<img>ab", None, True, [9, 97, 98]),           # a tokenizer that adds no BOS (SmolLM2): ids as they were
    ("ab<img>", None, False, [97, 98, 9]),
])
def test_prompt_ids_put_bos_where_the_processor_does(text, bos, image_first, expected):
    assert prompt_ids(encode, text, "<img>", bos, image_first) == expected


def _with_post_processor(tok, single: str, token: str):
    from tokenizers.processors import TemplateProcessing
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=single, special_tokens=[(token, tok.convert_tokens_to_ids(token))])
    return tok


def test_added_bos_is_what_transformers_puts_before_a_text(tmp_path):
    assert added_bos(llm_tokenizer()) is None  # SmolLM2: its bos_token <|im_start|> is never added
    assert added_bos(spm_tokenizer(tmp_path / "spm", {"<image>": True})) == 1  # LLaMA-2 / Vicuna: <s>
    opt = _with_post_processor(llm_tokenizer(), "<|endoftext|> $A", "<|endoftext|>")  # OPT's kind: </s> first
    assert added_bos(opt) == opt.convert_tokens_to_ids("<|endoftext|>") == opt("a").input_ids[0]
    t5 = _with_post_processor(llm_tokenizer(), "$A <|endoftext|>", "<|endoftext|>")  # Flan-T5's kind: </s> after
    assert added_bos(t5) is None


def blip2_vlm(tok, text_config=None) -> VLM:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig
    torch.manual_seed(0)
    text = text_config or LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=VISION, qformer_config=QFORMER, text_config=text.to_dict(), num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"))).eval()
    return VLM(model, tok, image_processor())


@pytest.mark.parametrize("template", [True, False])
def test_the_defaults_prompt_ids_are_unchanged(template):
    """SmolLM2 adds no BOS: a prompt is its text's ids, with its chat template and without (BLIP-2 OPT's layout)."""
    from mmagent.export.gguf.writer import adds_bos
    tok = llm_tokenizer()
    if not template:
        tok.chat_template = None
    vlm = blip2_vlm(tok)
    assert vlm.bos is None and not adds_bos(tok)  # nor does stock llama.cpp add one to its GGUF
    text = vlm.prompt_text("Describe the image.", "what is it?")
    answer = tok("a red circle", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert vlm.encode("Describe the image.", "what is it?", "a red circle").input_ids == \
        tok(text, add_special_tokens=False).input_ids + answer


def test_an_opt_kind_tokenizer_starts_the_text_after_the_queries_with_its_bos_as_blip2s_processor_does():
    from transformers import Blip2Processor, OPTConfig
    tok = _with_post_processor(llm_tokenizer(), "<|endoftext|> $A", "<|endoftext|>")
    tok.chat_template = None  # OPT's: `Question: .. Answer:`
    vlm = blip2_vlm(tok, OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                   num_attention_heads=4, word_embed_proj_dim=32))
    text = vlm.prompt_text("Describe the image.", "what is it?")
    processor = Blip2Processor(image_processor=image_processor(), tokenizer=tok, num_query_tokens=4)
    expected = processor(images=Image.new("RGB", (32, 32)), text=text.replace(vlm.placeholder(), "")).input_ids[0]
    ids = vlm.encode("Describe the image.", "what is it?", None).input_ids
    assert ids == [int(i) for i in expected] and ids[4] == vlm.bos == tok.convert_tokens_to_ids("<|endoftext|>")
