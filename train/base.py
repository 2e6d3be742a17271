"""Resolve a base reference (`builtin:tiny`, a local HF directory, a hub id) to a loaded model.

A base has a fingerprint (sha256 of its config and weights) that every adapter records; an adapter
refuses any base with another fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mmagent.files import sha256_file

FULL_HASH_LIMIT = 2 << 30  # above 2 GiB of weights, hash sizes and headers: seconds instead of minutes


class BaseError(ValueError):
    pass


@dataclass
class Base:
    ref: str
    path: Path
    fingerprint: str


def fingerprint(path: str | Path) -> str:
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    weights = sorted(path.glob("*.safetensors"))
    full = sum(w.stat().st_size for w in weights) <= FULL_HASH_LIMIT
    for w in weights:
        if full:
            h.update(sha256_file(w).encode())
        else:
            with open(w, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(n))
            h.update(str(w.stat().st_size).encode())
    return h.hexdigest()[:16]


def resolve(ref: str, cache_dir: str | Path | None = None) -> Base:
    """The local directory of a base. A builtin one must be built already (mmagent.train.build builds it):
    resolving never trains."""
    if ref.startswith("builtin:"):
        from mmagent.train.builtin import find_builtin
        path = find_builtin(ref.removeprefix("builtin:"), cache_dir)
    elif Path(ref).expanduser().is_dir():
        path = Path(ref).expanduser()
        if not (path / "config.json").exists():
            raise BaseError(f"base `{ref}` is a directory without config.json; point at a saved "
                            "transformers model (save_pretrained output)")
    else:
        path = _from_hub(ref)
    stamp = path / "mmagent_base.json"
    fp = json.loads(stamp.read_text())["fingerprint"] if stamp.exists() else fingerprint(path)
    return Base(ref, path, fp)


def _from_hub(ref: str) -> Path:
    if "/" not in ref:
        raise BaseError(f"base `{ref}` is neither a directory nor a hub id (owner/name) nor builtin:tiny|smol")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(ref, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as e:
        raise BaseError(f"base `{ref}` is not in the local hub cache and no hub is reachable ({type(e).__name__}); "
                        f"download it where there is network (`huggingface-cli download {ref} --local-dir DIR`) "
                        "and set `model.base = \"DIR\"`") from e


def load(base: Base, dtype=None, attention: str | None = None, device=None):
    """(model, tokenizer, image_processor) from a resolved base. `attention`: transformers'
    attn_implementation (sdpa, eager); `device`: load the weights straight onto it (a CUDA device)."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    config = AutoConfig.from_pretrained(base.path)
    kw = {"attn_implementation": attention} if attention else {}
    if device is not None and torch.device(device).type == "cuda":
        kw["device_map"] = {"": str(device)}
    model = AutoModelForImageTextToText.from_pretrained(base.path, config=config, dtype=dtype or torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    image_processor = AutoImageProcessor.from_pretrained(base.path)
    return model.eval(), tokenizer, image_processor
