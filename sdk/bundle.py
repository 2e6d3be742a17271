"""The edge bundle as a reader sees it: `manifest.json` plus the files it lists, each with its sha256.

    {"schema": 1, "family": "blip2", "base": {...}, "llm": {"f16": "llm.f16.gguf", ...},
     "vision": {"fp32": "vision.onnx", "fp16": "vision.fp16.onnx"}, "prompt": {...},
     "adapters": {"vqa": {"kinds": [...], "parts": {...}, "files": {"llm": ..., "bridge": ..., "soft_prompt": ...}}},
     "files": {"relative/path": "sha256"}, "selfcheck": {...}}
"""
from __future__ import annotations

import json
from pathlib import Path

from mmagent.files import sha256_file

SCHEMA = 1


class BundleError(ValueError):
    pass


def read_manifest(bundle: str | Path) -> dict:
    path = Path(bundle) / "manifest.json"
    if not path.is_file():
        raise BundleError(f"`{bundle}` is not a bundle (no manifest.json); create one with "
                          "`mmagent export RUN --gguf --onnx -o DIR`")
    manifest = json.loads(path.read_text())
    if manifest.get("schema") != SCHEMA:
        raise BundleError(f"bundle `{bundle}` has schema {manifest.get('schema')}, this mmagent reads {SCHEMA}; "
                          "re-export it with this version")
    return manifest


def verify(bundle: str | Path, manifest: dict, names: list[str] | None = None) -> None:
    """Check the sha256 of the listed files (all by default) before anything reads them."""
    bundle = Path(bundle)
    for rel in names or list(manifest["files"]):
        expected = manifest["files"].get(rel)
        f = bundle / rel
        if expected is None:
            raise BundleError(f"bundle `{bundle}` does not list `{rel}` in its manifest")
        if not f.is_file():
            raise BundleError(f"bundle file `{f}` is missing; re-export the bundle")
        actual = sha256_file(f)
        if actual != expected:
            raise BundleError(f"bundle file `{f}` has sha256 {actual[:12]}..., the manifest says {expected[:12]}...: "
                              "it was changed or damaged after export; re-export the bundle")
