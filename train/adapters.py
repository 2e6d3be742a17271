"""Task adapters: LoRA on the LLM, the bridge and optionally the vision tower, plus an optional soft prompt.

On disk an adapter is a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`, loadable by plain
`PeftModel.from_pretrained`) with two files of ours beside it: `soft_prompt.safetensors` and
`mmagent_adapter.json` (task, parts adapted, the base fingerprint it belongs to).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmagent.files import atomic_dir

PARTS = ("vision", "bridge", "llm")


class AdapterError(ValueError):
    pass


def linear_leaves(model, prefix: str) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if n.startswith(prefix + ".") and isinstance(m, torch.nn.Linear)}
    return sorted(names)


def target_regex(model, family, lora_cfg) -> str:
    """One regex over full module names; errors list the Linear leaves that do exist in that part."""
    problems, alternatives = [], []
    for part in PARTS:
        leaves = getattr(lora_cfg, part)
        if not leaves:
            continue
        prefix = getattr(family.parts, part)
        available = linear_leaves(model, prefix)
        missing = [leaf for leaf in leaves if leaf not in available]
        if missing:
            problems.append(f"`lora.{part}`: no Linear module named {', '.join(missing)} in the {part} "
                            f"({prefix}); available: {', '.join(available)}")
        leaves_re = "|".join(map(re.escape, leaves))
        alternatives.append(rf"{re.escape(prefix)}\.(?:.*\.)?(?:{leaves_re})")
    if problems:
        raise AdapterError("\n".join(problems))
    return "^(?:" + "|".join(alternatives) + ")$"


def inject_lora(model, family, lora_cfg, name: str):
    """Freeze the base, wrap it in a PeftModel holding adapter `name` (`preset` = the family's targets)."""
    from peft import LoraConfig, get_peft_model

    from mmagent.train.families import expand_presets
    lora_cfg = expand_presets(lora_cfg, family, model)
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=target_regex(model, family, lora_cfg), bias="none")
    return get_peft_model(model, config, adapter_name=name)


class SoftPrompt(torch.nn.Module):
    """N learned vectors in the LLM's embedding space, initialised from random vocabulary embeddings."""

    def __init__(self, embed_tokens: torch.nn.Embedding, n_tokens: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, embed_tokens.num_embeddings, (n_tokens,), generator=g)
        self.vectors = torch.nn.Parameter(embed_tokens.weight[ids].detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.vectors.unsqueeze(0)  # (1, n, H)


def part_of(param_name: str, family) -> str:
    name = param_name.removeprefix("base_model.model.")
    for part in PARTS:
        if name.startswith(getattr(family.parts, part) + "."):
            return part
    return "other"


def trainable_table(model, family, soft_prompt=None) -> list[tuple[str, int, int]]:
    """(component, trainable params, total params) per component."""
    rows = {p: [0, 0] for p in (*PARTS, "other")}
    for n, p in model.named_parameters():
        row = rows[part_of(n, family)]
        row[1] += p.numel()
        if p.requires_grad:
            row[0] += p.numel()
    out = [(k, v[0], v[1]) for k, v in rows.items() if v[1]]
    if soft_prompt is not None:
        out.append(("soft prompt", soft_prompt.vectors.numel(), soft_prompt.vectors.numel()))
    return out


def save_adapter(peft_model, name: str, out_dir: Path, soft_prompt, meta: dict) -> None:
    with atomic_dir(out_dir, force=True) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[name])
        src = tmp / name if (tmp / name).is_dir() else tmp  # PEFT nests non-default adapter names
        if src != tmp:
            for f in src.iterdir():
                f.rename(tmp / f.name)
            src.rmdir()
        if soft_prompt is not None:
            save_soft_prompt(tmp, soft_prompt.vectors.detach())
        (tmp / "mmagent_adapter.json").write_text(json.dumps(meta, indent=1))


WEIGHTS = "adapter_model.safetensors"


def read_adapter_meta(path: Path) -> dict:
    """The adapter's mmagent_adapter.json, after checking that the files it needs are all there."""
    path = Path(path)
    f = path / "mmagent_adapter.json"
    if not f.exists():
        raise AdapterError(f"`{path}` is not an mmagent adapter (no mmagent_adapter.json); "
                           "point at runs/<run>/adapters/<task>")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"`{f}` is not valid JSON ({e}); {_retrain_hint(path)}") from e
    missing = [k for k in ("task", "base_ref", "base_fingerprint", "parts")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise AdapterError(f"`{f}` lacks {', '.join(missing)}; {_retrain_hint(path)}")
    needed = {WEIGHTS: "its LoRA weights", "adapter_config.json": "its PEFT configuration"}
    if meta.get("soft_prompt_tokens"):
        needed["soft_prompt.safetensors"] = f"its {meta['soft_prompt_tokens']} soft-prompt vectors"
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


def check_base(meta: dict, fingerprint: str, path) -> None:
    if meta["base_fingerprint"] != fingerprint:
        raise AdapterError(f"adapter `{path}` was trained on base {meta['base_ref']} "
                           f"(fingerprint {meta['base_fingerprint']}), not this base ({fingerprint}); "
                           f"load it with base `{meta['base_ref']}`")


def save_soft_prompt(folder: Path, vectors: torch.Tensor) -> None:
    """(n, H) vectors as `soft_prompt.safetensors`, the one layout every backend reads."""
    save_file({"vectors": vectors.reshape(-1, vectors.shape[-1]).contiguous()}, Path(folder) / "soft_prompt.safetensors")


def load_soft_prompt(path: Path) -> torch.Tensor | None:
    f = Path(path) / "soft_prompt.safetensors"
    return load_file(f)["vectors"].unsqueeze(0) if f.exists() else None
