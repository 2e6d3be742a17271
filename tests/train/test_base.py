"""Base references: builtin, local directory, hub id offline; and the SmolLM2 variant's weights."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from mmagent.train.base import BaseError, fingerprint, resolve


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseError, match=r"no hub is reachable.*local-dir DIR.*model.base"):
        resolve("Salesforce/blip2-opt-2.7b")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(BaseError, match="without config.json"):
        resolve(str(tmp_path))


def test_local_directory_resolves_with_a_stable_fingerprint(micro_base):
    a, b = resolve(str(micro_base)), resolve(str(micro_base))
    assert a.path == micro_base and a.fingerprint == b.fingerprint == fingerprint(micro_base)


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(ValueError, match="builtin:tiny, builtin:smol"):
        resolve("builtin:huge")


def test_resolving_an_unbuilt_builtin_base_never_trains(tmp_path):
    """Building a base sits above the trainer: resolving one imports no training code and says how to build."""
    code = ("import sys\nfrom mmagent.train.base import BaseError, resolve\ntry:\n"
            f"    resolve('builtin:tiny', cache_dir={str(tmp_path)!r})\nexcept BaseError as e:\n    print(e)\n"
            "print(sorted(m for m in sys.modules if m in ('mmagent.train.trainer', 'mmagent.train.build')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "is not built yet" in out.stdout and "mmagent base build tiny" in out.stdout, out.stdout + out.stderr
    assert out.stdout.strip().endswith("[]") and not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_cli_help_does_not_import_torch():
    """`mmagent --help` stays fast because no command's heavy imports run before it is chosen."""
    code = (f"import runpy, sys\nsys.argv = ['mmagent', '--help']\ntry:\n    runpy.run_path({str(ROOT / 'cli.py')!r}, "
            "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "train" in out.stdout and out.stdout.strip().endswith("False"), out.stdout[-500:]


@pytest.mark.slow
def test_smol_variant_carries_smollm2_weights():
    from transformers import AutoModelForCausalLM
    from mmagent.train.builtin import init_base, smollm2_gguf
    model, tok, _ = init_base("smol")
    gguf = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False).input_ids])
    with torch.no_grad():
        assert torch.equal(model.language_model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert model.config.text_config.hidden_size == 576 and len(tok) == 49152
