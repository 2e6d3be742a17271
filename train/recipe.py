"""Recipes: TOML files validated against dataclasses before any work starts.

Every problem is collected into one `RecipeError`, each line naming the file, the key, what was expected
and the fix; an unknown key suggests the nearest valid one. `key=value` overrides from the CLI are
applied to the parsed TOML before validation, so they are checked the same way.
"""
from __future__ import annotations

import difflib
import tomllib
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from mmagent.prompt import DEFAULT_SYSTEM


class RecipeError(ValueError):
    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"recipe {source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


def doc(text: str, default=MISSING, factory=MISSING):
    kw = {"default": default} if factory is MISSING else {"default_factory": factory}
    return field(metadata={"help": text}, **kw)


@dataclass
class RunSection:
    name: str = doc("run name; the run directory is runs/<name> unless output_dir is set", "run")
    output_dir: str = doc("where the run directory goes", "")
    adapter: str = doc("name of the task adapter this run writes (default: the run name)", "")
    seed: int = doc("seed for weights, data order and dropout", 0)


@dataclass
class ModelSection:
    base: str = doc("builtin:tiny | builtin:smol | a local HF directory | a hub id; init:tiny|smol = untrained", "builtin:tiny")
    system: str = doc("system prompt of every conversation", DEFAULT_SYSTEM)


@dataclass
class LoraSection:
    r: int = doc("LoRA rank; higher adapts more and costs more", 8)
    alpha: float = doc("LoRA scale numerator (scale = alpha / r)", 16.0)
    dropout: float = doc("dropout on the LoRA input", 0.05)
    # "preset" stands for the model family's own targets (mmagent.train.families: one source of module names)
    llm: list[str] = doc("LLM module leaf names to adapt; \"preset\" = the family's (LLaMA/OPT: q_proj, v_proj; "
                         "T5: q, v); [] leaves the LLM frozen", factory=lambda: ["preset"])
    bridge: list[str] = doc("Q-Former/projector leaf names to adapt; \"preset\" = the family's (Q-Former: query, "
                            "value; LLaVA projector: linear_1, linear_2); [] leaves it frozen", factory=lambda: ["preset"])
    vision: list[str] = doc("vision tower leaf names to adapt; \"preset\" = the family's (BLIP-2 ViT: qkv; CLIP: "
                            "q_proj, v_proj); [] (default) leaves it frozen", factory=list)


@dataclass
class SoftPromptSection:
    tokens: int = doc("learned prompt vectors before the image; 0 = none", 0)
    lr: float = doc("learning rate of the soft prompt's own optimizer group", 1e-2)


@dataclass
class TaskSection:
    name: str = doc("task name: caption | vqa | your own", "")
    kind: str = doc("caption | vqa | match (image-text matching, yes/no)", "")
    ratio: float = doc("share of training samples drawn from this task (normalised over tasks)", 1.0)
    instruction: str = doc("instruction text; default depends on kind", "")
    jsonl: str = doc("unified instruction JSONL (image_path, instruction, input, output, task) for training", "")
    captions: str = doc("COCO captions JSON (captions_*.json) for training", "")
    questions: str = doc("VQAv2 questions JSON for training", "")
    annotations: str = doc("VQAv2 annotations JSON for training", "")
    images: str = doc("image folder for training files", "")
    eval_captions: str = doc("held-out COCO captions JSON", "")
    eval_questions: str = doc("held-out VQAv2 questions JSON", "")
    eval_annotations: str = doc("held-out VQAv2 annotations JSON", "")
    eval_images: str = doc("held-out image folder", "")
    max_eval: int = doc("held-out examples evaluated per task; 0 = all (a seeded sample spread over every "
                        "held-out image otherwise)", 0)


@dataclass
class DataSection:
    source: str = doc("builtin:shapes generates the task files; 'files' uses each task's paths", "builtin:shapes")
    train_images: int = doc("builtin:shapes training images", 4000)
    eval_images: int = doc("builtin:shapes held-out images (disjoint from training)", 200)
    image_size: int = doc("builtin:shapes image side in pixels", 64)
    world: str = doc("builtin:shapes world: base (3 shapes, 4 colours) | shift (adds 2 colours and a shape the "
                     "base never saw: a domain shift)", "base")
    max_pixels: int = doc("refuse images above this many pixels", 40_000_000)


@dataclass
class TrainSection:
    method: str = doc("lora (adapters on a frozen base) | full (train `parts` fully; writes a base)", "lora")
    parts: list[str] = doc("with method=full: which of vision, bridge, llm train", factory=lambda: ["vision", "bridge", "llm"])
    steps: int = doc("optimizer steps", 300)
    batch_size: int = doc("examples per micro-batch, over all GPUs: each of N processes takes batch_size/N, so a "
                          "recipe trains the same steps on any number of GPUs", 16)
    grad_accum: int = doc("micro-batches per optimizer step", 1)
    lr: float = doc("peak learning rate", 1e-3)
    weight_decay: float = doc("AdamW weight decay", 0.0)
    warmup_steps: int = doc("linear warm-up steps before the cosine decay", 20)
    eval_every: int = doc("validate every N steps (0 = only at the end)", 0)
    checkpoint_every: int = doc("checkpoint every N steps (0 = never)", 100)
    max_new_tokens: int = doc("generation length at evaluation", 24)
    log_every: int = doc("write metrics.jsonl every N steps", 10)
    eval_base: bool = doc("also evaluate the base without the adapter, for the comparison", True)
    baselines: list[str] = doc("baselines trained and reported beside the adapter: llm_only (the same LoRA on the "
                               "LLM alone, no bridge/vision LoRA, no soft prompt)", factory=list)
    loss_vocab: str = doc("full: softmax over the whole vocabulary | targets: over the tokens that occur in the "
                          "training answers (much cheaper for a small LLM with a large vocabulary)", "full")
    precision: str = doc("auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16-mixed (fp32 weights, bf16 autocast) | bf16 "
                         "(frozen weights in bf16, trained ones and the optimizer state in fp32, bf16 autocast) | "
                         "bf16-true (every weight and the optimizer state in bf16: full fine-tuning of a 7B on one "
                         "card, at the cost of update precision)", "auto")
    attention: str = doc("sdpa (fused attention kernels through torch's scaled_dot_product_attention) | eager", "sdpa")
    gradient_checkpointing: bool = doc("recompute activations in the backward pass: less memory, about a third "
                                       "more compute", False)
    compile: bool = doc("torch.compile each LLM decoder layer (regional: compiled once, reused by every layer); "
                        "the first steps pay the compilation", False)
    group_by_length: bool = doc("sort each optimizer step's examples by length before cutting them into "
                                "micro-batches and GPU shares, so short examples are not padded to long ones", True)
    cuda_graphs: bool = doc("replay each micro-batch's forward and backward as one CUDA graph (captured once per "
                            "batch shape; sequences padded to a multiple of 32): the host no longer launches "
                            "thousands of kernels one by one. CUDA and decoder-only LLMs, else ignored; on several processes the "
                            "gradients are averaged after the replays. Not with train.compile", False)
    fused_ops: bool = doc("the LLM's RMSNorm through torch's fused kernel, its rotary embedding and SwiGLU "
                          "compiled into one kernel each (CUDA)", False)
    sharding: str = doc("none (every process holds the whole model: DDP) | fsdp (weights, gradients and optimizer "
                        "state sharded over the processes with torch's FSDP2, one unit per LLM and vision layer: "
                        "for what does not fit one card; checkpoints keep the one-process layout). With one "
                        "process fsdp changes nothing", "none")


@dataclass
class ContrastSection:
    steps: int = doc("BLIP-2's first stage before training: the ViT and Q-Former learn from image-text contrast and "
                     "matching with hard negatives on the caption tasks, no LLM (mmagent.train.contrastive); for "
                     "bases trained from scratch with method=full; 0 = off", 0)
    batch_size: int = doc("image-caption pairs a step (the contrast is against the others of the batch)", 48)
    lr: float = doc("peak learning rate (linear warm-up, then linear decay to 0)", 1e-3)
    warmup_steps: int = doc("linear warm-up steps", 30)


@dataclass
class LogSection:
    tensorboard: bool = doc("also write the run's scalars (loss per task, learning rate, evaluation with its "
                            "controls) as TensorBoard event files in the run directory, as training goes: "
                            "`tensorboard --logdir runs/`; needs `pip install 'mmagent[tensorboard]'`", False)


@dataclass
class Recipe:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    soft_prompt: SoftPromptSection = field(default_factory=SoftPromptSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    contrast: ContrastSection = field(default_factory=ContrastSection)
    log: LogSection = field(default_factory=LogSection)
    tasks: list[TaskSection] = field(default_factory=list)
    source: str = "<recipe>"

    @property
    def adapter_name(self) -> str:
        return self.run.adapter or self.run.name

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.run.name}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d


TASK_KINDS = ("caption", "vqa", "match")
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16", "bf16-true")
SECTION_TYPES = {f.name: f.type for f in fields(Recipe) if f.name != "source"}


def _expected(tp) -> str:
    return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
            "list[str]": "a list of strings"}.get(tp if isinstance(tp, str) else tp.__name__, str(tp))


def _check_value(value, tp: str) -> bool:
    if tp == "bool":
        return isinstance(value, bool)
    if tp == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if tp == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp == "str":
        return isinstance(value, str)
    if tp == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return True


def _build(cls, raw: dict, where: str, problems: list[str]):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean `{where}{near[0]}`?" if near else f"valid keys: {', '.join(known)}"
            problems.append(f"`{where}{key}`: unknown key; {hint}")
            continue
        tp = known[key].type
        if not _check_value(value, tp):
            problems.append(f"`{where}{key}`: expected {_expected(tp)}, got {value!r}; "
                            f"{known[key].metadata.get('help', '')}")
            continue
        kwargs[key] = float(value) if tp == "float" else value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """`train.lr=3e-4` -> (['train', 'lr'], 0.0003); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise RecipeError("overrides", [f"`{text}`: expected key=value, e.g. train.steps=100"])
    key, value = text.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str], problems: list[str] | None = None) -> dict:
    """Set each `key=value` in the parsed TOML. One that cannot be set (an index past the [[tasks]], a value
    used as a table) is a problem: added to `problems` when given, to be reported with the recipe's others;
    else raised as a RecipeError."""
    found: list[str] = [] if problems is None else problems
    for text in overrides:
        try:
            path, value = parse_override(text)
        except RecipeError as e:
            found += e.problems
            continue
        problem = _set_key(raw, path, value)
        if problem:
            found.append(f"`{text}`: {problem}")
    if problems is None and found:
        raise RecipeError("overrides", found)
    return raw


def _set_key(raw: dict, path: list[str], value) -> str | None:
    """Set raw[path] = value; a description of why it cannot be set, or None."""
    node, where = raw, ""
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit():
                return f"`{where}` is a list: index it with a number, e.g. `{where}.0`"
            if int(part) >= len(node):
                return (f"`{where}` has {len(node)} entr{'y' if len(node) == 1 else 'ies'}, so there is no "
                        f"`{where}.{part}` (indices start at 0); add a [[{where}]] table to the recipe for another")
            if last:
                node[int(part)] = value
                return None
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return None
            node = node.setdefault(part, {})
        else:
            return (f"`{where}` is a value ({node!r}), not a table, so it has no key `{part}`; "
                    f"set it with `{where}=<value>`")
        where = f"{where}.{part}" if where else part
    return None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in (Path(__file__).parents[1] / "recipes").glob("*.toml")) \
            if (Path(__file__).parents[1] / "recipes").is_dir() else []
        raise RecipeError(str(path), [f"file not found; shipped recipes: {', '.join(shipped) or 'see recipes/'}"])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RecipeError(str(path), [f"not UTF-8 text: byte 0x{data[e.start]:02x} at line {line} ({e.reason}); "
                                      "save the file as UTF-8"]) from e
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(str(path), [f"not valid TOML: {e}; fix the syntax at that line"]) from e
    problems: list[str] = []
    raw = apply_overrides(raw, list(overrides), problems)
    return recipe_from_dict(raw, str(path), problems)


def recipe_from_dict(raw: dict, source: str = "<recipe>", problems: list[str] | None = None) -> Recipe:
    """Validate a parsed recipe; `problems` already found (e.g. by apply_overrides) are reported with the rest."""
    problems = list(problems or [])
    sections = {}
    for key, value in raw.items():
        if key not in SECTION_TYPES:
            near = difflib.get_close_matches(key, SECTION_TYPES, n=1)
            problems.append(f"`{key}`: unknown section; " + (f"did you mean `[{near[0]}]`?" if near else
                                                            f"sections: {', '.join(SECTION_TYPES)}"))
        elif key == "tasks":
            if not isinstance(value, list):
                problems.append("`tasks`: expected [[tasks]] tables")
                continue
            bad = [i for i, t in enumerate(value) if not isinstance(t, dict)]
            if bad:
                problems.append(f"`tasks[{bad[0]}]`: expected a [[tasks]] table, got {value[bad[0]]!r}")
                continue
            sections["tasks"] = [_build(TaskSection, t, f"tasks[{i}].", problems) for i, t in enumerate(value)]
        elif not isinstance(value, dict):
            problems.append(f"`{key}`: expected a [{key}] table, got {value!r}")
        else:
            cls = typing.get_type_hints(Recipe)[key]
            sections[key] = _build(cls, value, f"{key}.", problems)
    recipe = Recipe(**sections, source=source)
    problems += semantic_problems(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def _help(cls, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def semantic_problems(r: Recipe) -> list[str]:
    p = []
    t = r.train
    for name in ("steps", "batch_size", "grad_accum", "log_every", "max_new_tokens"):
        if getattr(t, name) < 1:
            p.append(f"`train.{name}`: expected at least 1, got {getattr(t, name)}")
    for name in ("eval_every", "warmup_steps", "checkpoint_every"):
        if getattr(t, name) < 0:
            p.append(f"`train.{name}`: expected 0 or more, got {getattr(t, name)}; "
                     f"{_help(TrainSection, name)}")
    for name in ("max_pixels", "train_images", "eval_images", "image_size"):
        if getattr(r.data, name) < 1:
            p.append(f"`data.{name}`: expected at least 1, got {getattr(r.data, name)}; {_help(DataSection, name)}")
    if t.lr <= 0:
        p.append(f"`train.lr`: expected a positive learning rate, got {t.lr}; try 1e-3 for LoRA")
    for b in t.baselines:
        if b != "llm_only":
            p.append(f"`train.baselines`: unknown baseline {b!r}; baselines: llm_only")
    if t.loss_vocab not in ("full", "targets"):
        p.append(f"`train.loss_vocab`: expected full or targets, got {t.loss_vocab!r}")
    if t.precision not in PRECISIONS:
        p.append(f"`train.precision`: expected one of {', '.join(PRECISIONS)}, got {t.precision!r}; "
                 "bf16 suits LoRA on a GPU, fp32 a CPU")
    if t.attention not in ("sdpa", "eager"):
        p.append(f"`train.attention`: expected sdpa or eager, got {t.attention!r}")
    if t.sharding not in ("none", "fsdp"):
        p.append(f"`train.sharding`: expected none or fsdp, got {t.sharding!r}")
    if t.sharding == "fsdp" and t.cuda_graphs:
        p.append("`train.sharding`: fsdp cannot run with train.cuda_graphs = true (a captured backward cannot run "
                 "FSDP's per-layer all-gathers and reduce-scatters; graphs on several processes average whole "
                 "gradients by hand): set train.cuda_graphs = false, or train.sharding = \"none\" if the model "
                 "fits one card")
    if t.compile and t.cuda_graphs:
        p.append("`train.compile`: cannot run with train.cuda_graphs = true (compiled dropout draws random offsets "
                 "that our graph capture does not record: 'Offset increment outside graph capture' on an H200); "
                 "set one of them false (cuda_graphs with train.fused_ops is the faster pair, docs/BENCHMARKS.md)")
    if t.method not in ("lora", "full"):
        p.append(f"`train.method`: expected lora or full, got {t.method!r}")
    for part in t.parts:
        if part not in ("vision", "bridge", "llm"):
            p.append(f"`train.parts`: unknown part {part!r}; parts: vision, bridge, llm")
    c = r.contrast
    for name in ("steps", "warmup_steps"):
        if getattr(c, name) < 0:
            p.append(f"`contrast.{name}`: expected 0 or more, got {getattr(c, name)}")
    if c.batch_size < 2:
        p.append(f"`contrast.batch_size`: expected at least 2 (each pair is contrasted with the others), got {c.batch_size}")
    if c.lr <= 0:
        p.append(f"`contrast.lr`: expected a positive learning rate, got {c.lr}; try 1e-3")
    if c.steps and not (t.method == "full" and {"vision", "bridge"} <= set(t.parts)):
        p.append("`contrast.steps`: the contrastive stage trains the ViT and Q-Former fully; it needs "
                 "train.method = \"full\" with \"vision\" and \"bridge\" in train.parts, or contrast.steps = 0")
    if c.steps and not any(task.kind == "caption" for task in r.tasks):
        p.append("`contrast.steps`: the contrastive stage learns from captions; add a [[tasks]] of kind caption "
                 "or set contrast.steps = 0")
    if t.method == "lora" and not (r.lora.llm or r.lora.bridge or r.lora.vision or r.soft_prompt.tokens):
        p.append("`lora`: llm, bridge and vision are all empty and there is no soft prompt: nothing would train")
    if r.lora.r < 1:
        p.append(f"`lora.r`: expected a rank of at least 1, got {r.lora.r}")
    if not 0 <= r.lora.dropout < 1:
        p.append(f"`lora.dropout`: expected 0 <= dropout < 1, got {r.lora.dropout}")
    if r.soft_prompt.tokens < 0:
        p.append(f"`soft_prompt.tokens`: expected 0 or more, got {r.soft_prompt.tokens}")
    if not r.tasks:
        p.append("`tasks`: no [[tasks]] table; add one with name and kind (caption or vqa)")
    names = [task.name for task in r.tasks]
    for i, task in enumerate(r.tasks):
        if task.kind not in TASK_KINDS:
            p.append(f"`tasks[{i}].kind`: expected one of {', '.join(TASK_KINDS)}, got {task.kind!r}")
        if not task.name:
            p.append(f"`tasks[{i}].name`: missing; name the task (e.g. {task.kind or 'vqa'})")
        if task.ratio <= 0:
            p.append(f"`tasks[{i}].ratio`: expected a positive share, got {task.ratio}")
        if task.max_eval < 0:
            p.append(f"`tasks[{i}].max_eval`: expected 0 (all) or more, got {task.max_eval}")
        if r.data.source == "files" and not (task.jsonl or task.captions or task.questions):
            p.append(f"`tasks[{i}]`: data.source is 'files' but the task names no jsonl, captions or questions file")
    if len(set(names)) != len(names):
        p.append(f"`tasks`: task names must be unique, got {names}")
    if r.data.world not in ("base", "shift"):
        p.append(f"`data.world`: expected base or shift, got {r.data.world!r}")
    if r.data.source not in ("builtin:shapes", "files"):
        p.append(f"`data.source`: expected builtin:shapes or files, got {r.data.source!r}")
    return p
