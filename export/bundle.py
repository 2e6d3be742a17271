"""`mmagent export`: runs -> one edge bundle that carries every adapted part, and proves it.

The LLM goes to GGUF (f16, then llama.cpp's own quantiser), each task's LLM LoRA to a GGUF adapter; the
vision tower + Q-Former + projection to one ONNX graph whose LoRA is exposed as inputs, each task's
bridge (and vision) LoRA to an onnxruntime adapter file; soft prompts as safetensors. Nothing adapted is
left behind: a part that the chosen formats cannot carry is an error, not a silent drop. The bundle
appears in one rename after the self-check passes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from mmagent.adapters import lora_modules, model_name
from mmagent.artifacts import BUNDLE, BUNDLE_ADAPTER_FILES, MANIFEST, RUN, kind_of
from mmagent.bundle import SCHEMA
from mmagent.files import atomic_dir, atomic_write_json, sha256_file
from mmagent.train.card import write_bundle_card

QUANTS = ("f16", "q8_0", "q4_k_m")
QFORMER_TOKENIZER = "qformer_tokenizer"  # InstructBLIP's, in the bundle as in its checkpoint


class ExportError(ValueError):
    pass


def split_parts(lora, family) -> tuple[dict, dict]:
    """(LLM LoRA tensors, image-path LoRA tensors: vision tower, bridge, projection) of one adapter's record."""
    llm_part = lora.under(family.parts.llm)
    return llm_part, {k: v for k, v in lora.weights.items() if k not in llm_part}


def check_carried(backend, lora: dict, gguf: bool, onnx: bool, merged: bool) -> None:
    """Refuse an export that would lose an adapted part."""
    problems = []
    for name, info in backend.adapters.items():
        llm_part, image_part = lora[name]
        if llm_part and not (gguf or merged):
            problems.append(f"adapter `{name}` adapts the LLM: add --gguf (or --merged)")
        if image_part and not (onnx or merged):
            problems.append(f"adapter `{name}` adapts {', '.join(p for p in info.parts if p != 'llm')}: "
                            "add --onnx (or --merged) so it is carried")
    if problems:
        raise ExportError("nothing adapted may be dropped:\n  " + "\n  ".join(problems))


def export_bundle(runs: list[Path], out: Path, gguf: bool = True, onnx: bool = True, quants=("f16",),
                  merged: bool = False, force: bool = False, console=None) -> dict:
    from mmagent.backends.torch import TorchBackend
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"`{out}` already exists; pass --force to replace it")
    for q in quants:
        if q not in QUANTS:
            raise ExportError(f"unknown quantisation `{q}`; choose from {', '.join(QUANTS)}")
    say = console.print if console else (lambda *a, **k: None)
    start = time.perf_counter()
    backend = TorchBackend(runs, device="cpu")
    # adapter name -> (LLM LoRA tensors, image-path LoRA tensors), from the records the backend read once
    lora = {n: split_parts(a.lora, backend.vlm.family) for n, a in backend.adapters.items()}
    check_carried(backend, lora, gguf, onnx, merged)
    if gguf:  # refused before any work: an LLM llama.cpp cannot run (OPT, T5)
        from mmagent.export.gguf.writer import check_llama_cpp_support, check_tokenizer
        check_llama_cpp_support(backend.vlm.family.text_config(backend.vlm.base_model))
        check_tokenizer(backend.vlm.tokenizer)  # one the writer cannot write, or a missing tokenizer.model
    manifest = {"schema": SCHEMA, "family": backend.vlm.family.name, "base": backend.base_info,
                "prompt": prompt_info(backend), "llm": {}, "vision": {}, "adapters": {}}
    # One plain copy of the base (no LoRA layers) serves both writers; neither changes it.
    base = backend.fresh_base() if (gguf or onnx) else None
    with atomic_dir(out, force=force) as tmp:
        if gguf:
            write_gguf_parts(backend, base, lora, tmp, quants, manifest, say)
        if onnx:
            write_onnx_parts(backend, base, lora, tmp, manifest, say)
        write_adapter_meta(backend, tmp, manifest)
        if merged:
            write_merged(backend, tmp, manifest, say)
        write_tokenizer(backend, tmp)
        listed = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
        manifest["files"] = {str(f.relative_to(tmp)): sha256_file(f) for f in listed}
        manifest["sizes"] = {str(f.relative_to(tmp)): f.stat().st_size for f in listed}
        from mmagent.export.selfcheck import self_check  # every mode: what was written is what torch runs
        say("self-check: torch model against the bundle ...")
        manifest["selfcheck"] = self_check(backend, tmp, manifest)
        manifest["export_seconds"] = round(time.perf_counter() - start, 1)
        atomic_write_json(tmp / "manifest.json", manifest)
        write_bundle_card(tmp, manifest, runs, out)  # README.md: the model card, self-check figures included
    say(f"bundle written to [bold]{out}[/] in {manifest['export_seconds']} s")
    return manifest


def prompt_info(backend) -> dict:
    vlm = backend.vlm
    model = vlm.base_model
    processor = vlm.image_processor
    return {"system": vlm.system, "chat_template": vlm.tokenizer.chat_template,
            "image_token": vlm.tokenizer.convert_ids_to_tokens(vlm.family.image_token_id(model)),
            "n_image_tokens": vlm.family.n_image_tokens(model), "eos_token_id": vlm.tokenizer.eos_token_id,
            "stop_ids": [vlm.tokenizer.eos_token_id],  # where torch's decoding ends; the edge backend ends there too
            "bos_token": vlm.tokenizer.bos_token, "eos_token": vlm.tokenizer.eos_token,
            # the BOS id a prompt starts with (none if the tokenizer adds none), after the leading image tokens
            # where the processor puts those first (mmagent.prompt.prompt_ids); absent in older bundles: no BOS
            "add_bos_id": vlm.bos, "image_first": vlm.family.image_first,
            "image": image_spec(processor, vlm.family.image_size(model)),
            **({"llm_tokenizer": "tokenizer/tokenizer.json"} if sentencepiece_style(vlm.tokenizer) else {}),
            **({"qformer_tokenizer": f"{QFORMER_TOKENIZER}/tokenizer.json",
                "qformer_max_tokens": vlm.family.max_instruction_tokens(model)} if vlm.family.reads_instruction else {})}


def _size(value) -> dict | None:
    """An image processor's size (a SizeDict or dict) as a plain dict of its set keys."""
    if value is None:
        return None
    items = value.items() if isinstance(value, dict) else vars(value).items()
    return {k: int(v) for k, v in items if v is not None}


def image_spec(processor, size: int) -> dict:
    """The image processor's steps as the edge repeats them (mmagent.backends.edge.preprocess): pad to a
    square (LLaVA's processor with do_pad), resize (a fixed size, or the shortest edge: CLIP), centre crop,
    rescale, normalise. A size rule the edge cannot repeat is refused here, before anything is written."""
    flag = lambda name, default=False: bool(getattr(processor, name, default))  # noqa: E731
    resize = _size(processor.size) if flag("do_resize", True) else None
    if resize and set(resize) not in ({"height", "width"}, {"shortest_edge"}):
        raise ExportError(f"the image processor resizes by {resize}; the edge runtime repeats a fixed height x width "
                          "or a shortest edge only (BLIP's, CLIP's); export with --merged, or without --onnx")
    crop = _size(getattr(processor, "crop_size", None)) if flag("do_center_crop") else None
    return {"size": size, "mean": [float(m) for m in processor.image_mean], "std": [float(s) for s in processor.image_std],
            "resample": int(getattr(processor, "resample", 3)), "resize": resize, "crop": crop,
            "pad_to_square": flag("do_pad") and type(processor).__name__.startswith("LlavaImageProcessor"),
            "rescale": float(processor.rescale_factor) if flag("do_rescale", True) else 1.0,
            "normalize": flag("do_normalize", True)}


def sentencepiece_style(tokenizer) -> bool:
    """Whether the edge tokenises prompts with the LLM's tokenizer.json rather than llama.cpp's (see
    mmagent.backends.edge.PromptTokenizer): SentencePiece LLMs, where transformers and llama.cpp disagree."""
    from mmagent.export.gguf.writer import UnsupportedTokenizer, tokenizer_kind
    try:
        return tokenizer_kind(tokenizer) == "llama"
    except (UnsupportedTokenizer, AttributeError):  # T5's Unigram, a slow tokenizer: no GGUF, no edge LLM
        return False


def write_gguf_parts(backend, base, lora: dict, tmp: Path, quants, manifest: dict, say) -> None:
    from mmagent.export.gguf.writer import quantize, write_llm_gguf, write_lora_gguf
    from mmagent.export.selfcheck import crash_hint
    from mmagent.isolate import run_isolated
    family = backend.vlm.family
    causal_lm = family.causal_lm(base)
    say("GGUF: LLM f16 ...")
    template = backend.vlm.tokenizer.chat_template
    if family.name == "llava":  # stock llama.cpp's multimodal clients send list contents to the GGUF's template
        from mmagent.export.gguf.mmproj import list_content_template
        template = list_content_template(template)
    write_llm_gguf(causal_lm, backend.vlm.tokenizer, tmp / "llm.f16.gguf", template)
    manifest["llm"]["f16"] = "llm.f16.gguf"
    for q in quants:
        if q != "f16":
            say(f"GGUF: quantising to {q} with llama.cpp ...")
            run_isolated(f"quantising the LLM to {q} with llama.cpp", tmp / "llm.f16.gguf", quantize,
                         tmp / "llm.f16.gguf", tmp / f"llm.{q}.gguf", q, hint=crash_hint())
            manifest["llm"][q] = f"llm.{q}.gguf"
    if family.name == "llava":  # stock llama.cpp's multimodal tools read the image path from an mmproj GGUF
        write_mmproj_parts(backend, base, lora, tmp, manifest, say)
    prefix = family.gguf_prefix()
    for name, (llm_part, _) in lora.items():
        if llm_part:
            (tmp / "adapters" / name).mkdir(parents=True, exist_ok=True)
            write_lora_gguf(llm_part, backend.adapters[name].lora.alpha, adapter_file(tmp, name, "llm"),
                            config=causal_lm.config, prefix=prefix)


def _alpha_rank(backend, name: str) -> tuple[float, int]:
    """The adapter's own LoRA alpha and rank, from the record the backend read (never PEFT's internals)."""
    lora = backend.adapters[name].lora
    return lora.alpha, lora.r


def write_mmproj_parts(backend, base, lora: dict, tmp: Path, manifest: dict, say) -> None:
    """LLaVA for stock llama.cpp: `mmproj.f16.gguf` (the base image path) and, per adapter with projector or
    vision LoRA, `adapters/<name>/mmproj.gguf` with it merged (stock llama.cpp cannot switch those)."""
    from mmagent.export.gguf.mmproj import lora_deltas, write_mmproj
    say("GGUF: mmproj (CLIP + projector) for llama.cpp's multimodal tools ...")
    processor = backend.vlm.image_processor
    write_mmproj(base, processor, tmp / "mmproj.f16.gguf")
    manifest["mmproj"] = {"base": "mmproj.f16.gguf", "adapters": {}}
    for name, (_, image_part) in lora.items():
        if image_part:
            (tmp / "adapters" / name).mkdir(parents=True, exist_ok=True)
            write_mmproj(base, processor, tmp / "adapters" / name / "mmproj.gguf",
                         lora_deltas(image_part, *_alpha_rank(backend, name)), name=f"mmproj-{name}")
            manifest["mmproj"]["adapters"][name] = f"adapters/{name}/mmproj.gguf"


def write_onnx_parts(backend, base, lora: dict, tmp: Path, manifest: dict, say) -> None:
    from mmagent.export.onnx.vision import export_vision, optimize, write_adapter
    unused = backend.vlm.family.unused_modules(backend.vlm.base_model)  # LoRA there cannot change the output
    states = {n: {k: v for k, v in image_part.items() if not model_name(k).startswith(unused)}
              for n, (_, image_part) in lora.items()}
    modules = lora_modules(k for s in states.values() for k in s)
    ranks = [backend.adapters[n].lora.r for n, s in states.items() if s]
    say(f"ONNX: vision + bridge with LoRA inputs on {len(modules)} modules ...")
    raw = tmp / "vision.raw.onnx"
    export_vision(base, raw, max(ranks) if modules else None, [re.escape(m) for m in modules])
    fusions = optimize(raw, tmp / "vision.onnx", fp16_path=tmp / "vision.fp16.onnx")
    raw.unlink()
    manifest["vision"] = {"fp32": "vision.onnx", "fp16": "vision.fp16.onnx", "fusions": fusions,
                          "lora_modules": modules}
    for name, state in states.items():
        if state:
            own = backend.adapters[name].lora  # each adapter's own rank and alpha (the graph's rank is the largest)
            (tmp / "adapters" / name).mkdir(parents=True, exist_ok=True)
            write_adapter(state, own.alpha, own.r, adapter_file(tmp, name, "bridge"),
                          onnx_path=tmp / "vision.onnx")


def write_adapter_meta(backend, tmp: Path, manifest: dict) -> None:
    from mmagent.train.adapters import save_soft_prompt
    for name, a in backend.adapters.items():
        (tmp / "adapters" / name).mkdir(parents=True, exist_ok=True)
        if a.soft_prompt is not None:
            save_soft_prompt(tmp / "adapters" / name, a.soft_prompt)
        files = {k: adapter_file(tmp, name, k).relative_to(tmp).as_posix() for k in BUNDLE_ADAPTER_FILES
                 if adapter_file(tmp, name, k).exists()}
        manifest["adapters"][name] = {"kinds": list(a.kinds), "parts": list(a.parts),
                                      "soft_prompt_tokens": a.soft_prompt_tokens, "instructions": dict(a.instructions),
                                      "system": a.system or backend.default_system, "files": files}


def adapter_file(tmp: Path, name: str, key: str) -> Path:
    """Where a bundle keeps adapter `name`'s `key` part (mmagent.artifacts.BUNDLE_ADAPTER_FILES)."""
    return tmp / "adapters" / name / BUNDLE_ADAPTER_FILES[key]


def write_merged(backend, tmp: Path, manifest: dict, say) -> None:
    """One merged HF directory per adapter (LoRA folded into LLM and Q-Former): plain transformers loads it."""
    from mmagent.export.merge import merge_adapter
    manifest["merged"] = {}
    for name in backend.adapters:
        say(f"merged: {name} ...")
        merge_adapter(backend, name, tmp / "merged" / name)
        manifest["merged"][name] = f"merged/{name}"


def write_tokenizer(backend, tmp: Path) -> None:
    backend.vlm.tokenizer.save_pretrained(tmp / "tokenizer")
    backend.vlm.image_processor.save_pretrained(tmp / "tokenizer")
    if backend.vlm.qformer_tokenizer is not None:  # InstructBLIP: the edge backend tokenises the instruction
        backend.vlm.qformer_tokenizer.save_pretrained(tmp / QFORMER_TOKENIZER)


def describe(path: Path) -> dict:
    """What `mmagent info` shows for a bundle or a run directory, verified first: a bundle's manifest and
    every file it lists (mmagent.bundle.verify), a run's adapters (their files all there). Raises
    DamagedBundle listing every problem, FileNotFoundError for a path that is neither."""
    from mmagent.bundle import DamagedBundle, verify
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"`{path}` does not exist; give a bundle (mmagent export -o DIR) or a run directory "
                                "(runs/<name>)")
    if not path.is_dir():
        raise FileNotFoundError(f"`{path}` is a file; give a bundle or a run directory (a folder)")
    kind = kind_of(path)
    if kind == BUNDLE and (path / MANIFEST).exists():
        m = verify(path)
        sizes = {rel: (path / rel).stat().st_size for rel in m["files"]}
        return {"kind": "bundle", "manifest": m, "sizes": sizes}
    if kind == BUNDLE:
        raise DamagedBundle(path, [f"`{path / MANIFEST}` is missing: nothing says which files belong to "
                                   "the bundle or what their sha256 is"])
    if kind == RUN:
        return _describe_run(path)
    raise FileNotFoundError(f"`{path}` is neither a bundle (manifest.json) nor a run directory (recipe.json, "
                            "adapters/<name>/mmagent_adapter.json); give the folder `mmagent export -o` or "
                            "`mmagent train` wrote")


def _describe_run(path: Path) -> dict:
    from mmagent.bundle import DamagedBundle
    from mmagent.adapters import read_meta
    problems, adapters, results = [], {}, {}
    for d in sorted(p for p in (path / "adapters").glob("*") if p.is_dir() and not p.name.startswith(".")):
        try:
            adapters[d.name] = read_meta(d)
        except ValueError as e:
            problems.append(str(e))
    if (path / "results.json").exists():
        try:
            results = json.loads((path / "results.json").read_text())
        except json.JSONDecodeError as e:
            problems.append(f"`{path / 'results.json'}` is not valid JSON ({e})")
    if problems:
        raise DamagedBundle(path, problems, what="run directory",
                            fix="restore the missing files, or train the run again")
    return {"kind": "run", "adapters": adapters, "results": results}


# ---- adding adapters to an existing bundle (`mmagent export RUN --into BUNDLE`) ------------------------------

def add_to_bundle(runs: list[Path], bundle: Path, console=None) -> dict:
    """Add the runs' task adapters to an existing bundle, which may be serving: the bundle is verified, the
    runs' base must be the bundle's (fingerprint), the new adapters are written beside it, self-checked
    against torch with the bundle's own LLM and vision graph, moved into `adapters/<name>/`, and then the
    manifest is replaced in one rename, and the model card (README.md, not in the manifest) gains the new
    adapters. No other file is rewritten. Returns the new manifest."""
    from mmagent.backends.torch import TorchBackend
    from mmagent.bundle import verify
    from mmagent.export.selfcheck import self_check
    bundle = Path(bundle)
    say = console.print if console else (lambda *a, **k: None)
    start = time.perf_counter()
    with _bundle_lock(bundle):
        manifest = verify(bundle)  # every file and its sha256: only a sound bundle is added to
        backend = TorchBackend(runs, device="cpu")
        check_addable(backend, manifest, bundle)
        stage = _staging(bundle)
        try:
            added = write_added_adapters(backend, manifest, bundle, stage, say)
            candidate = with_adapters(manifest, added, bundle, stage, staged=True)
            say("self-check: torch model against the bundle with the new adapter(s) ...")
            report = self_check(backend, bundle, candidate)
            for name in added:
                os.replace(stage / "adapters" / name, bundle / "adapters" / name)
            final = with_adapters(manifest, added, bundle, stage, staged=False)
            for name in added:
                final["adapters"][name]["selfcheck"] = report
                final["adapters"][name]["added_seconds"] = round(time.perf_counter() - start, 1)
            atomic_write_json(bundle / MANIFEST, final)
            write_bundle_card(bundle, final, runs)  # the card lists every adapter: it gains the new ones
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    say(f"added {', '.join(f'[bold]{n}[/]' for n in added)} to {bundle} in {time.perf_counter() - start:.1f} s")
    return final


def check_addable(backend, manifest: dict, bundle: Path) -> None:
    """The same base, new names, and every adapted part carried by what the bundle already has."""
    problems = []
    ours, theirs = manifest["base"]["fingerprint"], backend.base_info["fingerprint"]
    if ours != theirs:
        problems.append(f"the runs were trained on base {backend.base_info['ref']} ({theirs}), the bundle holds "
                        f"{manifest['base']['ref']} ({ours}); train on the bundle's base, or export a new bundle")
    graph = set(manifest["vision"].get("lora_modules", []))
    for name, a in backend.adapters.items():
        if name in manifest["adapters"]:
            problems.append(f"the bundle already has an adapter `{name}`; train the run under another name "
                            "(`run.adapter=NAME`), or export a new bundle")
        elif (bundle / "adapters" / name).exists():
            problems.append(f"`{bundle / 'adapters' / name}` exists but the manifest does not list it; remove it")
        llm_part, image_part = split_parts(a.lora, backend.vlm.family)
        if llm_part and "f16" not in manifest["llm"]:
            problems.append(f"adapter `{name}` adapts the LLM, but the bundle has no GGUF LLM to carry it")
        missing = sorted(set(lora_modules(image_part)) - graph)
        if missing:
            problems.append(f"adapter `{name}` has LoRA on {', '.join(missing)}, which the bundle's vision graph has "
                            f"no LoRA inputs for (it has: {', '.join(sorted(graph)) or 'none'}); export a new "
                            "bundle from all the runs")
    if problems:
        raise ExportError(f"cannot add to `{bundle}`:\n  " + "\n  ".join(problems))


def write_added_adapters(backend, manifest: dict, bundle: Path, stage: Path, say) -> dict:
    """Each adapter's files under `stage/adapters/<name>/`; returns their manifest entries (paths as final)."""
    from mmagent.export.gguf.writer import write_lora_gguf
    from mmagent.export.onnx.vision import write_adapter
    family = backend.vlm.family
    entries = {"adapters": {}}
    for name, a in backend.adapters.items():
        say(f"adapter {name}: LLM LoRA as GGUF, image-path LoRA as an onnxruntime adapter ...")
        llm_part, image_part = split_parts(a.lora, family)
        (stage / "adapters" / name).mkdir(parents=True, exist_ok=True)
        if llm_part:
            write_lora_gguf(llm_part, a.lora.alpha, adapter_file(stage, name, "llm"),
                            config=family.causal_lm(backend.vlm.base_model).config, prefix=family.gguf_prefix())
        if image_part:
            try:
                write_adapter(image_part, a.lora.alpha, a.lora.r, adapter_file(stage, name, "bridge"),
                              onnx_path=bundle / manifest["vision"]["fp32"])
            except ValueError as e:
                raise ExportError(f"adapter `{name}` does not fit the bundle's vision graph: {e}") from e
    write_adapter_meta(backend, stage, entries)
    return entries["adapters"]


def with_adapters(manifest: dict, added: dict, bundle: Path, stage: Path, staged: bool) -> dict:
    """The manifest plus the added entries and their files' sha256 and sizes; `staged`: paths into `stage`."""
    import copy
    m = copy.deepcopy(manifest)
    prefix = f"{stage.name}/" if staged else ""
    for name, entry in added.items():
        entry = copy.deepcopy(entry)
        entry["files"] = {k: prefix + rel for k, rel in entry["files"].items()}
        m["adapters"][name] = entry
        for rel in entry["files"].values():
            f = (stage if staged else bundle) / rel.removeprefix(prefix)
            m["files"][rel], m.setdefault("sizes", {})[rel] = sha256_file(f), f.stat().st_size
    return m


def _staging(bundle: Path) -> Path:
    from mmagent.files import clean_stale_staging
    clean_stale_staging(bundle / "adapters-added")  # what a killed `--into` left
    return Path(tempfile.mkdtemp(dir=bundle, prefix=f".adapters-added.{os.getpid()}.", suffix=".tmp"))


@contextmanager
def _bundle_lock(bundle: Path):
    """One `--into` at a time per bundle: an flock on the bundle directory itself (no file added)."""
    import fcntl
    fd = os.open(bundle, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"another `mmagent export --into {bundle}` is adding to this bundle; wait for it") \
                from None
        yield
    finally:
        os.close(fd)
