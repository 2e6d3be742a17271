"""The real families' tiny checkpoints, trained through `mmagent train` (and exported) once per session: the
export tests and the server tests (test_families_server.py) share them, so neither pays a second run."""
import pytest

from tiny_checkpoints import blip2_opt, blip2_t5, instructblip, llava, train_run


@pytest.fixture(scope="session")
def instructblip_bundle(tmp_path_factory):
    """(run, edge bundle with GGUF + ONNX + merged) of InstructBLIP with Vicuna's SentencePiece tokenizer."""
    from mmagent.export.bundle import export_bundle
    tmp = tmp_path_factory.mktemp("instructblip")
    run = train_run(tmp, instructblip(tmp / "instructblip-vicuna-tiny", tokenizer="spm"), "vqa")
    export_bundle([run], tmp / "bundle", gguf=True, onnx=True, merged=True)
    return run, tmp / "bundle"


@pytest.fixture(scope="session")
def llava_export(tmp_path_factory):
    """(run, edge bundle with GGUF + mmproj + ONNX) of LLaVA-1.5, LoRA on the LLM, projector and vision tower."""
    from mmagent.export.bundle import export_bundle
    tmp = tmp_path_factory.mktemp("llava")
    run = train_run(tmp, llava(tmp / "llava-1.5-tiny", tokenizer="spm"), "vqa", 'lora.vision=["preset"]')
    export_bundle([run], tmp / "bundle", gguf=True, onnx=True)
    return run, tmp / "bundle"


@pytest.fixture(scope="session")
def blip2_opt_run(tmp_path_factory):
    """The run directory of a VQA adapter (`vqa`) on BLIP-2 + OPT."""
    tmp = tmp_path_factory.mktemp("blip2-opt")
    return train_run(tmp, blip2_opt(tmp / "blip2-opt-tiny"), "vqa")


@pytest.fixture(scope="session")
def blip2_t5_run(tmp_path_factory):
    """The run directory of an adapter named `cap` (trained on VQA) on BLIP-2 + Flan-T5."""
    tmp = tmp_path_factory.mktemp("blip2-t5")
    return train_run(tmp, blip2_t5(tmp / "blip2-flan-t5-tiny"), "cap")
