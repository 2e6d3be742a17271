"""LLaVA-1.5 for stock llama.cpp: our LLM GGUF + LoRA GGUF + mmproj GGUF answer through llama-cpp-python's own
multimodal handler (MTMDChatHandler), and our own edge bundle stays exact and switchable. The tiny checkpoint
has LLaVA-1.5's kind of tokenizer (SentencePiece, tokenizer.model, `<image>` and `<pad>` added)."""
import base64
import ctypes
import io
import json

import numpy as np
import pytest
from PIL import Image

from mmagent import Agent
from tiny_checkpoints import IMAGE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    import random
    from mmagent.train.data.shapes import draw_scene, sample_scene
    buf = io.BytesIO()
    draw_scene(sample_scene(random.Random(5)), IMAGE).save(buf, "PNG")
    return buf.getvalue()


def mtmd_image_rows(llm, handler, png: bytes) -> np.ndarray:
    """The image rows stock llama.cpp feeds its LLM (mtmd's encoder output), read through libmtmd."""
    import llama_cpp.mtmd_cpp as mt
    handler._init_mtmd_context(llm)
    chunks = mt.mtmd_input_chunks_init()
    text = mt.mtmd_input_text()
    prompt = b"x" + mt.mtmd_default_marker() + b"y"
    text.text, text.text_len, text.add_special, text.parse_special = prompt, len(prompt), False, True
    bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(handler._create_bitmap_from_bytes(png))
    assert mt.mtmd_tokenize(handler.mtmd_ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
    try:
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n = mt.mtmd_input_chunk_get_n_tokens(chunk)
                assert mt.mtmd_encode_chunk(handler.mtmd_ctx, chunk) == 0
                return np.ctypeslib.as_array(mt.mtmd_get_output_embd(handler.mtmd_ctx), shape=(n * llm.n_embd(),)) \
                    .reshape(n, -1).copy()
    finally:
        mt.mtmd_input_chunks_free(chunks)
    raise AssertionError("no image chunk")


def cosine_rows(a, b) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_llava_mmproj_and_gguf_answer_through_llama_cpp_pythons_multimodal_handler(llava_export, png):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler
    run, bundle = llava_export
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["mmproj"] == {"base": "mmproj.f16.gguf", "adapters": {"vqa": "adapters/vqa/mmproj.gguf"}}
    torch_agent = Agent.load(run, backend="torch")
    vlm, rows = torch_agent.backend.vlm, {}
    for adapter, mmproj, lora in ((None, "mmproj.f16.gguf", None), ("vqa", "adapters/vqa/mmproj.gguf", "llm.lora.gguf")):
        handler = MTMDChatHandler(clip_model_path=str(bundle / mmproj), verbose=False)
        llm = Llama(model_path=str(bundle / "llm.f16.gguf"), chat_handler=handler, n_ctx=256, verbose=False,
                    lora_path=str(bundle / "adapters/vqa" / lora) if lora else None)
        try:
            out = llm.create_chat_completion(messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
                {"type": "text", "text": "what colour is the circle?"}]}], max_tokens=4, temperature=0)
            assert out["usage"]["completion_tokens"] > 0
            assert out["usage"]["prompt_tokens"] > vlm.family.n_image_tokens(vlm.base_model)  # the image went in
            rows[adapter] = mtmd_image_rows(llm, handler, png)
        finally:
            llm.close()
        with torch_agent.backend.using_adapter(adapter):
            ref = vlm.image_embeds(vlm.pixels([Image.open(io.BytesIO(png)).convert("RGB")])).detach().numpy()[0]
        # llama.cpp's llava graph hands the LLM patches 2..n then CLS: every patch row is transformers' exactly
        # (f16 weights), one row earlier; the last row is the CLS token's (documented in export/gguf/mmproj.py)
        assert cosine_rows(rows[adapter][:-1], ref[1:]).min() > 0.999
    assert not np.allclose(rows[None], rows["vqa"], atol=1e-4)  # the adapter's mmproj carries its merged LoRA


def test_llava_edge_bundle_is_exact_and_switchable(llava_export):
    import gguf
    run, bundle = llava_export
    m = json.loads((bundle / "manifest.json").read_text())
    sc = m["selfcheck"]
    # LLaVA-1.5's SentencePiece tokenizer: llama.cpp's "llama" model in the GGUF, tokenizer.json for the edge
    assert gguf.GGUFReader(bundle / "llm.f16.gguf").fields["tokenizer.ggml.model"].contents() == "llama"
    assert m["prompt"]["llm_tokenizer"] in m["files"] and sc["tokenizer"]["mismatched"] == []
    assert sc["greedy_f16"]["identical"] == sc["greedy_f16"]["cases"] > 0
    diffs = sc["vision"]["max_abs_diff"]
    assert max(diffs.values()) <= sc["vision"]["tolerance"] and set(diffs) == {"preprocess", "base", "vqa"}
    meta = json.loads((run / "adapters/vqa/mmagent_adapter.json").read_text())
    assert meta["parts"] == {"vision": ["q_proj", "v_proj"], "bridge": ["linear_1", "linear_2"], "llm": ["q_proj", "v_proj"]}


def test_llava_prompt_starts_with_bos_everywhere_as_its_processor_and_stock_llama_cpp_put_it(llava_export, png):
    """LLaVA-1.5's tokenizer adds <s> (add_bos) and its processor tokenises the whole prompt: BOS first, once,
    in training, the torch backend, the edge and stock llama.cpp alike (a template rendering <s> adds no second)."""
    from tiny_checkpoints import prompt_ids_everywhere
    run, bundle = llava_export
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["prompt"]["add_bos_id"] == 1 and m["prompt"]["image_first"] is False
    assert m["selfcheck"]["tokenizer"]["prompt_identical"] is True
    image = Image.open(io.BytesIO(png)).convert("RGB")
    got = prompt_ids_everywhere(run, bundle, bundle.parent / "llava-1.5-tiny", image, "what colour is the circle?")
    ids = got["processor"]
    assert ids[0] == got["bos"] == 1 and ids[1] != 1 and ids.count(got["image"]) == got["n_image"]
    assert got["torch"] == ids == got["edge"] and got["train"][:len(ids)] == ids
    head, _ = got["edge_segments"]
    # stock llama.cpp starts the text before the image with <s> as we do (after the image, sentencepiece's
    # space rules part from transformers': mmagent.backends.edge.PromptTokenizer)
    assert got["stock_llama_cpp"][0] == head and head[0] == 1
    from mmagent.backends.edge import PromptTokenizer
    rendered = "<s>" + got["text"]  # as a chat template that renders <s> itself makes it
    once = got["vlm"].prompt_ids(rendered)
    assert once[0] == 1 and once[1] != 1 and once == PromptTokenizer(bundle, m["prompt"], None).prompt(rendered)
