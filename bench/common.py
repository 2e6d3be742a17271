"""Shared set-up for the benchmarks: the model under test, the probe images, a machine description."""
from __future__ import annotations

import os
import platform
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is not part of the installed package


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def images(n: int = 8, size: int = 64) -> list:
    from mmagent.train.data.shapes import draw_scene, sample_scene
    rng = random.Random("bench")
    return [draw_scene(sample_scene(rng), size) for _ in range(n)]


def ensure_bundle(runs: list[Path], bundle: Path) -> Path:
    for r in runs:
        if not (r / "adapters").is_dir():
            raise SystemExit(f"{r} is not a finished run; train it first: mmagent train recipes/{r.name}.toml")
    if not (bundle / "manifest.json").exists():
        from mmagent.export.bundle import export_bundle
        export_bundle(runs, bundle, gguf=True, onnx=True, quants=("f16", "q8_0"), force=True)
    return bundle


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)
