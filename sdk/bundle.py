"""The edge bundle as a reader sees it: `manifest.json` plus the files it lists, each with its sha256.

    {"schema": 1, "family": "blip2", "base": {...}, "llm": {"f16": "llm.f16.gguf", ...},
     "vision": {"fp32": "vision.onnx", "fp16": "vision.fp16.onnx"}, "prompt": {...},
     "adapters": {"vqa": {"kinds": [...], "parts": {...}, "files": {"llm": ..., "bridge": ..., "soft_prompt": ...}}},
     "files": {"relative/path": "sha256"}, "sizes": {"relative/path": bytes}, "selfcheck": {...}}

`verify` is the one checker: the manifest's schema and required keys, then the existence, size (where the
manifest records sizes) and sha256 of the listed files. It collects every problem and raises them together
as one `DamagedBundle`, so `mmagent info` and the loaders report the same things.
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

from mmagent.files import sha256_file

SCHEMA = 1
# key -> (type, what it holds): what a reader needs before it can trust anything else in the manifest
REQUIRED = {"schema": (int, "the manifest format version"), "family": (str, "the model family"),
            "base": (dict, "the base model's ref and fingerprint"), "prompt": (dict, "chat template and image input"),
            "llm": (dict, "the GGUF LLM files by quantisation"), "vision": (dict, "the ONNX vision graphs"),
            "adapters": (dict, "the task adapters"), "files": (dict, "the sha256 of every file")}
PROMPT_KEYS = ("system", "chat_template", "image_token", "n_image_tokens", "image")
ADAPTER_KEYS = {"kinds": list, "parts": list, "soft_prompt_tokens": int, "files": dict}
WORDS = {list: "a list", int: "a whole number", dict: "an object", str: "text"}
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(ValueError):
    pass


class DamagedBundle(BundleError):
    """A bundle (or run directory) that failed verification; `problems` lists every one found."""

    def __init__(self, path, problems: list[str], what: str = "bundle", fix: str | None = None):
        self.path, self.problems = Path(path), list(problems)
        fix = fix or (f"re-export it (`mmagent export RUN [RUN ...] --gguf --onnx -o {path} --force`) and do not "
                      "use this copy")
        n = len(self.problems)
        super().__init__(f"{what} `{path}` is damaged ({n} problem{'s' if n != 1 else ''}); {fix}:\n  - "
                         + "\n  - ".join(self.problems))


def _load(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    if not path.is_file():
        raise BundleError(f"`{bundle}` is not a bundle (no manifest.json); create one with "
                          "`mmagent export RUN --gguf --onnx -o DIR`")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedBundle(bundle, [f"`{path}` is not valid JSON ({e})"]) from e


def manifest_problems(manifest) -> list[str]:
    """What is wrong with the manifest itself: not an object, another schema, missing or mistyped keys, a
    component that `files` holds no sha256 for."""
    if not isinstance(manifest, dict):
        return [f"manifest.json holds a {type(manifest).__name__}, not a JSON object"]
    problems = []
    if "schema" in manifest and manifest["schema"] != SCHEMA:
        problems.append(f"manifest schema is {manifest['schema']!r}, this mmagent reads schema {SCHEMA}; "
                        "re-export the bundle with this version")
    for key, (typ, what) in REQUIRED.items():
        if key not in manifest:
            problems.append(f"manifest.json lacks `{key}` ({what})")
        elif not isinstance(manifest[key], typ) or (typ is int and isinstance(manifest[key], bool)):
            problems.append(f"manifest `{key}` is a {type(manifest[key]).__name__}, expected {WORDS[typ]} ({what})")
    if any(k not in manifest or not isinstance(manifest[k], t) for k, (t, _) in REQUIRED.items()):
        return problems  # the checks below read these keys
    for k in ("ref", "fingerprint"):
        if k not in manifest["base"]:
            problems.append(f"manifest `base` lacks `{k}`")
    problems += [f"manifest `prompt` lacks `{k}`" for k in PROMPT_KEYS if k not in manifest["prompt"]]
    files = manifest["files"]
    for rel, digest in files.items():
        if not isinstance(digest, str) or not SHA256.match(digest):
            problems.append(f"manifest `files` has {digest!r} for `{rel}`, not a sha256 (64 hex digits)")
    sizes = manifest.get("sizes", {})
    if not isinstance(sizes, dict):
        problems.append(f"manifest `sizes` is a {type(sizes).__name__}, expected an object")
    refs = [(f"llm.{q}", f) for q, f in manifest["llm"].items()]
    refs += [(f"vision.{v}", manifest["vision"][v]) for v in ("fp32", "fp16") if v in manifest["vision"]]
    for name, a in manifest["adapters"].items():
        if not isinstance(a, dict):
            problems.append(f"manifest adapter `{name}` is a {type(a).__name__}, expected an object")
            continue
        for k, typ in ADAPTER_KEYS.items():
            if not isinstance(a.get(k), typ):
                got = "lacks it" if k not in a else f"has a {type(a[k]).__name__}"
                problems.append(f"manifest adapter `{name}` needs `{k}` ({WORDS[typ]}), {got}")
        if isinstance(a.get("files"), dict):
            refs += [(f"adapters.{name}.files.{k}", f) for k, f in a["files"].items()]
    for where, rel in refs:
        if not isinstance(rel, str):
            problems.append(f"manifest `{where}` is a {type(rel).__name__}, expected a file path")
        elif rel not in files:
            problems.append(f"manifest `{where}` names `{rel}`, which `files` does not list (no sha256 to check "
                            "it against)")
    return problems


def file_problems(bundle: str | Path, manifest: dict, names: list[str] | None = None) -> list[str]:
    """Existence, size (where recorded) and sha256 of the listed files (all by default)."""
    bundle = Path(bundle)
    files, sizes = manifest.get("files", {}), manifest.get("sizes", {})
    sizes = sizes if isinstance(sizes, dict) else {}
    problems = []
    for rel in names or list(files):
        expected = files.get(rel)
        f = bundle / rel
        if expected is None:
            problems.append(f"bundle `{bundle}` does not list `{rel}` in its manifest")
            continue
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts:
            problems.append(f"manifest lists `{rel}`, a path outside the bundle")
            continue
        if not f.is_file():
            problems.append(f"bundle file `{f}` is missing; re-export the bundle")
            continue
        size = f.stat().st_size
        if isinstance(sizes.get(rel), int) and size != sizes[rel]:
            problems.append(f"bundle file `{f}` is {size:,} bytes, the manifest says {sizes[rel]:,} "
                            f"({'truncated' if size < sizes[rel] else 'grown'} after export); re-export the bundle")
            continue
        actual = sha256_file(f)
        if actual != expected:
            said = str(expected)[:12]
            problems.append(f"bundle file `{f}` has sha256 {actual[:12]}..., the manifest says {said}...: "
                            "it was changed or damaged after export; re-export the bundle")
    return problems


def read_manifest(bundle: str | Path) -> dict:
    """The manifest, after checking its schema and required keys (every problem at once)."""
    bundle = Path(bundle)
    manifest = _load(bundle)
    problems = manifest_problems(manifest)
    if problems:
        raise DamagedBundle(bundle, problems)
    return manifest


def verify(bundle: str | Path, manifest: dict | None = None, names: list[str] | None = None) -> dict:
    """Check the bundle before anything reads it: the manifest (read from the bundle when not given) and the
    existence, size and sha256 of the listed files (all by default). Every problem is collected and raised
    as one DamagedBundle; returns the manifest."""
    bundle = Path(bundle)
    if manifest is None:
        manifest = _load(bundle)
    problems = manifest_problems(manifest)
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        problems += file_problems(bundle, manifest, names)
    if problems:
        raise DamagedBundle(bundle, problems)
    return manifest
