"""GGUF export of a SentencePiece LLM tokenizer (LLaMA-2, Vicuna, LLaVA-1.5): a tiny tokenizer.model trained here
as LLaMA's was, laid out as the hub checkpoints ship it, written by our writer and read back by llama.cpp."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mmagent.backends.llama_cpp import LlamaCppLM
from mmagent.export.gguf.writer import UnsupportedTokenizer, check_tokenizer, write_llm_gguf
from test_gguf import assert_matches_torch
from tiny_checkpoints import spm_tokenizer

ADDED = {"<image>": True, "<pad>": True, "<note>": False}  # LLaVA's two, and one plain (user-defined) token


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tokenizer files of a checkpoint directory (tokenizer.model, tokenizer.json, tokenizer_config.json)."""
    out = tmp_path_factory.mktemp("llava-tok")
    tok = spm_tokenizer(tmp_path_factory.mktemp("spm"), ADDED, pad="<pad>")
    tok.save_pretrained(out)
    (out / "tokenizer.model").write_bytes(Path(tok.vocab_file).read_bytes())  # hub checkpoints ship it
    return out


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)  # as mmagent loads a base


@pytest.fixture(scope="module")
def llm(tokenizer):
    torch.manual_seed(0)
    rows = -(-len(tokenizer) // 64) * 64  # padded, as LLaVA-1.5's 32064 rows over 32002 tokens
    config = LlamaConfig(vocab_size=rows, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, initializer_range=0.1, bos_token_id=1,
                         eos_token_id=2, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval().to(torch.float16).to(torch.float32)


@pytest.fixture(scope="module")
def llm_gguf(llm, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "llm.f16.gguf"
    write_llm_gguf(llm, tokenizer, path)
    return path


@pytest.fixture(scope="module")
def runtime(llm_gguf):
    with LlamaCppLM(llm_gguf, n_ctx=256, n_threads=1) as lm:
        yield lm


# Spaces inside text, digits (split one by one), characters the tiny model never saw (byte fallback), the
# added tokens (special and plain) where no text follows a special one.
TEXTS = ["Hello world", "two  spaces,\tthen a tab\n\n\nand blank lines   ", "café naïve Ærøskøbing — “quotes”",
         "日本語のテキスト and 한국어", "emoji 🐱🤖👍🏽 mixed", "numbers 12345, 3.14159 and 2024-06-01",
         "don't won't I'll", "USER: <image>", "a red <note>", "x <image><pad>"]


@pytest.mark.parametrize("text", TEXTS)
def test_llama_cpp_tokenizes_as_transformers(runtime, tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert runtime.tokenize(text) == ids
    assert runtime.detokenize(ids).strip() == tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_byte_fallback_is_exercised(tokenizer):
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("日本語 🐱", add_special_tokens=False))
    assert sum(p.startswith("<0x") for p in pieces) >= 10  # unseen characters fall back to their UTF-8 bytes


def test_llama_cpp_follows_sentencepiece_where_transformers_does_not(runtime, tokenizer, checkpoint):
    """After a special token and before a leading space, transformers (legacy: false) and sentencepiece part:
    llama.cpp does what sentencepiece does, as for a GGUF from llama.cpp's own converter; the edge backend
    therefore tokenises prompts with the checkpoint's tokenizer.json (mmagent.backends.edge.PromptTokenizer)."""
    import sentencepiece

    from mmagent.backends.edge import PromptTokenizer
    sp = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    image = tokenizer.convert_tokens_to_ids("<image>")
    assert runtime.tokenize("<image>\nWhat is it?") == [image, *sp.encode("\nWhat is it?")]  # a fresh "▁"
    assert runtime.tokenize("  two") == sp.encode("  two")
    edge = PromptTokenizer(checkpoint, {"llm_tokenizer": "tokenizer.json", "image_token": "<image>"}, runtime)
    for text in ("<image>\nWhat is it?", "  two", "a <note> b", "USER: <image><image>\nhi ASSISTANT: a</s>USER: b"):
        assert edge(text) == tokenizer.encode(text, add_special_tokens=False)
    prompt = "USER: <image><image>\nhi ASSISTANT:"
    whole = tokenizer.encode(prompt, add_special_tokens=False)
    before, after = edge.around(prompt, "<image><image>")
    assert before + [image, image] + after == whole


def test_greedy_tokens_match_torch(runtime, llm, tokenizer):
    ids = tokenizer.encode("USER: what colour is the circle? ASSISTANT:", add_special_tokens=False)
    assert len(assert_matches_torch(runtime, llm, [ids])) > 0


def test_gguf_metadata(llm_gguf, tokenizer, llm):
    reader = gguf.GGUFReader(llm_gguf)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("llama", "default")
    tokens, types, scores = (field(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == len(types) == len(scores) == llm.config.vocab_size
    T = gguf.TokenType
    assert [types[i] for i in (0, 1, 2)] == [T.UNKNOWN, T.CONTROL, T.CONTROL]  # <unk> <s> </s>
    assert tokens[3:5] == ["<0x00>", "<0x01>"] and types[3] == T.BYTE
    vocab = tokenizer.get_vocab()
    assert (types[vocab["<image>"]], types[vocab["<pad>"]], types[vocab["<note>"]]) == (T.CONTROL, T.CONTROL,
                                                                                     T.USER_DEFINED)
    assert tokens[vocab["<image>"]] == "<image>" and tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == T.UNUSED
    merges = [i for i, t in enumerate(types) if t == T.NORMAL]
    assert scores[merges[0]] > scores[merges[-1]]  # SentencePiece's ranks: earlier pieces merge first
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.unknown_token_id"), field("tokenizer.ggml.padding_token_id")) == \
        (1, 2, 0, vocab["<pad>"])
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.add_eos_token") is False
    assert field("tokenizer.ggml.add_space_prefix") is True


def test_without_tokenizer_model_it_is_refused_naming_the_file(tokenizer, llm, tmp_path):
    resaved = tmp_path / "resaved"
    tokenizer.save_pretrained(resaved)  # transformers writes tokenizer.json only
    bare = AutoTokenizer.from_pretrained(resaved)
    with pytest.raises(UnsupportedTokenizer, match="tokenizer.model.*copy the checkpoint's tokenizer.model"):
        write_llm_gguf(llm, bare, tmp_path / "out" / "llm.gguf")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_foreign_tokenizer_model_is_refused(checkpoint, tmp_path):
    import shutil
    other = spm_tokenizer(tmp_path / "other", {"<image>": True})  # same model, different added ids
    other.save_pretrained(tmp_path / "mixed")
    shutil.copy(checkpoint / "tokenizer.model", tmp_path / "mixed")
    mixed = AutoTokenizer.from_pretrained(tmp_path / "mixed")
    check_tokenizer(mixed)  # the same tokenizer.model: its pieces are this tokenizer's, fine
    rng = np.random.default_rng(0)
    from sentencepiece import sentencepiece_model_pb2 as spm_pb
    proto = spm_pb.ModelProto()
    proto.ParseFromString((checkpoint / "tokenizer.model").read_bytes())
    pieces = list(proto.pieces)[300:310]
    for p, q in zip(pieces, rng.permutation(pieces)):
        p.piece = q.piece + "x"
    (tmp_path / "mixed" / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(UnsupportedTokenizer, match="is not this tokenizer's model: piece 300"):
        check_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "mixed"))


def test_tokenizers_the_writer_cannot_write_are_refused_naming_the_way_that_works():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UnsupportedTokenizer, match="WordPiece.*--onnx --merged.*convert_hf_to_gguf"):
        check_tokenizer(PreTrainedTokenizerFast(tokenizer_object=wordpiece))


def test_a_unigram_sentencepiece_model_is_refused(tokenizer, checkpoint, tmp_path):
    """llama.cpp's `llama` tokenizer merges pieces by score, which is SentencePiece BPE; a Unigram model
    (T5's kind) would tokenise differently there."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb
    tokenizer.save_pretrained(tmp_path)
    proto = spm_pb.ModelProto()
    proto.ParseFromString((checkpoint / "tokenizer.model").read_bytes())
    proto.trainer_spec.model_type = spm_pb.TrainerSpec.UNIGRAM
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(UnsupportedTokenizer, match="UNIGRAM model.*--onnx --merged"):
        check_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
