"""Where a training step of the 7B shape spends its time (issue 15): torch.profiler over our Trainer's step.

    python bench/profile_7b.py BASE DATA --batch 4 --out DIR [key=value ...]

BASE and DATA come from bench/train_7b.py (base, data). Two kinds of profiled step:
- a *cut* step: the step's parts run one after another with a device synchronisation between them (vision
  tower, Q-Former + projection, LLM forward, head + loss, LLM backward, the rest of the backward, gradient
  clipping, optimizer); kernels are counted and summed between the marks, so each part's GPU time stands
  beside the host time it took to launch it;
- a plain step (Trainer.train_step as training runs it): how much of the wall time the GPU was busy.
A part whose wall time is far above its kernel time is launch-bound (the host is the bottleneck).
Prints one JSON line (`profile`), writes DIR/trace_B{B}.json.gz (chrome://tracing) and DIR/ops_B{B}.txt.
Then times variants in the same process (`variant` lines): the trainer as it is, and switches that change
only how the step is launched, so a change can be judged before it becomes a recipe key.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def setup(base: str, data: Path, batch: int, overrides: list[str]):
    from rich.console import Console
    from mmagent.train.trainer import Trainer
    from train_7b import recipe
    r = recipe(base, data, Path(tempfile.mkdtemp(prefix="prof7b-")), [f"train.batch_size={batch}", *overrides])
    trainer = Trainer(r, console=Console(quiet=True))
    trainer.setup()
    trainer.vlm.model.train()
    return trainer


class Marks:
    """Synchronise, then leave a named zero-length range in the profile (and a host time)."""

    def __init__(self, sync: bool = True):
        self.sync, self.host = sync, []

    def __call__(self, name: str) -> None:
        import torch
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        with torch.profiler.record_function(f"mark:{name}"):
            pass
        self.host.append((name, time.perf_counter()))


def cut_step(trainer, batch: dict, mark: Marks) -> float:
    """Trainer.train_step's work for one micro-batch, in parts with a mark after each."""
    import torch
    vlm, fam = trainer.vlm, trainer.vlm.family
    base = vlm.base_model
    vision = base.get_submodule(fam.parts.vision)
    hook = vision.register_forward_hook(lambda *a: mark("vision_fwd"))
    mark("start")
    with trainer.autocast():
        feats = vlm.image_embeds(batch["pixel_values"], None, vlm.batch_instruction(batch))
        mark("bridge_fwd")
        embeds = vlm.embed_with(batch["input_ids"], feats)
        if embeds.requires_grad:  # something before the LLM trains (the Q-Former's LoRA)
            embeds.register_hook(lambda g: mark("llm_bwd"))
        h = vlm.hidden(embeds, batch["attention_mask"]).last_hidden_state
        mark("llm_fwd")
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        logits = fam.head(base)(h[:, :-1][keep]).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum") / keep.sum()
        mark("head_loss")
    loss.backward()
    mark("bridge_bwd")
    torch.nn.utils.clip_grad_norm_(list(trainer.params.values()), 1.0)
    mark("clip")
    trainer.optimizer.step()
    mark("optimizer")
    trainer.optimizer.zero_grad(set_to_none=True)
    mark("zero_grad")
    hook.remove()
    return loss.item()


def read_trace(path: Path) -> tuple[list[dict], list[dict]]:
    events = json.loads(path.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    marks = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("mark:")),
                   key=lambda e: e["ts"])
    return kernels, marks


def busy(kernels: list[dict]) -> float:
    """µs the GPU ran anything (union of kernel intervals; streams may overlap)."""
    total, end = 0.0, -1.0
    for k in sorted(kernels, key=lambda k: k["ts"]):
        a, b = k["ts"], k["ts"] + k["dur"]
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def parts(kernels: list[dict], marks: list[dict], first: str, last: str) -> list[dict]:
    """Per part between consecutive marks (from `first` to `last`): wall, kernel time, kernel count, top kernels."""
    names = [m["name"].removeprefix("mark:") for m in marks]
    i0 = names.index(first)
    i1 = names.index(last, i0)
    out = []
    for a, b in zip(marks[i0:i1], marks[i0 + 1:i1 + 1]):
        ks = [k for k in kernels if a["ts"] <= k["ts"] < b["ts"]]
        top: dict[str, float] = {}
        for k in ks:
            top[k["name"][:60]] = top.get(k["name"][:60], 0.0) + k["dur"]
        out.append({"part": b["name"].removeprefix("mark:"), "wall_ms": round((b["ts"] - a["ts"]) / 1e3, 2),
                    "kernel_ms": round(busy(ks) / 1e3, 2), "kernels": len(ks),
                    "top": [[n, round(t / 1e3, 2)] for n, t in sorted(top.items(), key=lambda x: -x[1])[:4]]})
    return out


def profile(trainer, out: Path, batch: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from mmagent.train.trainer import prefetched
    stream = trainer.mixture.examples(0)
    source = prefetched(lambda: trainer.step_batches(stream))
    for _ in range(3):  # warm-up: allocator, cuBLAS handles, autotuning
        trainer.train_step(source)
    fixed = next(source)["batches"][0]
    cut_step(trainer, fixed, Marks(sync=False))  # the cut step's own warm-up
    trace = out / f"trace_B{batch}.json"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        mark = Marks()
        cut_step(trainer, fixed, mark)
        mark("plain_start")
        trainer.train_step(source)
        mark("plain_end")
    source.close()
    prof.export_chrome_trace(str(trace))
    (out / f"ops_B{batch}.txt").write_text(
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n" +
        prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))
    kernels, marks = read_trace(trace)
    with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb") as g:
        g.write(f.read())
    trace.unlink()
    names = [m["name"] for m in marks]
    a, b = marks[names.index("mark:plain_start")], marks[names.index("mark:plain_end")]
    plain = [k for k in kernels if a["ts"] <= k["ts"] < b["ts"]]
    wall = (b["ts"] - a["ts"]) / 1e3
    return {"profile": True, "B": batch, "tokens": trainer.step_tokens,
            "plain_step": {"wall_ms": round(wall, 2), "gpu_busy_ms": round(busy(plain) / 1e3, 2),
                           "kernels": len(plain), "busy_fraction": round(busy(plain) / 1e3 / wall, 3)},
            "cut_step": parts(kernels, marks, "start", "zero_grad")}


# ---- variants: the same step launched differently ---------------------------------------------------

def timed(trainer, source, steps: int = 6, warmup: int = 2) -> float:
    import torch
    times = []
    for i in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.train_step(source)
        times.append(time.perf_counter() - t)
    return statistics.median(times[warmup:])


def variants(trainer, batch: int, names: list[str]) -> None:
    import torch
    from mmagent.train.trainer import prefetched
    stream = trainer.mixture.examples(0)
    source = prefetched(lambda: trainer.step_batches(stream))
    plain_autocast, plain_opt = trainer.autocast, trainer.optimizer
    try:
        for name in names:
            trainer.autocast, trainer.optimizer = plain_autocast, plain_opt
            if "noautocast" in name:
                trainer.autocast = nullcontext
            if "fused" in name:
                trainer.optimizer = torch.optim.AdamW(list(trainer.params.values()), lr=1e-4, fused=True)
            try:
                s = timed(trainer, source)
                print(json.dumps({"variant": name, "B": batch, "step_s": round(s, 4),
                                  "tokens_per_s": round(trainer.step_tokens / s)}), flush=True)
            except Exception as e:  # one variant failing must not cost the others
                print(json.dumps({"variant": name, "B": batch, "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
    finally:
        trainer.autocast, trainer.optimizer = plain_autocast, plain_opt
        source.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("data", type=Path)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--variants", default="as_is,noautocast,fused,noautocast+fused")
    args, overrides = ap.parse_known_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = setup(args.base, args.data, args.batch, overrides)
    print(json.dumps(profile(trainer, args.out, args.batch)), flush=True)
    if args.variants:
        variants(trainer, args.batch, args.variants.split(","))
    trainer.close()


if __name__ == "__main__":
    main()
