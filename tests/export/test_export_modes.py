"""Every export mode checks itself against torch, with its figures in the manifest: `--gguf` alone (the LLM
fed torch's image rows), `--onnx` alone (the vision graph), `--merged` (plain transformers, no PEFT)."""
import pytest

from conftest import train_adapter
from mmagent.export.bundle import export_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm_only_run(tmp_path_factory, micro_base):
    """LoRA on the LLM alone: the one kind of adapter `--gguf` without `--onnx` carries whole."""
    return train_adapter(tmp_path_factory.mktemp("runs") / "llm", micro_base, "vqa.toml", "lora.bridge=[]",
                         "lora.vision=[]")


@pytest.fixture(scope="module")
def bridge_only_run(tmp_path_factory, micro_base):
    """LoRA on the Q-Former alone: what `--onnx` without `--gguf` carries whole."""
    return train_adapter(tmp_path_factory.mktemp("runs") / "bridge", micro_base, "vqa.toml", "lora.llm=[]",
                         "lora.vision=[]")


def test_gguf_alone_checks_the_llm_and_its_lora_against_torch(llm_only_run, tmp_path):
    sc = export_bundle([llm_only_run], tmp_path / "b", gguf=True, onnx=False, quants=("f16", "q8_0"))["selfcheck"]
    g = sc["greedy_f16"]
    assert g["identical"] == g["cases"] > 0 and g["first_tokens"] > 0
    assert not sc["tokenizer"]["mismatched"] and sc["tokenizer"]["template_identical"]
    assert sc["quantised"]["q8_0"]["cases"] == g["cases"] and "vision" not in sc


def test_onnx_alone_checks_the_vision_graph_for_the_base_and_each_adapter(bridge_only_run, tmp_path):
    sc = export_bundle([bridge_only_run], tmp_path / "b", gguf=False, onnx=True)["selfcheck"]
    diffs = sc["vision"]["max_abs_diff"]
    assert set(diffs) == {"preprocess", "base", "vqa"} and max(diffs.values()) <= sc["vision"]["tolerance"]
    assert "greedy_f16" not in sc and "tokenizer" not in sc


def test_merged_directories_answer_as_the_adapters_they_were_merged_from(two_runs, tmp_path):
    m = export_bundle(two_runs, tmp_path / "b", gguf=False, onnx=False, merged=True)
    merged = m["selfcheck"]["merged"]
    assert set(merged) == {"vqa", "caption"}  # the caption adapter carries a soft prompt beside its weights
    assert all(g["identical"] == g["cases"] > 0 for g in merged.values()), merged
