"""The torch backend: the base loaded once, every task adapter loaded into one PeftModel, `set_adapter`
per request; the bridge LoRA switches with the LLM LoRA (one PEFT adapter covers both), and the soft
prompt is picked alongside."""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from mmagent.prompt import user_text  # what InstructBLIP's Q-Former reads
from mmagent.adapters import Adapter, check_unique, read_adapter
from mmagent.artifacts import ADAPTER, MODEL, RUN, kind_of, run_adapter_dirs, what_to_give
from mmagent.backends import Sampling, TextStream, check_fits, check_image, finish_reason
from mmagent.prompt import chat_prompt, prompt_parts


def adapter_dirs(paths: list[Path]) -> tuple[list[Path], Path | None]:
    """Adapter folders from run directories / adapter folders, and a plain model dir if one was given."""
    found, model_dir = [], None
    for p in paths:
        kind = kind_of(p)
        if kind == RUN:
            found += run_adapter_dirs(p)
        elif kind == ADAPTER:
            found.append(p)
        elif kind == MODEL:
            model_dir = p
        else:
            raise FileNotFoundError(what_to_give(p) + ("; a bundle loads with the edge backend" if kind else ""))
    return found, model_dir


def attach(model, adapter: Adapter):
    """`model` with `adapter` added from its record (a PeftModel is made for the first): no file is read
    again. PEFT's own `from_pretrained` would load the same weights from the adapter folder."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    config = PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**adapter.lora.config))
    config.inference_mode = True
    if isinstance(model, PeftModel):
        model.add_adapter(adapter.name, config)
    else:
        model = PeftModel(model, config, adapter_name=adapter.name)
    result = set_peft_model_state_dict(model, dict(adapter.lora.weights), adapter_name=adapter.name)
    if result.unexpected_keys:
        from mmagent.adapters import AdapterError
        raise AdapterError(f"adapter `{adapter.path}` holds {len(result.unexpected_keys)} weights this base has no "
                           f"place for (e.g. `{result.unexpected_keys[0]}`); it belongs to another base")
    return model


def torch_placement(device: str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype): None picks CUDA when torch sees it; on CUDA bf16 unless `dtype` says otherwise.
    device="cuda" without a CUDA torch is an error, never a quiet run on the CPU."""
    from mmagent.device import DeviceError, is_cuda, parse_device
    name = parse_device(device, default="cuda" if torch.cuda.is_available() else "cpu")
    if is_cuda(name) and not torch.cuda.is_available():
        build = f"a CPU-only build, {torch.__version__}" if torch.version.cuda is None else \
            f"built for CUDA {torch.version.cuda}, but it sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        raise DeviceError(f"device='cuda' for the torch backend: this torch is {build}; install a CUDA build "
                          "of PyTorch to run it on the GPU")
    where = torch.device(name)
    return where, dtype or (torch.bfloat16 if where.type == "cuda" else torch.float32)


class TorchBackend:
    def __init__(self, paths: list[Path], device: str | None = None, dtype: torch.dtype | None = None,
                 cuda_graphs: bool = True):
        from mmagent.train.base import Base, fingerprint, load, resolve
        from mmagent.train.vlm import VLM
        self.device, self.dtype = torch_placement(device, dtype)
        dirs, model_dir = adapter_dirs(paths)
        records = [read_adapter(d, framework="pt") for d in dirs]  # each adapter read once, here
        check_unique(records)
        if model_dir is not None:
            base = Base(str(model_dir), model_dir, fingerprint(model_dir))
        elif records:
            base = resolve(records[0].base_ref)
        else:
            raise FileNotFoundError(f"no adapters or model found in {', '.join(map(str, paths))}")
        model, tokenizer, processor = load(base)
        self.base = base
        self.base_info = {"ref": base.ref, "fingerprint": base.fingerprint}
        self.adapters: dict[str, Adapter] = {}
        for record in records:
            record.check_base(base.fingerprint)
            model = attach(model, record)
            self.adapters[record.name] = record
        self.vlm = VLM(model.to(self.device, self.dtype).eval(), tokenizer, processor)
        if self.device.type == "cuda" and cuda_graphs:  # batch-1 greedy decoding as CUDA graph replays
            from mmagent.train.graph_decode import GraphDecoder
            self.vlm.graph_decoder = GraphDecoder(self.vlm)
        self.default_system = self.vlm.system

    @property
    def context_length(self) -> int:
        """Positions the LLM was built for (its max_position_embeddings)."""
        return self.vlm.family.context_length(self.vlm.base_model)

    def fresh_base(self):
        """Another copy of the base without adapters (exporters need plain modules)."""
        from mmagent.train.base import load
        return load(self.base)[0]


    def using_adapter(self, adapter: str | None):
        """A context in which `adapter` (None: the bare base) is the active one."""
        from peft import PeftModel
        if not isinstance(self.vlm.model, PeftModel):  # no LoRA layers: a plain base, or a merged model
            return nullcontext()
        if adapter is None:
            return self.vlm.model.disable_adapter()
        self.vlm.model.set_adapter(adapter)
        return nullcontext()

    def decode(self, tokens: list[int]) -> str:
        return self.vlm.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    lanes = 1  # one PeftModel whose active adapter is global: one generation at a time

    def available_adapters(self) -> list[str]:
        """Adapters this backend can load: the ones it was given (an unloaded one loads again)."""
        return [*self.adapters, *self._shelf()]

    def _shelf(self) -> dict:
        return self.__dict__.setdefault("_unloaded", {})  # name -> record of an unloaded adapter

    def load_adapter(self, name: str) -> None:
        """Load adapter `name` again, from the record read when this backend started."""
        if name not in self._shelf():
            raise KeyError(f"no unloaded adapter `{name}` among the runs this model was loaded from: "
                           f"{', '.join(self.available_adapters()) or 'none'}")
        record = self._shelf().pop(name)
        self.vlm.model = attach(self.vlm.model, record).eval()  # a new PeftModel if the last one was unloaded
        self.adapters[name] = record
        self._forget_graphs()

    def unload_adapter(self, name: str) -> None:
        """Remove adapter `name` from the PeftModel (PEFT's delete_adapter); `load_adapter` brings it back.
        The last one goes with its PeftModel: one without adapters has no active config and cannot run."""
        self._shelf()[name] = self.adapters.pop(name)
        if self.adapters:
            self.vlm.model.delete_adapter(name)
        else:
            self.vlm.model = self.vlm.model.unload()  # the base's own modules, LoRA layers removed, nothing merged
        self._forget_graphs()

    def _forget_graphs(self) -> None:
        """CUDA graphs captured with the old LoRA layers (keyed by weight addresses, which a new adapter may
        reuse) are dropped; they are captured again on first use."""
        if getattr(self.vlm, "graph_decoder", None) is not None:
            self.vlm.graph_decoder.clear()

    @staticmethod
    def _chooser(sampling: Sampling):
        pick = sampling.chooser()
        if pick is None:
            return None
        return lambda logits: torch.tensor([pick(row.float().cpu().numpy()) for row in logits], device=logits.device)

    def prompt_text(self, record: Adapter | None, instruction: str, text: str, n_soft: int = 0, history=()) -> str:
        """The prompt with the adapter's own system prompt (each adapter was trained with its own)."""
        system = (record.system if record is not None else None) or self.default_system
        return chat_prompt(self.vlm.tokenizer, system, self.vlm.placeholder(n_soft), instruction, text, history)

    @torch.no_grad()
    def generate(self, image, question, adapter, kind, history, max_new_tokens, on_text, stop_at_eos=True,
                 sampling: Sampling | None = None, lane: int = 0, cancel=None):
        sampling = sampling or Sampling()
        t0 = time.perf_counter()
        record = self.adapters.get(adapter) if adapter else None
        soft = record.soft_prompt[None].to(self.device) if record is not None and record.soft_prompt is not None \
            else None
        instruction, text = prompt_parts(question, kind, record.instructions if record else {})
        n_soft = 0 if soft is None else soft.shape[1]
        prompt = self.vlm.prompt_ids(self.prompt_text(record, instruction, text, n_soft, history))
        n_ctx = self.context_length
        check_fits(len(prompt), n_ctx)
        max_new_tokens = min(max_new_tokens, n_ctx - len(prompt))  # stop at the context's end, as llama.cpp does
        check_image(image)
        pixels = self.vlm.pixels([image]).to(self.device, self.dtype)
        stream, first = TextStream(self.decode, on_text, sampling.stop, cancel), []

        def on_token(step, ids):
            if step == 0:
                first.append(time.perf_counter())
            return ids[0] != self.vlm.tokenizer.eos_token_id and stream.push(ids[0])

        with self.using_adapter(adapter):
            tokens = self.vlm.generate(pixels, [prompt], max_new_tokens, soft, on_token=on_token,
                                       stop_at_eos=stop_at_eos, choose=self._chooser(sampling),
                                       instruction=self.vlm.instruction_inputs([user_text(instruction, text)],
                                                                               self.device))[0]
        stream.finish()
        end = time.perf_counter()
        n = max(1, len(tokens) - 1)
        info = {"first_token": first[0] - t0 if first else end - t0,
                "tokens_per_s": n / max(1e-9, end - (first[0] if first else t0)), "prompt_tokens": len(prompt),
                "finish_reason": finish_reason(stream, len(tokens), max_new_tokens)}
        return tokens, info | ({"text": stream.text} if stream.stopped else {})
