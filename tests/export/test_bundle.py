"""The edge bundle end to end: two task adapters exported, loaded through llama.cpp + onnxruntime, switched."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from mmagent import Agent
from mmagent.bundle import BundleError, read_manifest
from mmagent.export.bundle import ExportError, export_bundle


def test_manifest_lists_every_part_with_hashes_and_selfcheck(bundle):
    m = read_manifest(bundle)
    assert set(m["adapters"]) == {"vqa", "caption"}
    assert set(m["adapters"]["vqa"]["files"]) == {"llm", "bridge"}
    assert set(m["adapters"]["caption"]["files"]) == {"llm", "bridge", "soft_prompt"}
    assert {"f16", "q8_0"} <= set(m["llm"]) and {"fp32", "fp16"} <= set(m["vision"])
    for rel in m["files"]:
        assert (bundle / rel).is_file()
    sc = m["selfcheck"]
    assert sc["greedy_f16"]["identical"] == sc["greedy_f16"]["cases"] > 0
    assert max(sc["vision"]["max_abs_diff"].values()) <= sc["vision"]["tolerance"]
    assert not sc["tokenizer"]["mismatched"] and sc["tokenizer"]["template_identical"]
    assert sc["tokenizer"]["prompt_identical"] and m["prompt"]["add_bos_id"] is None  # SmolLM2 adds no BOS
    assert "q8_0" in sc["quantised"]


def test_edge_and_torch_give_the_same_answers_per_adapter(bundle, two_runs, sample_image):
    edge, torch_agent = Agent.load(bundle), Agent.load(two_runs)
    assert type(edge.backend).__name__ == "EdgeBackend" and type(torch_agent.backend).__name__ == "TorchBackend"
    for adapter, prompt in [("vqa", "is there a circle?"), ("caption", "Describe the image."), (None, "hi?")]:
        a = edge.ask(sample_image, prompt, adapter=adapter, max_new_tokens=8)
        b = torch_agent.ask(sample_image, prompt, adapter=adapter, max_new_tokens=8)
        assert a.tokens == b.tokens and a.adapter == b.adapter


def test_switching_back_and_forth_gives_each_adapters_own_answer(bundle, sample_image):
    agent = Agent.load(bundle)
    first = {n: agent.ask(sample_image, "what shape is on the left?", adapter=n, max_new_tokens=8).tokens
             for n in agent.adapters}
    first[None] = agent.ask(sample_image, "what shape is on the left?", max_new_tokens=8, adapter=None).tokens
    for name in ["caption", "vqa", "caption", "vqa"]:
        assert agent.ask(sample_image, "what shape is on the left?", adapter=name, max_new_tokens=8).tokens == first[name]


def test_adapters_change_the_edge_outputs(bundle, sample_image):
    """Each part really is active: LLM LoRA, bridge LoRA and soft prompt all move the logits."""
    import numpy as np
    from PIL import Image
    from mmagent.backends.edge import EdgeBackend
    edge = EdgeBackend(bundle)
    img = Image.open(sample_image).convert("RGB")
    base = edge.prompt_segments(img, "is there a circle?", None, "vqa", ())
    cap = edge.prompt_segments(img, "is there a circle?", "caption", "vqa", ())
    assert cap[1].shape[0] == base[1].shape[0] + 4  # four soft-prompt rows
    assert not np.allclose(cap[1][4:], base[1])      # the bridge LoRA changed the image rows
    edge.llm.set_adapter(None)
    plain = edge.llm.next_token_logits(base)
    edge.llm.set_adapter("vqa")
    assert not np.allclose(edge.llm.next_token_logits(base), plain)


def test_tampered_file_is_refused(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    target = copy / "adapters/vqa/llm.lora.gguf"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"llm.lora.gguf` has sha256 .* re-export"):
        Agent.load(copy)


def test_export_refuses_existing_dir_without_force_and_keeps_it(two_runs, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export_bundle(two_runs, out, gguf=True, onnx=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_no_bundle(two_runs, tmp_path, monkeypatch):
    import mmagent.export.selfcheck as sc
    monkeypatch.setattr(sc, "VISION_TOL", -1.0)  # force the self-check to fail after every file is written
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"(?s)self-check failed.*ONNX image embeddings"):
        export_bundle(two_runs, out, gguf=True, onnx=True)
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


def test_export_that_would_drop_the_bridge_lora_is_refused(two_runs, tmp_path):
    with pytest.raises(ExportError, match="adapts bridge.*add --onnx"):
        export_bundle(two_runs, tmp_path / "b", gguf=True, onnx=False)


def test_unsupported_llm_is_refused_with_alternatives():
    from transformers import OPTConfig
    from mmagent.export.gguf.writer import UnsupportedForLlamaCpp, check_llama_cpp_support
    with pytest.raises(UnsupportedForLlamaCpp, match="--onnx.*--merged|--merged.*--onnx"):
        check_llama_cpp_support(OPTConfig())


@pytest.mark.slow
def test_merged_directory_loads_in_plain_transformers(two_runs, tmp_path, sample_image):
    from transformers import AutoModelForImageTextToText
    export_bundle(two_runs[:1], tmp_path / "m", gguf=False, onnx=False, merged=True)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "m/merged/vqa").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch_agent = Agent.load(two_runs[:1])
    vlm = torch_agent.backend.vlm
    enc = vlm.encode("Answer.", "is there a circle?", None)
    from PIL import Image
    pixels = vlm.pixels([Image.open(sample_image).convert("RGB")])
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        vlm.model.set_adapter("vqa")
        ours = vlm.logits({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels})
        plain = merged(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
    assert torch.allclose(ours, plain, atol=1e-4)


def test_info_shows_bundle_and_run(bundle, two_runs):
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "info", str(bundle)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "vqa" in out.stdout and "caption" in out.stdout and "self-check" in out.stdout and "q8_0" in out.stdout
    run = subprocess.run([sys.executable, str(ROOT / "cli.py"), "info", str(two_runs[0])], capture_output=True, text=True)
    assert run.returncode == 0 and "q_proj" in run.stdout


def test_bundle_without_onnx_is_refused_by_the_edge_backend_with_the_fix(two_runs, tmp_path):
    export_bundle(two_runs[:1], tmp_path / "m", gguf=False, onnx=False, merged=True)
    with pytest.raises(BundleError, match="re-export with --gguf --onnx, or load it with backend='torch'"):
        Agent.load(tmp_path / "m")


def test_a_native_crash_in_the_self_check_is_a_clear_error_and_leaves_no_bundle(two_runs, tmp_path, monkeypatch):
    import faulthandler
    import mmagent.isolate as isolate
    from mmagent.isolate import NativeCrash
    real = isolate.run_isolated
    monkeypatch.setattr(isolate, "run_isolated",  # the child segfaults where llama.cpp would have
                        lambda stage, file, fn, *a, **k: real(stage, file, faulthandler._sigsegv, **k))
    out = tmp_path / "bundle"
    with pytest.raises(NativeCrash, match=r"(?s)self-check .*crashed \(SIGSEGV\) on `llm.f16.gguf`.*not written"):
        export_bundle(two_runs, out, gguf=True, onnx=True)
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))
