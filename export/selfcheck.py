"""The export's self-check: the torch model against the bundle on fixed images and prompts.

Checks, all recorded in the manifest: tokenizer ids identical (ASCII, Unicode, whitespace runs, the chat
template, a whole prompt with its BOS); ONNX image embeddings within VISION_TOL of torch for the base and every adapter; f16 GGUF
greedy tokens identical to torch for the first N_TOKENS; quantised variants' agreement reported. A
failed check fails the export with the numbers.

The bundle's side runs in a child process (mmagent.isolate): llama.cpp and onnxruntime meet freshly
written files there first, and a native crash becomes an error that names the stage and the file.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

VISION_TOL = 1e-3   # fp32 ONNX vs torch, max abs over all embedding values
N_TOKENS = 8
PROBE_STRINGS = ["What colour is the circle?", "héllo wörld: ünïcode ✓ 日本語 🙂", "  runs   of\tspaces\n\n\nand lines  ",
                 "1234567890 3.14159 don't", "<|im_start|>user\nhi<|im_end|>\n"]
PROBE_INSTRUCTION = "Describe the image.\nwhat colour is the circle?"  # what an instruction-reading bridge gets
PROMPTS = {"vqa": ["is there a circle?", "how many squares are there?"], "caption": ["Describe the image."],
           "match": ["a small red circle on the left."]}


def probe_images(size: int) -> list:
    """Three scenes; the last stretched to 3:2, so that the edge's resize / crop / pad is checked against the
    checkpoint's image processor on an image that is not square."""
    from mmagent.train.data.shapes import draw_scene, sample_scene
    rng = random.Random("selfcheck")
    images = [draw_scene(sample_scene(rng), size) for _ in range(3)]
    images[-1] = images[-1].resize((size * 3 // 2, size))
    return images


def edge_outputs(bundle_dir, manifest: dict, quant: str, images: list, cases: list, strings: list | None) -> dict:
    """What the bundle answers, run in the child: greedy tokens per (image, case); with `strings`, also
    its token ids, chat template and image embeddings (base and every adapter)."""
    from mmagent.backends.edge import EdgeBackend, preprocess
    edge = EdgeBackend(bundle_dir, quant, manifest=manifest)
    try:
        out = {"greedy": [edge.generate(image, prompt, adapter, kind, (), N_TOKENS, None)[0][:N_TOKENS]
                          for image in images for adapter, kind, prompt in cases]}
        if strings is not None:
            pixels = np.concatenate([preprocess(im, edge.prompt["image"]) for im in images])
            out["tokens"] = [edge.tokenize(s) for s in strings]  # what the edge feeds llama.cpp
            out["prompt"] = edge.tokenize.prompt(strings[-1])  # a whole prompt: BOS where torch puts it
            out["template"] = rendered(edge.template)
            out["pixels"] = pixels
            said = edge.instruction_inputs([PROBE_INSTRUCTION] * len(images))  # InstructBLIP's Q-Former reads it
            out["vision"] = {a or "base": edge.vision.run(pixels, a if a and "bridge" in edge.has[a] else None, said)
                             for a in [None, *edge.adapters]}
        return out
    finally:
        edge.close()


def run_bundle(bundle_dir, manifest: dict, quant: str, images, cases, strings=None) -> dict:
    from mmagent.isolate import run_isolated
    path = Path(bundle_dir) / manifest["llm"][quant]
    return run_isolated(f"self-check (running the bundle's {quant} LLM in llama.cpp and its vision graph in "
                        "onnxruntime)", path.name, edge_outputs, str(bundle_dir), manifest, quant, images, cases,
                        strings, hint=crash_hint())


def crash_hint() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    amx = " This CPU has Intel AMX: builds of llama-cpp-python whose AMX kernels are miscompiled crash there; " \
          "`make install` builds a working one, or set MMAGENT_LLAMA_EXTRA_BUFTS=0." if "amx_int8" in flags else ""
    return "The crash is in native code (llama.cpp or onnxruntime); the bundle was not written." + amx


def rendered(tokenizer) -> str | None:
    """A one-turn chat through the template, or None for a checkpoint without one (InstructBLIP-Vicuna,
    BLIP-2 OPT: their prompts are `Question: .. Answer:`)."""
    if not tokenizer.chat_template:
        return None
    return tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)


def check_tokenizer(backend, edge: dict) -> dict:
    template = backend.vlm.prompt_text("Describe the image.", "", 0, [("q?", "a.")])
    strings = [*PROBE_STRINGS, template]
    mismatched = [s for s, ids in zip(strings, edge["tokens"])
                  if backend.vlm.tokenizer(s, add_special_tokens=False).input_ids != ids]
    theirs = rendered(backend.vlm.tokenizer)
    return {"strings": len(strings), "mismatched": mismatched, "template_identical": edge["template"] == theirs,
            "prompt_identical": edge["prompt"] == backend.vlm.prompt_ids(template)}  # BOS and image cut included


def check_vision(backend, edge: dict, images) -> dict:
    pixels_torch = backend.vlm.pixels(images)
    diffs = {"preprocess": float(np.abs(edge["pixels"] - pixels_torch.numpy()).max())}
    for adapter in [None, *backend.adapters]:
        with torch.no_grad(), backend.using_adapter(adapter):
            said = backend.vlm.instruction_inputs([PROBE_INSTRUCTION] * len(images))
            ref = backend.vlm.image_embeds(pixels_torch, None, said).numpy()
        diffs[adapter or "base"] = float(np.abs(edge["vision"][adapter or "base"] - ref).max())
    return {"max_abs_diff": diffs, "tolerance": VISION_TOL}


def cases(backend) -> list[tuple]:
    out = [(None, "caption", PROMPTS["caption"][0])]
    for name, info in backend.adapters.items():
        for kind in info.kinds:
            out += [(name, kind, prompt) for prompt in PROMPTS.get(kind, PROMPTS["vqa"])]
    return out


def torch_greedy(backend, images, case_list) -> list[list[int]]:
    return [backend.generate(image, prompt, adapter, kind, (), N_TOKENS, None)[0][:N_TOKENS]
            for image in images for adapter, kind, prompt in case_list]


def agreement(backend, reference: list, got: list, case_list: list) -> dict:
    failures = []
    for i, (ref, tokens) in enumerate(zip(reference, got)):
        if ref != tokens and len(failures) < 3:
            adapter, _, prompt = case_list[i % len(case_list)]
            failures.append({"adapter": adapter, "prompt": prompt, "torch": backend.decode(ref),
                             "bundle": backend.decode(tokens)})
    same = sum(r == g for r, g in zip(reference, got))
    return {"cases": len(reference), "identical": same, "first_tokens": N_TOKENS, "examples": failures}


def llm_outputs(bundle_dir, manifest: dict, quant: str, prompts: list, strings: list | None) -> dict:
    """A bundle without a vision graph (`--gguf` alone), run in the child: the GGUF LLM and its LoRAs answer
    prompts whose image rows torch computed; with `strings`, also its token ids and chat template."""
    from mmagent.backends.edge import ChatTemplate, PromptTokenizer
    from mmagent.backends.llama_cpp import LlamaCppLM
    from mmagent.prompt import stop_ids
    bundle, entries = Path(bundle_dir), manifest["adapters"]
    with LlamaCppLM(bundle / manifest["llm"][quant], n_ctx=1024) as lm:
        for name, a in entries.items():
            if "llm" in a["files"]:
                lm.load_adapter(name, bundle / a["files"]["llm"])
        greedy, tokenize = [], PromptTokenizer(bundle, manifest["prompt"], lm)
        for adapter, before, rows, after in prompts:
            lm.set_adapter(adapter if adapter and "llm" in entries[adapter]["files"] else None)
            placeholder = manifest["prompt"]["image_token"] * len(rows)
            head, tail = tokenize.around(before + placeholder + after, placeholder)
            segments = [head, rows, tail]
            greedy.append(lm.generate(segments, N_TOKENS, stop_ids=stop_ids(manifest["prompt"]))[:N_TOKENS])
        out = {"greedy": greedy}
        if strings is not None:
            out["tokens"] = [tokenize(s) for s in strings]
            out["prompt"] = tokenize.prompt(strings[-1])
            out["template"] = rendered(ChatTemplate(manifest["prompt"]))
        return out


def vision_outputs(bundle_dir, manifest: dict, images: list) -> dict:
    """A bundle without an LLM (`--onnx` alone), run in the child: the vision graph's embeddings for the base
    and every adapter."""
    from mmagent.backends.edge import preprocess
    from mmagent.backends.onnx_vision import VisionSession
    bundle = Path(bundle_dir)
    vision = VisionSession(bundle / manifest["vision"]["fp32"])
    bridges = [n for n, a in manifest["adapters"].items() if "bridge" in a["files"]]
    for name in bridges:
        vision.load_adapter(name, bundle / manifest["adapters"][name]["files"]["bridge"])
    pixels = np.concatenate([preprocess(im, manifest["prompt"]["image"]) for im in images])
    said = None
    if vision.reads_instruction:  # InstructBLIP: its Q-Former reads the instruction too (one text: no padding)
        from mmagent.backends.edge import qformer_tokenizer
        ids = [e.ids for e in qformer_tokenizer(bundle, manifest["prompt"]).encode_batch([PROBE_INSTRUCTION] * len(images))]
        said = (np.array(ids, np.int64), np.ones((len(ids), len(ids[0])), np.int64))
    return {"pixels": pixels, "vision": {a or "base": vision.run(pixels, a if a in bridges else None, said)
                                         for a in [None, *manifest["adapters"]]}}


def run_child(what: str, fn, bundle_dir, manifest: dict, quant: str | None, *args) -> dict:
    from mmagent.isolate import run_isolated
    name = Path(manifest["llm"][quant]).name if quant else Path(manifest["vision"]["fp32"]).name
    return run_isolated(f"self-check ({what})", name, fn, str(bundle_dir), manifest, *((quant,) if quant else ()),
                        *args, hint=crash_hint())


def torch_prompts(backend, images, case_list) -> list[tuple]:
    """(adapter, text before the image, image rows, text after) per case, as the edge backend builds them,
    the rows (soft prompt + image embeddings) computed by torch."""
    from mmagent.prompt import prompt_parts
    out, pixels = [], backend.vlm.pixels(images)
    for i in range(len(images)):
        for adapter, kind, prompt in case_list:
            record = backend.adapters.get(adapter) if adapter else None
            instruction, text = prompt_parts(prompt, kind, record.instructions if record else {})
            soft = record.soft_prompt if record is not None else None
            n_soft = 0 if soft is None else soft.shape[0]
            before, after = backend.prompt_text(record, instruction, text, n_soft).split(backend.vlm.placeholder(n_soft), 1)
            said = backend.vlm.instruction_inputs([instruction + ("\n" + text if text else "")])
            with torch.no_grad(), backend.using_adapter(adapter):
                rows = backend.vlm.image_embeds(pixels[i:i + 1], None if soft is None else soft[None], said)[0]
            out.append((adapter, before, rows.float().numpy(), after))
    return out


def check_merged(backend, bundle_dir, manifest: dict, images, case_list, reference) -> dict:
    """Each merged directory, loaded by plain transformers (no PEFT), against the adapter it was merged from."""
    from dataclasses import replace

    from mmagent.backends.torch import TorchBackend
    report = {}
    for name, rel in manifest["merged"].items():
        merged = TorchBackend([Path(bundle_dir) / rel], device="cpu")
        merged.adapters[name] = replace(backend.adapters[name], lora=None)  # folded in: facts and soft prompt only
        picked = [(i, c) for i, c in enumerate(case_list) if c[0] == name]
        ref = [reference[k * len(case_list) + i] for k in range(len(images)) for i, _ in picked]
        got = [merged.generate(image, prompt, adapter, kind, (), N_TOKENS, None)[0][:N_TOKENS]
               for image in images for _, (adapter, kind, prompt) in picked]
        report[name] = agreement(backend, ref, got, [c for _, c in picked])
    return report


def self_check(backend, bundle_dir, manifest) -> dict:
    """Every part the bundle holds, checked against torch: GGUF LLM (with or without the vision graph), ONNX
    vision graph (with or without the LLM), merged directories."""
    from mmagent.export.bundle import ExportError
    images = probe_images(backend.vlm.family.image_size(backend.vlm.base_model))
    case_list = cases(backend)
    reference = torch_greedy(backend, images, case_list)
    strings = [*PROBE_STRINGS, backend.vlm.prompt_text("Describe the image.", "", 0, [("q?", "a.")])]
    report, llm, vision = {}, bool(manifest["llm"]), bool(manifest["vision"])
    if llm and vision:  # the edge backend end to end
        edge = run_bundle(bundle_dir, manifest, "f16", images, case_list, strings)
        greedy = {q: run_bundle(bundle_dir, manifest, q, images, case_list)["greedy"] for q in manifest["llm"]
                  if q != "f16"}
    elif llm:  # the LLM alone, fed torch's image rows
        prompts = torch_prompts(backend, images, case_list)
        edge = run_child("running the bundle's f16 LLM in llama.cpp", llm_outputs, bundle_dir, manifest, "f16",
                         prompts, strings)
        greedy = {q: run_child(f"running the bundle's {q} LLM in llama.cpp", llm_outputs, bundle_dir, manifest, q,
                               prompts, None)["greedy"] for q in manifest["llm"] if q != "f16"}
    elif vision:
        edge = run_child("running the bundle's vision graph in onnxruntime", vision_outputs, bundle_dir, manifest,
                         None, images)
    if llm:
        report["tokenizer"] = check_tokenizer(backend, edge)
        report["greedy_f16"] = agreement(backend, reference, edge["greedy"], case_list)
        report["quantised"] = {q: agreement(backend, reference, got, case_list) for q, got in greedy.items()}
    if vision:
        report["vision"] = check_vision(backend, edge, images)
    if manifest.get("merged"):
        report["merged"] = check_merged(backend, bundle_dir, manifest, images, case_list, reference)
    problems = check_problems(report)
    if problems:
        raise ExportError("self-check failed; the bundle was not written:\n  " + "\n  ".join(problems))
    return report


def check_problems(report: dict) -> list[str]:
    problems = []
    t = report.get("tokenizer")
    if t and (t["mismatched"] or not t["template_identical"] or not t.get("prompt_identical", True)):
        problems.append(f"tokenizer ids differ on {t['mismatched']} (template identical: {t['template_identical']}; "
                        f"prompt ids with BOS identical: {t.get('prompt_identical')})")
    if "vision" in report:
        worst = max(report["vision"]["max_abs_diff"].values())
        if worst > VISION_TOL:
            problems.append(f"ONNX image embeddings differ from torch by {worst:.2e} > {VISION_TOL:.0e}: "
                            f"{report['vision']['max_abs_diff']}")
    exact = ([("f16 GGUF", report["greedy_f16"])] if "greedy_f16" in report else []) + \
        [(f"merged `{n}`", g) for n, g in report.get("merged", {}).items()]
    for what, g in exact:
        if g["identical"] != g["cases"]:
            problems.append(f"{what} greedy tokens differ from torch in {g['cases'] - g['identical']} of {g['cases']} "
                            f"cases, e.g. {g['examples'][0]}")
    return problems
