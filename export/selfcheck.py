"""The export's self-check: the torch model against the bundle on fixed images and prompts.

Checks, all recorded in the manifest: tokenizer ids identical (ASCII, Unicode, whitespace runs, the chat
template); ONNX image embeddings within VISION_TOL of torch for the base and every adapter; f16 GGUF
greedy tokens identical to torch for the first N_TOKENS; quantised variants' agreement reported. A
failed check fails the export with the numbers.
"""
from __future__ import annotations

import random

import numpy as np
import torch

VISION_TOL = 1e-3   # fp32 ONNX vs torch, max abs over all embedding values
N_TOKENS = 8
PROBE_STRINGS = ["What colour is the circle?", "héllo wörld: ünïcode ✓ 日本語 🙂", "  runs   of\tspaces\n\n\nand lines  ",
                 "1234567890 3.14159 don't", "<|im_start|>user\nhi<|im_end|>\n"]
PROMPTS = {"vqa": ["is there a circle?", "how many squares are there?"], "caption": ["Describe the image."],
           "match": ["a small red circle on the left."]}


def probe_images(size: int) -> list:
    from mmagent.train.data.shapes import draw_scene, sample_scene
    rng = random.Random("selfcheck")
    return [draw_scene(sample_scene(rng), size) for _ in range(3)]


def check_tokenizer(backend, edge) -> dict:
    template = backend.vlm.prompt_text("Describe the image.", "", 0, [("q?", "a.")])
    mismatched = [s for s in [*PROBE_STRINGS, template]
                  if backend.vlm.tokenizer(s, add_special_tokens=False).input_ids != edge.llm.tokenize(s)]
    ours = edge.template.apply_chat_template([{"role": "user", "content": "x"}])
    theirs = backend.vlm.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                       add_generation_prompt=True)
    return {"strings": len(PROBE_STRINGS) + 1, "mismatched": mismatched, "template_identical": ours == theirs}


def check_vision(backend, edge, images) -> dict:
    from mmagent.backends.edge import preprocess
    pixels_np = np.concatenate([preprocess(im, edge.prompt["image"]) for im in images])
    pixels_torch = backend.vlm.pixels(images)
    diffs = {"preprocess": float(np.abs(pixels_np - pixels_torch.numpy()).max())}
    for adapter in [None, *backend.adapters]:
        with torch.no_grad(), backend._switch(adapter):
            ref = backend.vlm.image_embeds(pixels_torch).numpy()
        bridge = adapter if adapter and "bridge" in edge.has[adapter] else None
        diffs[adapter or "base"] = float(np.abs(edge.vision.run(pixels_np, bridge) - ref).max())
    return {"max_abs_diff": diffs, "tolerance": VISION_TOL}


def cases(backend):
    yield None, "caption", PROMPTS["caption"][0]
    for name, info in backend.adapters.items():
        for kind in info.kinds:
            for prompt in PROMPTS.get(kind, PROMPTS["vqa"]):
                yield name, kind, prompt


def greedy_agreement(backend, edge, images) -> dict:
    total, same, failures = 0, 0, []
    for image in images:
        for adapter, kind, prompt in cases(backend):
            ref = backend.generate(image, prompt, adapter, kind, (), N_TOKENS, None)[0][:N_TOKENS]
            got = edge.generate(image, prompt, adapter, kind, (), N_TOKENS, None)[0][:N_TOKENS]
            total += 1
            if ref == got:
                same += 1
            elif len(failures) < 3:
                failures.append({"adapter": adapter, "prompt": prompt, "torch": backend.decode(ref),
                                 "bundle": edge.decode(got)})
    return {"cases": total, "identical": same, "first_tokens": N_TOKENS, "examples": failures}


def self_check(backend, bundle_dir, manifest) -> dict:
    from mmagent.backends.edge import EdgeBackend
    from mmagent.export.bundle import ExportError
    images = probe_images(backend.vlm.family.image_size(backend.vlm.base_model))
    edge = EdgeBackend(bundle_dir, "f16", manifest=manifest)
    report = {"tokenizer": check_tokenizer(backend, edge), "vision": check_vision(backend, edge, images),
              "greedy_f16": greedy_agreement(backend, edge, images), "quantised": {}}
    edge.close()  # the bundle directory is renamed into place next: let go of its mapped files first
    for q in manifest["llm"]:
        if q != "f16":
            quantised = EdgeBackend(bundle_dir, q, manifest=manifest)
            report["quantised"][q] = greedy_agreement(backend, quantised, images)
            quantised.close()
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
