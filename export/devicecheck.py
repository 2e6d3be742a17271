"""The self-check on a chosen device (`mmagent check BUNDLE RUNS... --device cuda`): the bundle run by the
edge backend on that device (llama.cpp with every layer offloaded, the fp16 vision graph on onnxruntime's
CUDA provider) against torch in fp32 on the CPU, the same probes as the export's self-check.

f16 greedy tokens must be identical to torch; quantised variants report their agreement; the vision
embeddings must stay within VISION_TOL_FP16 (the fp16 graph's rounding) or VISION_TOL for an fp32 graph;
every adapter answers in turn, so LoRA switching is exercised on the device.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

VISION_TOL_FP16 = 1e-2  # max abs; on the CPU the fp16 graph is within 6e-4 of the fp32 one (embeddings ~0.9)


def edge_on_device(bundle_dir: str, quant: str, device: str, images: list, case_list: list) -> dict:
    """Run in a child process: greedy tokens per (image, case) and image embeddings per adapter."""
    from mmagent.backends.edge import EdgeBackend, preprocess
    from mmagent.export.selfcheck import N_TOKENS
    edge = EdgeBackend(bundle_dir, quant, device=device)
    try:
        started = time.perf_counter()
        greedy = [edge.generate(image, prompt, adapter, kind, (), N_TOKENS, None)[0][:N_TOKENS]
                  for image in images for adapter, kind, prompt in case_list]
        out = {"greedy": greedy, "seconds": time.perf_counter() - started,
               "providers": edge.vision.session.get_providers(), "vision_graph": edge.vision_graph}
        if not getattr(edge.vision, "reads_instruction", False):  # InstructBLIP's graph needs the instruction
            pixels = np.concatenate([preprocess(im, edge.prompt["image"]) for im in images])
            out["vision"] = {a or "base": edge.vision.run(pixels, a if a and "bridge" in edge.has[a] else None)
                             for a in [None, *edge.adapters]}
        return out
    finally:
        edge.close()


def vision_diffs(backend, images, got: dict) -> dict:
    import torch
    pixels = backend.vlm.pixels(images)
    diffs = {}
    for adapter in [None, *backend.adapters]:
        with torch.no_grad(), backend.using_adapter(adapter):
            ref = backend.vlm.image_embeds(pixels).float().numpy()
        diffs[adapter or "base"] = float(np.abs(got[adapter or "base"] - ref).max())
    return diffs


def check_on_device(bundle: Path, runs: list[Path], device: str = "cuda", quants: list[str] | None = None) -> dict:
    """The report ({"problems": [...] , ...}); an empty problems list means the bundle passed on `device`."""
    from mmagent.backends.torch import TorchBackend
    from mmagent.bundle import read_manifest
    from mmagent.export.selfcheck import VISION_TOL, agreement, cases, crash_hint, probe_images, torch_greedy
    from mmagent.isolate import run_isolated
    manifest = read_manifest(bundle)
    quants = quants or list(manifest["llm"])
    backend = TorchBackend(runs, device="cpu")  # the reference: fp32, as at export
    images = probe_images(backend.vlm.family.image_size(backend.vlm.base_model))
    case_list = cases(backend)
    reference = torch_greedy(backend, images, case_list)
    report: dict = {"device": device, "quantised": {}, "problems": []}
    for q in quants:
        if q not in manifest["llm"]:
            raise ValueError(f"bundle `{bundle}` has no `{q}` LLM; it has: {', '.join(manifest['llm'])}")
        got = run_isolated(f"device check (the bundle's {q} LLM and vision graph on {device})",
                           manifest["llm"][q], edge_on_device, str(bundle), q, device, images, case_list,
                           hint=crash_hint())
        agreed = agreement(backend, reference, got["greedy"], case_list)
        agreed["seconds"] = round(got["seconds"], 3)
        report["providers"] = got["providers"]
        if q == "f16":
            report["greedy_f16"] = agreed
            if agreed["identical"] != agreed["cases"]:
                report["problems"].append(f"f16 greedy tokens on {device} differ from torch in "
                                          f"{agreed['cases'] - agreed['identical']} of {agreed['cases']} cases, "
                                          f"e.g. {agreed['examples'][0]}")
        else:
            report["quantised"][q] = agreed
        if "vision" in got and "vision" not in report:
            diffs = vision_diffs(backend, images, got["vision"])
            tol = VISION_TOL_FP16 if got["vision_graph"] == "fp16" else VISION_TOL
            report["vision"] = {"graph": got["vision_graph"], "max_abs_diff": diffs, "tolerance": tol}
            if max(diffs.values()) > tol:
                report["problems"].append(f"{got['vision_graph']} vision embeddings on {device} differ from torch "
                                          f"by {max(diffs.values()):.2e} > {tol:.0e}: {diffs}")
    return report
