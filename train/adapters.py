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
from safetensors.torch import save_file

from mmagent.adapters import META, SOFT_PROMPT, AdapterError, model_name
from mmagent.files import atomic_dir

PARTS = ("vision", "bridge", "llm")


# Reading an adapter back is the SDK's (mmagent.adapters.read_adapter): one record for every stage.


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
    name = model_name(param_name)
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


def save_adapter(peft_model, name: str, out_dir: Path, soft_prompt, meta: dict,
                 state_dict: dict | None = None) -> None:
    """`state_dict`: whole tensors by parameter name (`soft_prompt.vectors` for the soft prompt) when the
    model's own are sharded (FSDP: Ranks.full_model_state); else the model's are read."""
    with atomic_dir(out_dir, force=True) as tmp:
        whole = {} if state_dict is None else {"state_dict": state_dict}
        peft_model.save_pretrained(tmp, selected_adapters=[name], **whole)
        src = tmp / name if (tmp / name).is_dir() else tmp  # PEFT nests non-default adapter names
        if src != tmp:
            for f in src.iterdir():
                f.rename(tmp / f.name)
            src.rmdir()
        if soft_prompt is not None:
            vectors = soft_prompt.vectors.detach() if state_dict is None else state_dict["soft_prompt.vectors"]
            save_soft_prompt(tmp, vectors)
        (tmp / META).write_text(json.dumps(meta, indent=1))


def save_soft_prompt(folder: Path, vectors: torch.Tensor) -> None:
    """(n, H) vectors as `soft_prompt.safetensors`, the one layout every backend reads."""
    save_file({"vectors": vectors.reshape(-1, vectors.shape[-1]).contiguous()}, Path(folder) / SOFT_PROMPT)
