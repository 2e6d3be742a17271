"""The torch backend: the base loaded once, every task adapter loaded into one PeftModel, `set_adapter`
per request; the bridge LoRA switches with the LLM LoRA (one PEFT adapter covers both), and the soft
prompt is picked alongside."""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from mmagent.backends import TextStream, check_fits, check_image
from mmagent.prompt import prompt_parts


def adapter_dirs(paths: list[Path]) -> tuple[list[Path], Path | None]:
    """Adapter folders from run directories / adapter folders, and a plain model dir if one was given."""
    found, model_dir = [], None
    for p in paths:
        if (p / "adapters").is_dir():
            found += sorted(d for d in (p / "adapters").iterdir() if (d / "mmagent_adapter.json").exists())
        elif (p / "mmagent_adapter.json").exists():
            found.append(p)
        elif (p / "config.json").exists():
            model_dir = p
        else:
            raise FileNotFoundError(f"`{p}` is neither a run directory (adapters/), an adapter folder, "
                                    "nor a model directory (config.json)")
    return found, model_dir


def check_unique_names(metas: dict[Path, dict]) -> None:
    """One model holds one adapter per name: two adapters named alike would leave one silently unused."""
    by_name: dict[str, list[Path]] = {}
    for d, meta in metas.items():
        by_name.setdefault(meta["task"], []).append(d)
    clashes = {name: ds for name, ds in by_name.items() if len(ds) > 1}
    if not clashes:
        return
    from mmagent.train.adapters import AdapterError
    lines = []
    for name, ds in clashes.items():
        where = [str(d.parent.parent) if d.parent.name == "adapters" else str(d) for d in ds]
        if len({Path(d).resolve() for d in ds}) < len(ds):
            lines.append(f"adapter `{name}` is given more than once ({', '.join(f'`{d}`' for d in ds)}); "
                         "list each run once")
        else:
            lines.append(f"adapter `{name}` is in {len(ds)} runs: {', '.join(f'`{w}`' for w in where)} "
                         f"({', '.join(f'`{d}`' for d in ds)})")
    raise AdapterError("adapter names must differ, one model holds one adapter per name:\n  " + "\n  ".join(lines)
                       + "\nfix: train one of them again under another adapter name with `run.adapter=NAME` (and a run "
                         "directory of its own), e.g. `mmagent train RECIPE.toml run.name=vqa2 run.adapter=vqa2`, "
                         "then load or export the runs together")


class TorchBackend:
    def __init__(self, paths: list[Path], device: str | None = None):
        from mmagent.agent import AdapterInfo
        from mmagent.train import adapters as ad
        from mmagent.train.base import Base, fingerprint, load, resolve
        from mmagent.train.vlm import VLM
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dirs, model_dir = adapter_dirs(paths)
        metas = {d: ad.read_adapter_meta(d) for d in dirs}
        check_unique_names(metas)
        if model_dir is not None:
            base = Base(str(model_dir), model_dir, fingerprint(model_dir))
        elif metas:
            base = resolve(next(iter(metas.values()))["base_ref"])
        else:
            raise FileNotFoundError(f"no adapters or model found in {', '.join(map(str, paths))}")
        model, tokenizer, processor = load(base)
        self.base = base
        self.base_info = {"ref": base.ref, "fingerprint": base.fingerprint}
        self.adapters, self.soft_prompts, self.instructions, self.adapter_paths = {}, {}, {}, {}
        system = None
        for d, meta in metas.items():
            ad.check_base(meta, base.fingerprint, d)
            name = meta["task"]
            model = self._attach(model, d, name)
            self.soft_prompts[name] = ad.load_soft_prompt(d)
            self.adapter_paths[name] = d
            self.instructions[name] = meta.get("instructions", {})
            self.adapters[name] = AdapterInfo(name, tuple(meta.get("kinds", [])), tuple(meta["parts"]),
                                              meta.get("soft_prompt_tokens", 0))
            system = system or meta.get("system")
        self.vlm = VLM(model.to(self.device).eval(), tokenizer, processor, **({"system": system} if system else {}))

    @property
    def context_length(self) -> int:
        """Positions the LLM was built for (its max_position_embeddings)."""
        return int(self.vlm.family.text_config(self.vlm.base_model).max_position_embeddings)

    def fresh_base(self):
        """Another copy of the base without adapters (exporters need plain modules)."""
        from mmagent.train.base import load
        return load(self.base)[0]

    @staticmethod
    def _attach(model, path: Path, name: str):
        from peft import PeftModel
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, path, adapter_name=name)

    def using_adapter(self, adapter: str | None):
        """A context in which `adapter` (None: the bare base) is the active one."""
        if adapter is None:
            return self.vlm.model.disable_adapter() if self.adapters else nullcontext()
        self.vlm.model.set_adapter(adapter)
        return nullcontext()

    def decode(self, tokens: list[int]) -> str:
        return self.vlm.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate(self, image, question, adapter, kind, history, max_new_tokens, on_text, stop_at_eos=True):
        t0 = time.perf_counter()
        soft = self.soft_prompts.get(adapter) if adapter else None
        soft = soft.to(self.device) if soft is not None else None
        instruction, text = prompt_parts(question, kind, self.instructions.get(adapter, {}))
        n_soft = 0 if soft is None else soft.shape[1]
        prompt = self.vlm.tokenizer(self.vlm.prompt_text(instruction, text, n_soft, history),
                                    add_special_tokens=False).input_ids
        n_ctx = self.context_length
        check_fits(len(prompt), n_ctx)
        max_new_tokens = min(max_new_tokens, n_ctx - len(prompt))  # stop at the context's end, as llama.cpp does
        check_image(image)
        pixels = self.vlm.pixels([image]).to(self.device)
        stream, first = TextStream(self.decode, on_text), []

        def on_token(step, ids):
            if step == 0:
                first.append(time.perf_counter())
            if ids[0] != self.vlm.tokenizer.eos_token_id:
                stream.push(ids[0])

        with self.using_adapter(adapter):
            tokens = self.vlm.generate(pixels, [prompt], max_new_tokens, soft, on_token=on_token,
                                       stop_at_eos=stop_at_eos)[0]
        stream.finish()
        end = time.perf_counter()
        n = max(1, len(tokens) - 1)
        return tokens, {"first_token": first[0] - t0 if first else end - t0,
                        "tokens_per_s": n / max(1e-9, end - (first[0] if first else t0))}
