"""The task adapter as every stage sees it: one record (`Adapter`), read once.

On disk a run's `adapters/<task>/` is a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`,
which plain `peft.PeftModel.from_pretrained` loads) with two files of ours beside it:
`mmagent_adapter.json` (task, kinds, parts, instructions, system prompt, the base fingerprint) and
`soft_prompt.safetensors`. `read_adapter` turns such a folder into an `Adapter` holding all of it, the
LoRA weights with their own rank and alpha; the torch backend, export, merge and the self-check all use
that record. In a bundle the manifest carries the same facts (`from_manifest`). Also here: the PEFT
weight-name grammar and the one "no adapter X" check.

No torch at import time: the edge path imports this module.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from mmagent.artifacts import ADAPTER_META

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
SOFT_PROMPT = "soft_prompt.safetensors"
META = ADAPTER_META
PEFT_PREFIX = "base_model.model."  # PEFT names every weight from the wrapped model's root
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class AdapterError(ValueError):
    pass


class UnknownAdapter(KeyError, ValueError):
    """A name that is not among the adapters: a KeyError to lookups, a ValueError (a user error) to the CLI."""

    def __str__(self) -> str:
        return str(self.args[0])


# ---- PEFT weight names -------------------------------------------------------------------------------

def lora_key(key: str) -> tuple[str, str] | None:
    """`base_model.model.<module>.lora_A.weight` -> (`<module>`, "A"); None for a key that is not a LoRA A/B."""
    match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
    return (match["module"], match["ab"]) if match else None


def lora_modules(weights: Iterable[str]) -> list[str]:
    """The modules (names from the model's root) that LoRA weights adapt."""
    return sorted({parsed[0] for k in weights if (parsed := lora_key(k))})


def model_name(key: str) -> str:
    """A PEFT parameter name as the plain model names it."""
    return key.removeprefix(PEFT_PREFIX)


# ---- the record --------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Lora:
    """One adapter's LoRA: its own rank and alpha (scale = alpha / r), the weights as PEFT names them,
    and the PEFT configuration they were saved with."""
    r: int
    alpha: float
    weights: Mapping[str, Any]  # PEFT key -> array (numpy or torch, as read)
    config: Mapping[str, Any] = field(default_factory=dict)

    def under(self, prefix: str) -> dict:
        """The weights of modules under `prefix` (a model-root module path, e.g. `language_model`)."""
        return {k: v for k, v in self.weights.items() if model_name(k).startswith(prefix + ".")}


@dataclass(frozen=True, eq=False)
class Adapter:
    """A task adapter: LLM LoRA + bridge (and vision) LoRA + soft prompt, which switch together."""
    name: str
    kinds: tuple[str, ...]            # task kinds it serves: caption, vqa, match
    parts: tuple[str, ...]            # the parts it adapts: vision, bridge, llm
    soft_prompt_tokens: int = 0
    instructions: Mapping[str, str] = field(default_factory=dict)  # task kind -> instruction it was trained with
    system: str | None = None         # its system prompt (None: the base's default)
    lora: Lora | None = None          # None where only the facts are known (a bundle's manifest)
    soft_prompt: Any = None           # (n, H) vectors, or None
    base_ref: str = ""
    base_fingerprint: str = ""
    path: Path | None = None          # the folder it was read from

    def check_base(self, fingerprint: str) -> None:
        """An adapter belongs to the base it was trained on."""
        if self.base_fingerprint != fingerprint:
            raise AdapterError(f"adapter `{self.path}` was trained on base {self.base_ref} (fingerprint "
                               f"{self.base_fingerprint}), not this base ({fingerprint}); load it with base "
                               f"`{self.base_ref}`")


AdapterInfo = Adapter  # the name Agent.adapter_info has always returned


def require(name: str, names: Iterable[str], choices: Iterable[str] = ()) -> None:
    """The one "no adapter X" check: KeyError naming what there is (and any other `choices`, e.g. auto)."""
    names = list(names)
    if name not in names:
        listed = ", ".join([*choices, *names]) or "none"
        raise UnknownAdapter(f"no adapter `{name}`; {'choose one of' if choices else 'this model has'}: {listed}")


# ---- reading -----------------------------------------------------------------------------------------

def read_meta(path: Path) -> dict:
    """The adapter's mmagent_adapter.json, after checking that the files it needs are all there."""
    path = Path(path)
    f = path / META
    if not f.exists():
        raise AdapterError(f"`{path}` is not an mmagent adapter (no {META}); point at runs/<run>/adapters/<task>")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"`{f}` is not valid JSON ({e}); {_retrain_hint(path)}") from e
    missing = [k for k in ("task", "base_ref", "base_fingerprint", "parts")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise AdapterError(f"`{f}` lacks {', '.join(missing)}; {_retrain_hint(path)}")
    needed = {WEIGHTS: "its LoRA weights", CONFIG: "its PEFT configuration"}
    if meta.get("soft_prompt_tokens"):
        needed[SOFT_PROMPT] = f"its {meta['soft_prompt_tokens']} soft-prompt vectors"
    for name, what in needed.items():
        if not (path / name).is_file():
            raise AdapterError(f"adapter `{path}` is incomplete: `{path / name}` ({what}) is missing; restore that "
                               f"file, or {_retrain_hint(path)}")
    return meta


def _retrain_hint(path: Path) -> str:
    run = path.parent.parent if path.parent.name == "adapters" else None
    if run is not None:
        return (f"train the run again (move `{run}` aside, then `mmagent train` its recipe; `{run / 'recipe.json'}` "
                "holds the settings it used)")
    return "train the adapter again with `mmagent train RECIPE.toml`"


def _load_tensors(path: Path, framework: str) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework=framework) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_adapter(path: Path, framework: str = "np") -> Adapter:
    """Everything an adapter folder holds, read once; tensors as numpy ("np") or torch ("pt") arrays."""
    path = Path(path)
    meta = read_meta(path)
    try:
        config = json.loads((path / CONFIG).read_text())
        lora = Lora(int(config["r"]), float(config["lora_alpha"]), _load_tensors(path / WEIGHTS, framework), config)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"adapter `{path}` has an unreadable `{CONFIG}` or `{WEIGHTS}` ({type(e).__name__}: {e}); "
                           f"{_retrain_hint(path)}") from e
    soft = _load_tensors(path / SOFT_PROMPT, framework)["vectors"] if (path / SOFT_PROMPT).is_file() else None
    parts = meta["parts"]
    return Adapter(name=meta["task"], kinds=tuple(meta.get("kinds", [])),
                   parts=tuple(parts if isinstance(parts, list) else parts.keys()),
                   soft_prompt_tokens=int(meta.get("soft_prompt_tokens", 0)),
                   instructions=dict(meta.get("instructions", {})), system=meta.get("system"), lora=lora,
                   soft_prompt=soft, base_ref=meta["base_ref"], base_fingerprint=meta["base_fingerprint"], path=path)


def from_manifest(name: str, entry: dict) -> Adapter:
    """The facts a bundle's manifest records about adapter `name` (its files are the edge backend's)."""
    return Adapter(name=name, kinds=tuple(entry["kinds"]), parts=tuple(entry["parts"]),
                   soft_prompt_tokens=entry["soft_prompt_tokens"], instructions=dict(entry.get("instructions", {})),
                   system=entry.get("system"))


def check_unique(adapters: list[Adapter]) -> None:
    """One model holds one adapter per name: two adapters named alike would leave one silently unused."""
    by_name: dict[str, list[Path]] = {}
    for a in adapters:
        by_name.setdefault(a.name, []).append(Path(a.path))
    clashes = {name: ds for name, ds in by_name.items() if len(ds) > 1}
    if not clashes:
        return
    lines = []
    for name, ds in clashes.items():
        where = [str(d.parent.parent) if d.parent.name == "adapters" else str(d) for d in ds]
        if len({d.resolve() for d in ds}) < len(ds):
            lines.append(f"adapter `{name}` is given more than once ({', '.join(f'`{d}`' for d in ds)}); "
                         "list each run once")
        else:
            lines.append(f"adapter `{name}` is in {len(ds)} runs: {', '.join(f'`{w}`' for w in where)} "
                         f"({', '.join(f'`{d}`' for d in ds)})")
    raise AdapterError("adapter names must differ, one model holds one adapter per name:\n  " + "\n  ".join(lines)
                       + "\nfix: train one of them again under another adapter name with `run.adapter=NAME` (and a run "
                         "directory of its own), e.g. `mmagent train RECIPE.toml run.name=vqa2 run.adapter=vqa2`, "
                         "then load or export the runs together")
