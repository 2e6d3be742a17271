"""Model cards: the README.md of every run directory and every bundle.

What a person needs before using an adapter: the base and its fingerprint, the recipe, each adapter with
its parts and trainable parameters, the held-out scores with their controls, for a bundle the export's
self-check, and the commands that use it (SDK, chat, serve, llama.cpp). Every number is read from the
files beside it (results.json, recipe.json, base.json, the adapters' files, manifest.json), never retyped.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from mmagent.files import atomic_write_bytes
from mmagent.train.report import LEGEND, markdown_scores

PART_NAMES = {"vision": "vision tower", "bridge": "bridge (Q-Former / projector)", "llm": "LLM"}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def lora_parameters(adapter_dir: Path) -> int | None:
    """Parameters in an adapter's adapter_model.safetensors, from the file's header alone (no weights read)."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def adapter_rows(name: str, meta: dict, trainable: dict, adapter_dir: Path | None) -> list[str]:
    """Markdown rows: one per adapted part with its LoRA targets and trainable parameters (results.json's
    `trainable`; a run written before it was recorded gives the file's total once)."""
    rows = []
    for part, leaves in meta.get("parts", {}).items():
        n = trainable.get(part, [None])[0]
        rows.append(f"| {name} | {PART_NAMES.get(part, part)} | {', '.join(leaves)} | "
                    f"{'' if n is None else f'{n:,}'} |")
    if meta.get("soft_prompt_tokens"):
        n = trainable.get("soft prompt", [None])[0]
        rows.append(f"| {name} | soft prompt | {meta['soft_prompt_tokens']} vectors | {'' if n is None else f'{n:,}'} |")
    if not trainable and adapter_dir is not None and lora_parameters(adapter_dir) is not None:
        rows.append(f"| {name} | all parts (this run did not record them per part) | | "
                    f"{lora_parameters(adapter_dir):,} |")
    return rows


ADAPTER_HEAD = ["| adapter | part | LoRA on | trainable parameters |", "|---|---|---|---|"]


def scores_section(results: dict) -> list[str]:
    if not results.get("adapter"):
        return ["No held-out evaluation was recorded."]
    return [*markdown_scores(results), "", LEGEND]


def recipe_lines(recipe: dict) -> list[str]:
    t, lora, sp = recipe.get("train", {}), recipe.get("lora", {}), recipe.get("soft_prompt", {})
    tasks = ", ".join(f"{x['name']} ({x['kind']}, ratio {x['ratio']:g})" for x in recipe.get("tasks", []))
    rows = [("tasks", tasks), ("data", recipe.get("data", {}).get("source", "")),
            ("method", t.get("method", "")), ("steps", t.get("steps", "")),
            ("batch", f"{t.get('batch_size', '')} x {t.get('grad_accum', 1)} (micro-batch x accumulation)"),
            ("learning rate", f"{t.get('lr', '')} (warm-up {t.get('warmup_steps', '')} steps, then cosine)"),
            ("LoRA", f"r {lora.get('r', '')}, alpha {lora.get('alpha', '')}, dropout {lora.get('dropout', '')}"),
            ("soft prompt", f"{sp.get('tokens', 0)} vectors, lr {sp.get('lr', '')}" if sp.get("tokens") else "none"),
            ("seed", recipe.get("run", {}).get("seed", ""))]
    return ["| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def run_card(run_dir: Path, results: dict) -> str:
    run_dir = Path(run_dir)
    recipe, base = _read(run_dir / "recipe.json"), _read(run_dir / "base.json")
    adapters = {d.name: _read(d / "mmagent_adapter.json") for d in sorted((run_dir / "adapters").glob("*"))
                if (d / "mmagent_adapter.json").is_file()}
    name = next(iter(adapters), run_dir.name)
    meta = adapters.get(name, {})
    kinds = ", ".join(meta.get("kinds", [])) or "task"
    lines = [f"# {name}: a {kinds} adapter for `{base.get('ref', meta.get('base_ref', '?'))}`", "",
             f"Trained with mmagent for {results.get('steps', recipe.get('train', {}).get('steps', '?'))} steps; "
             f"the run's full report is [report.md](report.md), its settings [recipe.json](recipe.json).", "",
             "## Base", "",
             f"`{base.get('ref', meta.get('base_ref', '?'))}`, fingerprint `{base.get('fingerprint', meta.get('base_fingerprint', '?'))}`"
             f" (family {meta.get('family', '?')}). The adapter records this fingerprint and refuses any other base.",
             "", "## Recipe", "", *recipe_lines(recipe),
             "", "## Adapter", "", *ADAPTER_HEAD]
    for n, m in adapters.items():
        lines += adapter_rows(n, m, results.get("trainable", {}), run_dir / "adapters" / n)
    lines += ["", "## Held-out results", "", *scores_section(results), "", "## Use it", "",
              *usage_lines(str(run_dir), name, bundle=False)]
    return "\n".join(lines) + "\n"


def usage_lines(path: str, adapter: str, bundle: bool) -> list[str]:
    lines = ["```python", "from mmagent import Agent",
             f'agent = Agent.load("{path}")' + ("                # llama.cpp + onnxruntime, no torch" if bundle else ""),
             f'answer = agent.ask("photo.png", "What colour is the circle?", adapter="{adapter}")',
             "print(answer.text)", "```", "", "```bash",
             f"mmagent chat photo.png --model {path}      # streamed answers in the terminal",
             f"mmagent serve {path} --port 8000           # OpenAI-compatible /v1/chat/completions"]
    if bundle:
        lines += [f"mmagent info {path}                      # verify every file, show the self-check",
                  "# the LLM and its LoRA in llama.cpp's own tools (text only: images enter through vision.onnx,",
                  "# which the SDK's edge backend feeds to llama.cpp as embeddings)",
                  f"llama-cli -m {path}/llm.f16.gguf --lora {path}/adapters/{adapter}/llm.lora.gguf"]
    else:
        lines += [f"mmagent export {path} --gguf --onnx --quant q8_0 -o bundles/{adapter}   # to llama.cpp + onnxruntime"]
    return lines + ["```"]


def write_run_card(run_dir: Path, results: dict) -> Path:
    path = Path(run_dir) / "README.md"
    atomic_write_bytes(path, run_card(run_dir, results).encode())
    return path


# ---- bundles -----------------------------------------------------------------------------------
def run_of(path: Path) -> Path | None:
    """The run directory an export input belongs to (a run, or one of its adapters/<name> folders)."""
    path = Path(path)
    if (path / "results.json").is_file():
        return path
    if path.parent.name == "adapters" and (path.parent.parent / "results.json").is_file():
        return path.parent.parent
    return None


def selfcheck_lines(sc: dict) -> list[str]:
    """The self-check's figures from the manifest, each check as one row (those that ran)."""
    if not sc:
        return ["No self-check was recorded in the manifest."]
    lines = ["| check | result |", "|---|---|"]
    tok = sc.get("tokenizer")
    if tok:
        lines.append(f"| tokenizer ids identical to transformers | {tok['strings'] - len(tok['mismatched'])}/"
                     f"{tok['strings']} strings; chat template "
                     f"{'identical' if tok.get('template_identical') else 'differs'}"
                     + ("" if "prompt_identical" not in tok else
                        f"; a whole prompt's ids (BOS included) {'identical' if tok['prompt_identical'] else 'differ'}")
                     + " |")
    vis = sc.get("vision")
    if vis:
        lines += [f"| vision + bridge ONNX vs torch, max abs diff ({name}) | {v:.1e} (tolerance {vis['tolerance']:.0e}) |"
                  for name, v in vis["max_abs_diff"].items()]
    for q, r in [("f16", sc.get("greedy_f16")), *sc.get("quantised", {}).items()]:
        if r:
            lines.append(f"| {q} GGUF greedy tokens identical to torch | {r['identical']}/{r['cases']} cases, "
                         f"first {r['first_tokens']} tokens |")
    return lines


def score_sections(card: str) -> dict[str, list[str]]:
    """Adapter name -> its `### name` section under a card's held-out results (the lines, heading first)."""
    body = card.split("\n## Held-out results\n", 1)[-1].split("\n## ", 1)[0] if "## Held-out results" in card else ""
    sections: dict[str, list[str]] = {}
    for part in body.split("\n### ")[1:]:
        lines = ("### " + part).rstrip("\n").splitlines()
        sections[part.split()[0]] = lines
    return sections


def bundle_card(bundle: Path, manifest: dict, runs: list[Path], previous: str | None = None) -> str:
    """`previous`: the bundle's card before adapters were added to it; the scores of adapters whose runs are
    not among `runs` are kept from it."""
    sizes = manifest.get("sizes", {})
    by_adapter = {}  # adapter name -> (run directory, its results)
    for run in filter(None, map(run_of, runs)):
        for d in (run / "adapters").glob("*"):
            by_adapter.setdefault(d.name, (run, _read(run / "results.json")))
    names = list(manifest["adapters"])
    base = manifest["base"]
    lines = [f"# mmagent bundle: {', '.join(names)} on `{base['ref']}`", "",
             "An edge bundle: the LLM as GGUF for llama.cpp, the vision tower + bridge as ONNX for onnxruntime, "
             "each task adapter whole (LLM LoRA, bridge LoRA, soft prompt). `manifest.json` lists every file "
             "with its sha256.", "", "## Base", "",
             f"`{base['ref']}`, fingerprint `{base['fingerprint']}` (family {manifest['family']}).", "",
             "| component | file | size |", "|---|---|---|"]
    lines += [f"| LLM GGUF {q} | {f} | {sizes.get(f, 0) / 1e6:.1f} MB |" for q, f in manifest.get("llm", {}).items()]
    lines += [f"| vision + bridge ONNX {v} | {manifest['vision'][v]} | {sizes.get(manifest['vision'][v], 0) / 1e6:.1f} MB |"
              for v in ("fp32", "fp16") if v in manifest.get("vision", {})]
    lines += ["", "## Adapters", "", *ADAPTER_HEAD]
    earlier_rows = [ln for ln in (previous or "").split("\n## Adapters\n", 1)[-1].split("\n## ", 1)[0].splitlines()
                    if previous and ln.startswith("| ")]
    for name in names:
        run, results = by_adapter.get(name, (None, {}))
        kept = [ln for ln in earlier_rows if ln.startswith(f"| {name} | ")]
        if run is None and kept:  # added before (`--into`): its rows as the card had them
            lines += kept
            continue
        meta = _read(run / "adapters" / name / "mmagent_adapter.json") if run else {}
        meta = meta or {"parts": {p: [] for p in manifest["adapters"][name]["parts"]},
                        "soft_prompt_tokens": manifest["adapters"][name].get("soft_prompt_tokens", 0)}
        lines += adapter_rows(name, meta, results.get("trainable", {}), run / "adapters" / name if run else None)
    lines += ["", "## Held-out results", "", "From the runs this bundle was exported from (their results.json)."]
    earlier = score_sections(previous or "")
    for name in names:
        run, results = by_adapter.get(name, (None, {}))
        if run is None and name in earlier:  # added before (`--into`): its section as the card had it
            lines += ["", *earlier[name]]
            continue
        lines += ["", f"### {name}" + (f" (run `{run}`)" if run else ""), "",
                  *(scores_section(results) if run else ["The run's results were not available at export."])]
    lines += ["", "## Self-check", "", "The export ran the bundle against the torch model before the bundle "
              "appeared:", "", *selfcheck_lines(manifest.get("selfcheck", {}))]
    for name in names:  # adapters added later (`mmagent export RUN --into BUNDLE`) were checked on their own
        if manifest["adapters"][name].get("selfcheck"):
            lines += ["", f"`{name}`, added later, was checked with the bundle's own LLM and vision graph:", "",
                      *selfcheck_lines(manifest["adapters"][name]["selfcheck"])]
    lines += ["", "## Use it", "", *usage_lines(str(bundle), names[0] if names else "vqa", bundle=True)]
    return "\n".join(lines) + "\n"


def write_bundle_card(staging: Path, manifest: dict, runs: list[Path], final: Path | None = None) -> Path:
    """README.md in a bundle being written (`staging`), or rewritten after adapters were added to it (the
    card there keeps the scores of the adapters exported before); commands name `final`, where it will be."""
    path = Path(staging) / "README.md"
    previous = path.read_text() if path.is_file() else None
    atomic_write_bytes(path, bundle_card(Path(final or staging), manifest, runs, previous).encode())
    return path
