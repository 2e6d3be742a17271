"""Nothing lost, nothing silently wrong: adapter name clashes, damaged bundles, incomplete runs."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from mmagent import Agent
from mmagent.export.bundle import export_bundle
from mmagent.train.adapters import AdapterError


def cli(*args) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "COLUMNS": "2000"})  # rich wraps at the width
    res.said = " ".join((res.stdout + res.stderr).split())
    return res


# ---- 1. two adapters with one name --------------------------------------------------------------------------

def test_two_runs_whose_adapters_share_a_name_are_refused(two_runs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(two_runs[0], a)
    shutil.copytree(two_runs[0], b)  # both hold adapters/vqa
    out = tmp_path / "bundle"
    for load in (lambda: export_bundle([a, b], out, gguf=True, onnx=True), lambda: Agent.load([a, b])):
        with pytest.raises(AdapterError) as e:
            load()
        said = " ".join(str(e.value).split())
        assert "adapter `vqa` is in 2 runs" in said and f"`{a}`" in said and f"`{b}`" in said
        assert "run.adapter=" in said
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


# ---- 2. `mmagent info` verifies what it describes -----------------------------------------------------------

@pytest.fixture
def copy(bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    return out


def edit_manifest(bundle, edit) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_info_lists_every_problem_of_a_damaged_bundle_and_fails(copy):
    (copy / "vision.fp16.onnx").unlink()
    gguf = copy / "llm.q8_0.gguf"
    with open(gguf, "r+b") as f:
        f.truncate(gguf.stat().st_size // 2)

    def damage(m):
        m["schema"] = 2
        m["files"]["adapters/vqa/llm.lora.gguf"] = "0" * 64
    edit_manifest(copy, damage)
    res = cli("info", copy)
    assert res.returncode == 1, res.said
    assert f"bundle `{copy}` is damaged (4 problems)" in res.said and "re-export" in res.said
    assert "vision.fp16.onnx` is missing" in res.said
    assert "llm.q8_0.gguf` is" in res.said and "(truncated after export)" in res.said
    assert "adapters/vqa/llm.lora.gguf` has sha256" in res.said
    assert "manifest schema is 2, this mmagent reads schema 1" in res.said
    assert "self-check:" not in res.said and "Traceback" not in res.said


@pytest.mark.parametrize("damage, problem", [
    (lambda b: (b / "manifest.json").unlink(), "manifest.json` is missing"),
    (lambda b: edit_manifest(b, lambda m: m.pop("llm")), "manifest.json lacks `llm`"),
    (lambda b: (b / "manifest.json").write_text("{"), "manifest.json` is not valid JSON"),
])
def test_info_on_a_bundle_with_a_broken_manifest_says_so(copy, damage, problem):
    damage(copy)
    res = cli("info", copy)
    assert res.returncode == 1 and "is damaged" in res.said and problem in res.said, res.said
    assert "Traceback" not in res.said


def test_info_on_a_folder_that_is_neither_exits_2(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.txt").write_text("x")
    res = cli("info", tmp_path / "photos")
    assert res.returncode == 2 and "is neither a bundle (manifest.json) nor a run directory" in res.said


def test_loading_a_damaged_bundle_lists_every_problem(copy):
    from mmagent.bundle import BundleError
    for rel in ("adapters/vqa/llm.lora.gguf", "adapters/caption/bridge.onnx_adapter"):
        (copy / rel).write_bytes(b"not the exported file")
    with pytest.raises(BundleError, match=r"(?s)damaged \(2 problems\).*vqa/llm.lora.gguf` is .*caption/bridge"):
        Agent.load(copy)


# ---- 3. eval on a bundle; a run without its adapter weights -------------------------------------------------

def test_eval_on_a_bundle_names_the_problem_and_the_fix(bundle):
    res = cli("eval", bundle)
    assert res.returncode == 2 and "Errno" not in res.said
    assert f"`{bundle}` is an exported bundle, not a run directory" in res.said and "runs/<name>" in res.said


def test_a_run_missing_its_adapter_weights_is_a_clear_error(two_runs, tmp_path):
    from mmagent.train.run import evaluate_run
    run = tmp_path / "vqa"
    shutil.copytree(two_runs[0], run)
    (run / "adapters/vqa/adapter_model.safetensors").unlink()
    missing = rf"adapter `{run}/adapters/vqa` is incomplete: `{run}/adapters/vqa/adapter_model.safetensors` " \
              r"\(its LoRA weights\) is missing; restore that file, or train the run again"
    with pytest.raises(AdapterError, match=missing):
        Agent.load(run)
    with pytest.raises(AdapterError, match=missing):
        evaluate_run(run, False, None)
    res = cli("info", run)
    assert res.returncode == 1 and "adapter_model.safetensors` (its LoRA weights) is missing" in res.said
