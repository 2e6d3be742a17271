"""`mmagent info`: what a bundle or a run directory holds, as tables, after verifying it (describe raises
DamagedBundle listing every problem instead of describing a damaged bundle)."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from mmagent.export.bundle import describe


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def show(path: Path, console) -> None:
    d = describe(path)
    if d["kind"] == "run":
        table = Table(title=f"run {path}")
        for col in ("adapter", "tasks", "adapts", "soft prompt", "base"):
            table.add_column(col)
        for name, m in d["adapters"].items():
            parts = ", ".join(f"{p} ({', '.join(v)})" for p, v in m["parts"].items())
            table.add_row(name, ", ".join(m["tasks"]), parts, str(m.get("soft_prompt_tokens", 0)),
                          f"{m['base_ref']} {m['base_fingerprint']}")
        console.print(table)
        for side, scores in d["results"].items():  # the evaluations: task -> metrics (not e.g. `trainable`)
            tasks = {t: m for t, m in scores.items() if isinstance(m, dict)} if isinstance(scores, dict) else {}
            if tasks:
                console.print(f"{side}: " + "; ".join(f"{t}: " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()
                              if isinstance(v, float)) for t, m in tasks.items()))
        return
    m, sizes = d["manifest"], d["sizes"]
    console.print(f"bundle {path}: family {m['family']}, base {m['base']['ref']} ({m['base']['fingerprint']}), "
                  f"exported in {m.get('export_seconds')} s")
    console.print(f"verified: all {len(m['files'])} files present, sha256 "
                  + ("and sizes " if m.get("sizes") else "") + "as in the manifest")
    comp = Table(title="components")
    for col in ("component", "file", "size"):
        comp.add_column(col)
    for q, f in m["llm"].items():
        comp.add_row(f"LLM GGUF {q}", f, _mb(sizes.get(f, 0)))
    for v in ("fp32", "fp16"):
        if v in m["vision"]:
            comp.add_row(f"vision+bridge ONNX {v}", m["vision"][v], _mb(sizes.get(m["vision"][v], 0)))
    console.print(comp)
    ad = Table(title="adapters")
    for col in ("adapter", "tasks", "adapts", "files"):
        ad.add_column(col)
    for name, a in m["adapters"].items():
        ad.add_row(name, ", ".join(a["kinds"]), ", ".join(a["parts"]) + (f", soft prompt {a['soft_prompt_tokens']}"
                   if a["soft_prompt_tokens"] else ""), ", ".join(f"{k} {_mb(sizes.get(f, 0))}" for k, f in a["files"].items()))
    console.print(ad)
    sc = m.get("selfcheck")
    if sc:
        console.print("self-check: " + "; ".join(selfcheck_figures(sc)))


def selfcheck_figures(sc: dict) -> list[str]:
    """One phrase per part the self-check compared with torch (each export mode checks what it wrote)."""
    out = []
    if "tokenizer" in sc:
        t = sc["tokenizer"]
        out.append(f"tokenizer {t['strings'] - len(t['mismatched'])}/{t['strings']} identical")
    if "vision" in sc:
        out.append(f"vision max |diff| {max(sc['vision']['max_abs_diff'].values()):.1e} "
                   f"(tol {sc['vision']['tolerance']:.0e})")
    if "greedy_f16" in sc:
        g = sc["greedy_f16"]
        out.append(f"f16 greedy {g['identical']}/{g['cases']} identical over {g['first_tokens']} tokens"
                   + "".join(f"; {q} {r['identical']}/{r['cases']}" for q, r in sc.get("quantised", {}).items()))
    out += [f"merged {n} greedy {g['identical']}/{g['cases']} identical" for n, g in sc.get("merged", {}).items()]
    return out
