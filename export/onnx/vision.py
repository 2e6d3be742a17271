"""A family's image path (vision tower -> bridge -> projection) as one ONNX graph serving every task adapter.

The family says which modules form the image path, its image size and whether the bridge reads the
instruction (InstructBLIP: the graph then takes the instruction's Q-Former token ids and mask as inputs).

LoRA on the targeted Linears is computed in-graph as `base(x) + (x @ A.T) @ B.T`. A [r, in] and B [out, r]
of module `<name>` are graph inputs named `lora.<name>.A` / `lora.<name>.B` (full module names, dots kept),
each backed by a zero initializer of the same name, so a plain run is the base model. A task is an
onnxruntime adapter file (see `write_adapter`) holding those tensors with the LoRA scale alpha/r folded
into B; activating it through RunOptions overrides the zeros for that run only.
"""
from __future__ import annotations

import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from mmagent.backends.onnx_vision import INPUT, INSTRUCTION_INPUTS, OUTPUT
from mmagent.files import atomic_path, durable_replace

LORA_PREFIX = "lora."

_PROTO_LIMIT = 2**31 - 1  # protobuf can't serialise more: bigger graphs (ViT-g in fp32) keep weights in <name>.data
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def lora_input_names(module_name: str) -> tuple[str, str]:
    return f"{LORA_PREFIX}{module_name}.A", f"{LORA_PREFIX}{module_name}.B"


def _save(model: onnx.ModelProto, path) -> None:
    """Staged in a temp dir under the final names, then moved in: weights file first, the graph naming it last."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        onnx.save(model, staged, save_as_external_data=model.ByteSize() > _PROTO_LIMIT, location=f"{path.name}.data")
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f == staged):
            durable_replace(f, path.parent / f.name)


# ---- export -------------------------------------------------------------------------------------------

class _LoraLinear(nn.Module):
    """The base Linear plus a LoRA branch whose A/B are buffers, swapped for graph inputs at export."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.register_buffer("A", torch.zeros(rank, base.in_features), persistent=False)
        self.register_buffer("B", torch.zeros(base.out_features, rank), persistent=False)

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T


class _ImagePath(nn.Module):
    def __init__(self, model):
        from mmagent.train.families import family_for
        super().__init__()
        self.model, self.family = model, family_for(model)

    def forward(self, pixel_values, *instruction):
        return self.family.image_features(self.model, pixel_values, instruction or None)


class _Exportable(nn.Module):
    """functional_call puts the LoRA inputs in place of the buffers, so they stay inputs in the trace."""

    def __init__(self, model, lora_modules: list[str]):
        super().__init__()
        self.image_path = _ImagePath(model)
        self.buffer_names = [f"model.{m}.{ab}" for m in lora_modules for ab in "AB"]

    def forward(self, pixel_values, lora: list[torch.Tensor], *instruction):
        return torch.func.functional_call(self.image_path, dict(zip(self.buffer_names, lora)),
                                          (pixel_values, *instruction))


def _image_path_prefixes(model) -> tuple[str, ...]:
    from mmagent.train.families import family_for
    return family_for(model).parts.image_path


def _image_path_modules(model) -> dict[str, nn.Module]:
    prefixes = _image_path_prefixes(model)
    return {n: m for n, m in model.named_modules() if any(n == p or n.startswith(p + ".") for p in prefixes)}


def resolve_targets(model, lora_targets: list[str]) -> list[str]:
    """Module names of the image path fully matching any pattern (a plain module name matches itself)."""
    modules = _image_path_modules(model)
    chosen = []
    for pattern in lora_targets:
        hits = [n for n, m in modules.items() if re.fullmatch(pattern, n) and isinstance(m, nn.Linear)]
        if not hits:
            raise ValueError(f"LoRA target `{pattern}` matches no nn.Linear of the image path "
                             f"({', '.join(_image_path_prefixes(model))})")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _check_exportable(model) -> None:
    for name, module in _image_path_modules(model).items():
        if type(module).__module__.startswith("peft."):
            raise ValueError(f"`{name}` is a PEFT layer: export the base model; adapters go through write_adapter")
        for pname, p in module.named_parameters(recurse=False):
            if p.dtype != torch.float32:
                raise ValueError(f"`{name}.{pname}` is {p.dtype}: load the base in float32 for export "
                                 "(optimize() makes the fp16 variant)")


@contextmanager
def _with_lora(model, names: list[str], rank: int):
    """Temporarily swap the named Linears for _LoraLinear; eval mode; the model is restored afterwards."""
    originals = {n: model.get_submodule(n) for n in names}
    was_training = model.training
    try:
        for n, linear in originals.items():
            _set_submodule(model, n, _LoraLinear(linear, rank))
        model.eval()
        yield
    finally:
        for n, linear in originals.items():
            _set_submodule(model, n, linear)
        model.train(was_training)


def _set_submodule(model, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _instruction_example(model) -> tuple[torch.Tensor, ...]:
    """Example Q-Former token ids and mask for families whose bridge reads the instruction, else ()."""
    from mmagent.train.families import family_for
    if not family_for(model).reads_instruction:
        return ()
    ids = torch.ones(2, 5, dtype=torch.long)  # length 5 and batch 2: neither may be specialised on
    return ids, torch.ones_like(ids)


def export_vision(model, path, lora_rank: int | None, lora_targets: list[str], opset: int = 18) -> list[str]:
    """Write the image path of a float32 model of any family (mmagent.train.families) to `path`.

    pixel_values float32 (batch, 3, H, W) [+ qformer_input_ids, qformer_attention_mask int64 (batch, tokens)
    for a bridge that reads the instruction] -> image_embeds (batch, n_image_tokens, llm_hidden). With
    `lora_rank`, every Linear matched by `lora_targets` gets LoRA inputs of that rank. Returns the LoRA
    module names.
    """
    from mmagent.train.families import family_for
    _check_exportable(model)
    names = resolve_targets(model, lora_targets) if lora_rank else []
    size = family_for(model).image_size(model)
    pixels = torch.zeros(2, 3, size, size)  # batch 2 so the trace can't specialise on batch 1
    instruction = _instruction_example(model)
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("instruction_tokens")
    with _with_lora(model, names, lora_rank or 0), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dynamic axes will not be renamed")  # _name_batch_axis does
        wrapper = _Exportable(model, names).eval()
        buffers = dict(wrapper.image_path.named_buffers())
        lora = [torch.zeros_like(buffers[b]) for b in wrapper.buffer_names]
        program = torch.onnx.export(
            wrapper, (pixels, lora, *instruction), None, dynamo=True, opset_version=opset, verbose=False,
            input_names=[INPUT, *(i for n in names for i in lora_input_names(n)),
                         *INSTRUCTION_INPUTS[:len(instruction)]], output_names=[OUTPUT],
            dynamic_shapes=({0: batch}, [None] * len(lora),  # torch.export packs *instruction into one tuple
                            *([({0: batch, 1: tokens},) * len(instruction)] if instruction else [])),
            external_data=False)
    graph = program.model_proto
    _name_batch_axis(graph)
    _default_lora_to_zero(graph)
    _save(graph, path)
    return names


def _name_batch_axis(model: onnx.ModelProto) -> None:
    """The exporter names the batch dim `s<N>` when inputs are nested; call it `batch` for readers."""
    symbol = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        raise RuntimeError("the exporter fixed the batch size; the graph would serve only batch 2")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


def _default_lora_to_zero(model: onnx.ModelProto) -> None:
    """An initializer named like a graph input is its overridable default: zeros = the base model."""
    for value in model.graph.input:
        if value.name.startswith(LORA_PREFIX):
            shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(shape, np.float32), value.name))


def lora_inputs(onnx_path) -> dict[str, tuple[int, ...]]:
    """The graph's LoRA inputs and their shapes."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
            for v in graph.input if v.name.startswith(LORA_PREFIX)}


# ---- adapters -----------------------------------------------------------------------------------------

def _as_numpy(t) -> np.ndarray:
    return t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)


def _pairs(state_dict: dict) -> dict[str, dict[str, np.ndarray]]:
    """{module: {"A": .., "B": ..}} from PEFT keys; anything else is refused rather than dropped."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in state_dict.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise ValueError(f"`{key}` is not a LoRA A/B weight (PEFT `...lora_A.weight` / `...lora_B.weight`); "
                             "the ONNX graph has nowhere to put it")
        pairs.setdefault(match["module"], {})[match["ab"]] = _as_numpy(tensor)
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA of `{module}` has only lora_{''.join(ab)}; both A and B are needed")
    return pairs


def _fit(module: str, a: np.ndarray, b: np.ndarray, rank: int, scale: float, shapes: dict) -> dict[str, np.ndarray]:
    """Scale folded into B; a smaller rank is zero-padded to the graph's (the extra terms add 0)."""
    name_a, name_b = lora_input_names(module)
    if name_a not in shapes:
        known = sorted(n[len(LORA_PREFIX):-2] for n in shapes if n.endswith(".A"))
        raise ValueError(f"adapter has LoRA on `{module}`, which the ONNX graph has no input for; "
                         f"re-export with it among lora_targets (graph LoRA modules: {', '.join(known) or 'none'})")
    graph_rank, n_in = shapes[name_a]
    n_out = shapes[name_b][0]
    if a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(f"LoRA of `{module}` has rank {a.shape[0]}, but rank={rank} was given")
    if rank > graph_rank:
        raise ValueError(f"LoRA of `{module}` has rank {rank} > the graph's {graph_rank}; re-export with "
                         f"lora_rank >= {rank}")
    if a.shape[1] != n_in or b.shape[0] != n_out:
        raise ValueError(f"LoRA of `{module}` is {b.shape[0]}x{a.shape[1]}, the graph's Linear is {n_out}x{n_in}")
    pad = graph_rank - rank
    return {name_a: np.pad(a, ((0, pad), (0, 0))),
            name_b: np.pad(b * np.float32(scale), ((0, 0), (0, pad)))}


def write_adapter(peft_state_dict_for_bridge: dict, alpha: float, rank: int, path, *, onnx_path) -> list[str]:
    """Write an onnxruntime adapter file for the graph at `onnx_path` from PEFT LoRA tensors.

    Keys as PEFT saves them (`base_model.model.<module>.lora_A.weight` [r, in], `...lora_B.weight` [out, r]),
    image-path modules only. Scale alpha/rank (plain LoRA, not rsLoRA) is folded into B. Returns the
    adapted module names.
    """
    shapes = lora_inputs(onnx_path)
    params = {}
    pairs = _pairs(peft_state_dict_for_bridge)
    for module, ab in pairs.items():
        params |= _fit(module, ab["A"], ab["B"], rank, alpha / rank, shapes)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)  # onnxruntime does not check either; the names and shapes are what bind
    adapter.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for n, v in params.items()})
    with atomic_path(path) as tmp:
        adapter.export_adapter(str(tmp))
    return sorted(pairs)


# ---- optimisation -------------------------------------------------------------------------------------

def optimize(path_in, path_out, fp16_path=None, model_type: str = "bert") -> dict[str, int]:
    """Fuse with onnxruntime's transformer optimizer (CPU-safe) and optionally write an fp16 variant for CUDA.

    The fp16 variant keeps float32 inputs/outputs (LoRA inputs included), so the same pixel_values and
    adapter files serve both. Returns the non-zero fused-operator counts. Raises if a LoRA input was lost.
    On BLIP-2, 'bert' and 'vit' (one optimizer class) fuse the same: LayerNorm, SkipLayerNorm, BiasGelu;
    attention does not fuse (the ViT's packed qkv, the Q-Former's masks and LoRA adds break the patterns).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    model = onnx.load(str(path_in))
    lora = _drop_lora_defaults(model)  # the optimizer folds transposes into initializers it sees; hide them
    with tempfile.TemporaryDirectory() as tmp:  # it takes a path: from a ModelProto it trips on external data
        _save(model, f"{tmp}/plain.onnx")
        optimized = optimize_model(f"{tmp}/plain.onnx", model_type=model_type, num_heads=0, hidden_size=0)
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    _save_with_lora_defaults(optimized.model, lora, path_out)
    if fp16_path is not None:
        optimized.convert_float_to_float16(keep_io_types=True)
        _save_with_lora_defaults(optimized.model, lora, fp16_path)
    return fused


def _drop_lora_defaults(model: onnx.ModelProto) -> list[str]:
    kept = [t for t in model.graph.initializer if not t.name.startswith(LORA_PREFIX)]
    dropped = [t.name for t in model.graph.initializer if t.name.startswith(LORA_PREFIX)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return dropped


def _save_with_lora_defaults(model: onnx.ModelProto, lora: list[str], path) -> None:
    lost = sorted(set(lora) - {v.name for v in model.graph.input})
    if lost:
        raise RuntimeError(f"optimisation lost {len(lost)} LoRA inputs (e.g. `{lost[0]}`); adapters could not bind")
    out = onnx.ModelProto()
    out.CopyFrom(model)  # the caller's model stays default-free for further passes
    _default_lora_to_zero(out)
    _save(out, path)
