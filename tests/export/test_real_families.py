"""Real model families end to end on tiny random checkpoints of the real transformers classes: train through
`mmagent train`, export, reload through the SDK, each adapter changes the output and survives export."""
import json

import numpy as np
import pytest
from PIL import Image

from mmagent import Agent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import random
    from mmagent.train.data.shapes import draw_scene, sample_scene
    path = tmp_path_factory.mktemp("img") / "scene.png"
    draw_scene(sample_scene(random.Random(3)), 32).save(path)
    return path


def test_instructblip_trains_with_the_familys_presets_and_exports_checked(instructblip_bundle):
    run, bundle = instructblip_bundle
    meta = json.loads((run / "adapters/vqa/mmagent_adapter.json").read_text())
    assert meta["family"] == "instructblip" and meta["parts"] == {"bridge": ["query", "value"], "llm": ["q_proj", "v_proj"]}
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["prompt"]["qformer_tokenizer"] in m["files"]  # the edge tokenises the instruction itself
    sc = m["selfcheck"]
    # Vicuna's SentencePiece tokenizer, no chat template: `<image>...Question: .. Answer:` tokenised as torch does
    assert m["prompt"]["llm_tokenizer"] in m["files"] and sc["tokenizer"]["mismatched"] == []
    assert m["prompt"]["chat_template"] is None and sc["tokenizer"]["template_identical"]
    # the merged directory keeps the hub layout: tokenizer.model for GGUF converters, the LoRA folded in
    assert (bundle / m["merged"]["vqa"] / "tokenizer.model").is_file()
    assert sc["merged"]["vqa"]["identical"] == sc["merged"]["vqa"]["cases"] > 0
    assert sc["greedy_f16"]["identical"] == sc["greedy_f16"]["cases"] > 0
    assert max(sc["vision"]["max_abs_diff"].values()) <= sc["vision"]["tolerance"]


def test_instructblip_instruction_reaches_the_qformer_on_the_edge(instructblip_bundle, image):
    from mmagent.backends.edge import EdgeBackend
    _, bundle = instructblip_bundle
    edge = EdgeBackend(bundle)
    img = Image.open(image).convert("RGB")
    rows = {q: edge.prompt_segments(img, q, None, "vqa", ())[1] for q in ("is there a circle?", "how many squares?")}
    assert not np.allclose(*rows.values(), atol=1e-5)  # the image rows depend on the instruction
    adapted = edge.prompt_segments(img, "is there a circle?", "vqa", "vqa", ())[1]
    assert not np.allclose(adapted, rows["is there a circle?"], atol=1e-6)  # the bridge LoRA is active
    edge.close()


def test_instructblip_torch_and_edge_answer_alike(instructblip_bundle, image):
    run, bundle = instructblip_bundle
    torch_agent, edge_agent = Agent.load(run), Agent.load(bundle)
    for adapter in ("vqa", None):
        a = torch_agent.ask(image, "what colour is the circle?", adapter=adapter, max_new_tokens=6)
        b = edge_agent.ask(image, "what colour is the circle?", adapter=adapter, max_new_tokens=6)
        assert a.tokens == b.tokens


def test_blip2_t5_trains_answer_only_and_exports_merged(blip2_t5_run, tmp_path, image):
    """Flan-T5's encoder reads prompt + image, its decoder the answer; llama.cpp cannot run it: refused for
    GGUF naming what works, exported merged (checked against the LoRA model) and answered by the torch backend."""
    from mmagent.export.bundle import export_bundle
    run = blip2_t5_run
    assert json.loads((run / "adapters/cap/mmagent_adapter.json").read_text())["parts"]["llm"] == ["q", "v"]
    with pytest.raises(ValueError, match=r"`t5`.*--onnx --merged"):
        export_bundle([run], tmp_path / "gguf", gguf=True, onnx=True)
    m = export_bundle([run], tmp_path / "bundle", gguf=False, onnx=False, merged=True)
    merged = Agent.load(tmp_path / "bundle" / m["merged"]["cap"])
    agent = Agent.load(run)
    lora, bare = (agent.ask(image, "what is there?", adapter=a, max_new_tokens=6).tokens for a in ("cap", None))
    assert merged.ask(image, "what is there?", max_new_tokens=6).tokens == lora  # the LoRA survived the merge


def test_blip2_opt_trains_and_gguf_is_refused_before_any_work(blip2_opt_run, tmp_path):
    from mmagent.export.bundle import export_bundle
    run = blip2_opt_run
    assert (run / "adapters/vqa/adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"`opt`: llama.cpp has no OPT architecture.*--onnx --merged"):
        export_bundle([run], tmp_path / "gguf", gguf=True, onnx=True, merged=False)
    assert not (tmp_path / "gguf").exists()


def test_instructblip_prompt_has_bos_after_the_image_tokens_as_its_processor_puts_it(instructblip_bundle, image):
    """InstructBLIP's processor puts the query tokens before the tokenised text, whose <s> (Vicuna's add_bos)
    follows them: so do training, the torch backend, the edge, and stock llama.cpp on the text after the image."""
    from tiny_checkpoints import prompt_ids_everywhere
    run, bundle = instructblip_bundle
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["prompt"]["add_bos_id"] == 1 and m["prompt"]["image_first"] is True
    assert m["selfcheck"]["tokenizer"]["prompt_identical"] is True
    got = prompt_ids_everywhere(run, bundle, bundle.parent / "instructblip-vicuna-tiny", Image.open(image).convert("RGB"),
                                "what colour is the circle?")
    ids, n = got["processor"], got["n_image"]
    assert ids[:n] == [got["image"]] * n and ids[n] == got["bos"] == 1 and 1 not in ids[n + 1:]
    assert got["torch"] == ids == got["edge"] and got["train"][:len(ids)] == ids
    assert got["edge_segments"] == ([], ids[n:]) and got["stock_llama_cpp"] == ([], ids[n:])


def test_blip2_opt_exports_onnx_and_merged_checked_against_the_lora_model(blip2_opt_run, tmp_path, image):
    """`mmagent export RUN --onnx --merged`, what OPT gets instead of GGUF: the vision graph with the bridge
    LoRA, and the LLM with its LoRA folded in, both self-checked against the LoRA model in torch."""
    from typer.testing import CliRunner

    from cli import app
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["export", str(blip2_opt_run), "-o", str(out), "--onnx", "--merged"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    m = json.loads((out / "manifest.json").read_text())
    sc = m["selfcheck"]
    assert m["llm"] == {} and not list(out.glob("*.gguf"))  # no GGUF asked for, none written
    assert sc["merged"]["vqa"]["identical"] == sc["merged"]["vqa"]["cases"] > 0  # greedy tokens, merged vs LoRA
    diffs = sc["vision"]["max_abs_diff"]
    assert set(diffs) >= {"base", "vqa"} and max(diffs.values()) <= sc["vision"]["tolerance"]
    merged, agent = Agent.load(out / m["merged"]["vqa"]), Agent.load(blip2_opt_run)
    lora = agent.ask(image, "how many squares?", adapter="vqa", max_new_tokens=6).tokens
    assert merged.ask(image, "how many squares?", max_new_tokens=6).tokens == lora
