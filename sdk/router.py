"""The task router: picks a task adapter from the instruction, and says why.

Rules are plain keyword and shape checks, so a caller can read the reason and override with
`adapter=`. A bundle or run declares which task kinds each adapter serves; the router maps kind ->
adapter and falls back to the first adapter when nothing matches.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mmagent.adapters import require

CAPTION_CUES = re.compile(r"\b(describe|description|caption|summari[sz]e|what(?:'s| is) (?:in|on) (?:the|this) "
                          r"(?:image|picture|photo)|tell me about)\b", re.I)
QUESTION_CUES = re.compile(r"^\s*(what|which|who|whose|where|when|why|how|is|are|does|do|can|could|was|were|"
                           r"will|has|have)\b|\?\s*$", re.I)


@dataclass(frozen=True)
class Route:
    adapter: str | None
    kind: str
    reason: str


def classify(instruction: str) -> tuple[str, str]:
    """(task kind, reason) from the instruction's wording."""
    m = CAPTION_CUES.search(instruction)
    if m:
        return "caption", f"asks for a description ('{m.group(0)}')"
    m = QUESTION_CUES.search(instruction)
    if m:
        return "vqa", f"is a question ('{m.group(0).strip() or '?'}')"
    return "vqa", "no caption cue; treated as a question"


def route(instruction: str, adapters: dict[str, list[str]], override: str | None = None) -> Route:
    """`adapters`: adapter name -> task kinds it was trained on."""
    if override is not None:
        require(override, adapters)
        kinds = adapters[override]
        return Route(override, kinds[0] if len(kinds) == 1 else classify(instruction)[0], "chosen by the caller")
    kind, why = classify(instruction)
    for name, kinds in adapters.items():
        if kind in kinds:
            return Route(name, kind, f"the instruction {why}: adapter `{name}` serves {kind}")
    if adapters:
        name = next(iter(adapters))
        return Route(name, kind, f"the instruction {why}, but no adapter serves {kind}; using `{name}`")
    return Route(None, kind, "no adapters: the base model answers")
