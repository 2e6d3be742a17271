"""Adapter switch latency (p50, p99) per backend against reloading the model, and time to first token
for an image question right after a switch. One process, one run.

    python bench/adapter_switch.py --runs runs/vqa runs/caption --bundle bundles/bench
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import ensure_bundle, images, machine, median, pct


def switch_times(backend, names: list[str], n: int) -> list[float]:
    """Seconds per whole-adapter switch: LLM LoRA (+ KV clear on edge), bridge LoRA, soft prompt."""
    out = []
    for i in range(n):
        name = names[i % len(names)]
        t = time.perf_counter()
        # edge: llama.cpp LoRA set + KV clear (onnxruntime picks its adapter per run);
        # torch: PEFT set_adapter moves LLM and Q-Former LoRA together
        (backend.llm if hasattr(backend, "llm") else backend.vlm.model).set_adapter(name)
        getattr(backend, "soft_prompts", {}).get(name) if hasattr(backend, "llm") else backend.adapters[name].soft_prompt
        out.append(time.perf_counter() - t)
    return out


def reload_times(load, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        load()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", nargs="+", type=Path, default=[Path("runs/vqa"), Path("runs/caption")])
    ap.add_argument("--bundle", type=Path, default=Path("bundles/bench"))
    ap.add_argument("--switches", type=int, default=2000)
    ap.add_argument("--reloads", type=int, default=5)
    args = ap.parse_args()
    from mmagent import Agent
    bundle = ensure_bundle(args.runs, args.bundle)
    loaders = {"torch": lambda: Agent.load(args.runs, "torch"), "edge": lambda: Agent.load(bundle, "edge")}
    img = images(1)[0]
    print(f"machine: {machine()}")
    print(f"{'backend':8} {'switch p50 us':>14} {'switch p99 us':>14} {'reload p50 ms':>14} {'reload/switch':>14} "
          f"{'TTFT after switch ms':>21}")
    for name, load in loaders.items():
        agent = load()
        names = agent.adapters
        switch = switch_times(agent.backend, names, args.switches)
        reload = reload_times(load, args.reloads)
        ttft = []
        for i in range(12):
            a = agent.ask(img, "how many squares are there?", adapter=names[i % len(names)], max_new_tokens=4)
            ttft.append(a.timings["first_token"])
        p50 = median(switch)
        print(f"{name:8} {1e6 * p50:14.1f} {1e6 * pct(switch, 99):14.1f} {1e3 * median(reload):14.1f} "
              f"{median(reload) / p50:14.0f} {1e3 * median(ttft[2:]):21.2f}")


if __name__ == "__main__":
    main()
