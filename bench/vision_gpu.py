"""The bundle's vision graph (ViT + Q-Former + projection, task LoRAs per run) on onnxruntime's CUDA provider
against its CPU provider: per-image latency (batch 1, adapters alternating) and the largest difference of
each graph's embeddings from the fp32 graph on the CPU, base and every adapter.

    python bench/vision_gpu.py BUNDLE --out vision.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import images, median, pct

N = 200


def session(bundle: Path, manifest: dict, graph: str, device: str):
    from mmagent.backends.onnx_vision import VisionSession
    from mmagent.device import check_onnx_session, vision_providers
    s = VisionSession(bundle / manifest["vision"][graph], vision_providers(device))
    check_onnx_session(s.session.get_providers(), device)  # the CUDA row refuses a quiet CPU fall-back
    for name, a in manifest["adapters"].items():
        if "bridge" in a["files"]:
            s.load_adapter(name, bundle / a["files"]["bridge"])
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    args = ap.parse_args()
    import onnxruntime as ort
    from mmagent.backends.edge import preprocess
    from mmagent.bundle import read_manifest
    m = read_manifest(args.bundle)
    pictures = [preprocess(im, m["prompt"]["image"]) for im in images(8)]
    batch = np.concatenate(pictures)
    adapters = [None, *[n for n, a in m["adapters"].items() if "bridge" in a["files"]]]
    ref_session = session(args.bundle, m, "fp32", "cpu")
    ref = {a: ref_session.run(batch, a) for a in adapters}
    res = {"onnxruntime": ort.__version__, "available": ort.get_available_providers(), "rows": {}}
    for device in args.devices:
        for graph in ("fp16", "fp32"):
            s = session(args.bundle, m, graph, device)
            diff = {a or "base": float(np.abs(s.run(batch, a) - ref[a]).max()) for a in adapters}
            times = []
            for i in range(N + 10):
                t = time.perf_counter()
                s.run(pictures[i % len(pictures)], adapters[i % len(adapters)])
                times.append(time.perf_counter() - t)
            res["rows"][f"{device} {graph}"] = {"providers": s.session.get_providers()[:1], "max_abs_diff": diff,
                                                "p50_ms": 1e3 * median(times[10:]), "p99_ms": 1e3 * pct(times[10:], 99)}
    res["embedding_max_abs"] = float(max(np.abs(r).max() for r in ref.values()))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
