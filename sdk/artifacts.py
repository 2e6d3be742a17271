"""What a directory is: an exported bundle, a run directory, one adapter folder, or a model directory.

The one place that decides it, and that names the files each kind holds; `Agent.load`, the torch backend,
`mmagent info`, `mmagent export` and `mmagent eval` all ask here. Stdlib only (the edge path imports it).
"""
from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"            # a bundle's index (mmagent.bundle)
ADAPTER_META = "mmagent_adapter.json"  # marks an adapter folder (mmagent.adapters)
MODEL_CONFIG = "config.json"           # a transformers model directory
RUN_MARKS = ("recipe.json", "results.json")  # written by `mmagent train` (besides adapters/)
# The files a bundle holds per task adapter, by the part each carries: the key is the manifest's
# `adapters.<name>.files` key, the value the file name under `adapters/<name>/`.
BUNDLE_ADAPTER_FILES = {"llm": "llm.lora.gguf", "bridge": "bridge.onnx_adapter", "soft_prompt": "soft_prompt.safetensors"}

BUNDLE, RUN, ADAPTER, MODEL = "bundle", "run", "adapter", "model"


def looks_like_bundle(path: Path) -> bool:
    """Files only an export writes: GGUF / ONNX at the top, or adapters/<name>/ holding bundle parts (a
    bundle that lost its manifest is still a bundle, a damaged one)."""
    path = Path(path)
    return (path / MANIFEST).is_file() or any(path.glob("*.gguf")) or any(path.glob("*.onnx")) or any(
        any(path.glob(f"adapters/*/{BUNDLE_ADAPTER_FILES[k]}")) for k in ("llm", "bridge"))


def run_adapter_dirs(run: Path) -> list[Path]:
    """A run directory's adapter folders (`adapters/<task>/` holding mmagent_adapter.json), sorted."""
    folder = Path(run) / "adapters"
    return sorted(d for d in folder.iterdir() if (d / ADAPTER_META).is_file()) if folder.is_dir() else []


def kind_of(path: Path) -> str | None:
    """BUNDLE, RUN, ADAPTER, MODEL, or None for a folder that is none of them (or no folder)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if looks_like_bundle(path):  # first: a bundle has adapters/ too
        return BUNDLE
    if (path / "adapters").is_dir() or any((path / f).is_file() for f in RUN_MARKS):
        return RUN
    if (path / ADAPTER_META).is_file():
        return ADAPTER
    if (path / MODEL_CONFIG).is_file():
        return MODEL
    return None


def what_to_give(path: Path) -> str:
    """The error for a path that is none of the kinds, naming what each kind holds."""
    path = Path(path)
    if not path.exists():
        return f"`{path}` does not exist; give a bundle, a run directory or a model directory"
    if not path.is_dir():
        return f"`{path}` is a file; give a bundle, a run directory or a model directory (a folder)"
    return (f"`{path}` is neither a run directory (adapters/, {', '.join(RUN_MARKS)}), an adapter folder "
            f"({ADAPTER_META}), a bundle ({MANIFEST}) nor a model directory ({MODEL_CONFIG})")
