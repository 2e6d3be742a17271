"""The export's self-check: the torch model against the bundle on fixed images and prompts.

Checks, all recorded in the manifest: tokenizer ids identical (ASCII, Unicode, whitespace runs, the chat
template); ONNX image embeddings within VISION_TOL of torch for the base and every adapter; f16 GGUF
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
    from mmagent.train.data.shapes import draw_scene, sample_scene
    rng = random.Random("selfcheck")
    return [draw_scene(sample_scene(rng), size) for _ in range(3)]


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
            out["tokens"] = [edge.llm.tokenize(s) for s in strings]
            out["template"] = edge.template.apply_chat_template([{"role": "user", "content": "x"}])
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


def check_tokenizer(backend, edge: dict) -> dict:
    template = backend.vlm.prompt_text("Describe the image.", "", 0, [("q?", "a.")])
    strings = [*PROBE_STRINGS, template]
    mismatched = [s for s, ids in zip(strings, edge["tokens"])
                  if backend.vlm.tokenizer(s, add_special_tokens=False).input_ids != ids]
    theirs = backend.vlm.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                       add_generation_prompt=True)
    return {"strings": len(strings), "mismatched": mismatched, "template_identical": edge["template"] == theirs}


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


def self_check(backend, bundle_dir, manifest) -> dict:
    from mmagent.export.bundle import ExportError
    images = probe_images(backend.vlm.family.image_size(backend.vlm.base_model))
    case_list = cases(backend)
    reference = torch_greedy(backend, images, case_list)
    strings = [*PROBE_STRINGS, backend.vlm.prompt_text("Describe the image.", "", 0, [("q?", "a.")])]
    edge = run_bundle(bundle_dir, manifest, "f16", images, case_list, strings)
    report = {"tokenizer": check_tokenizer(backend, edge), "vision": check_vision(backend, edge, images),
              "greedy_f16": agreement(backend, reference, edge["greedy"], case_list), "quantised": {}}
    for q in manifest["llm"]:
        if q != "f16":
            got = run_bundle(bundle_dir, manifest, q, images, case_list)["greedy"]
            report["quantised"][q] = agreement(backend, reference, got, case_list)
    problems = []
    if report["tokenizer"]["mismatched"] or not report["tokenizer"]["template_identical"]:
        problems.append(f"tokenizer ids differ on {report['tokenizer']['mismatched']} "
                        f"(template identical: {report['tokenizer']['template_identical']})")
    worst = max(report["vision"]["max_abs_diff"].values())
    if worst > VISION_TOL:
        problems.append(f"ONNX image embeddings differ from torch by {worst:.2e} > {VISION_TOL:.0e}: "
                        f"{report['vision']['max_abs_diff']}")
    g = report["greedy_f16"]
    if g["identical"] != g["cases"]:
        problems.append(f"f16 GGUF greedy tokens differ from torch in {g['cases'] - g['identical']} of {g['cases']} "
                        f"cases, e.g. {g['examples'][0]}")
    if problems:
        raise ExportError("self-check failed; the bundle was not written:\n  " + "\n  ".join(problems))
    return report
