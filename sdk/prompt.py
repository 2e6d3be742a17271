"""The prompt layout, in one place for training and every backend: the system prompt, the default
instruction of each task kind, and where the image placeholders go in a chat."""
from __future__ import annotations

DEFAULT_SYSTEM = "You look at one image and answer briefly."
CAPTION_INSTRUCTION = "Describe the image."
VQA_INSTRUCTION = "Answer the question with a single word or number."
MATCH_INSTRUCTION = "Does this caption describe the image? Answer yes or no."


def default_instruction(kind: str) -> str:
    return {"caption": CAPTION_INSTRUCTION, "match": MATCH_INSTRUCTION}.get(kind, VQA_INSTRUCTION)


def check_question(question, kind: str) -> None:
    """Kinds that answer a question (vqa, match) refuse an empty one; a caption ignores the question."""
    if kind == "caption":
        return
    if not isinstance(question, str):
        raise TypeError(f"the question must be text (str), got {type(question).__name__}")
    if not question.strip():
        raise ValueError(f"the question is empty; a `{kind}` request needs a question about the image "
                         "(e.g. 'What colour is the circle?'), or ask for a description with adapter='caption'")


def prompt_parts(question: str, kind: str, instructions: dict) -> tuple[str, str]:
    """(instruction, input) in the form the adapter was trained on; an empty question is refused for the
    kinds that take one."""
    check_question(question, kind)
    instruction = instructions.get(kind) or default_instruction(kind)
    return (instruction, "") if kind == "caption" else (instruction, question)


def user_text(instruction: str, input: str = "") -> str:
    """The user turn's text (without image placeholders): what the LLM reads after the image, and what
    InstructBLIP's Q-Former reads as the instruction."""
    return instruction + (("\n" + input) if input else "")


def stop_ids(prompt: dict) -> frozenset[int] | None:
    """The token ids an answer ends at, as a bundle's manifest records them (`prompt.stop_ids`, written from
    the tokenizer torch decodes with); None for a manifest without them (llama.cpp's own set then)."""
    ids = prompt.get("stop_ids", [prompt["eos_token_id"]] if prompt.get("eos_token_id") is not None else None)
    return frozenset(ids) if ids is not None else None


def chat_prompt(tokenizer, system: str, placeholder: str, instruction: str, input: str = "", history=()) -> str:
    """The one prompt layout: system, then the image placeholders at the start of the first user turn.
    `tokenizer` is anything with `chat_template` and `apply_chat_template` (a HF tokenizer, the edge
    backend's template renderer)."""
    user = user_text(instruction, input)
    messages = [{"role": "system", "content": system}]
    for i, (q, a) in enumerate(history):
        messages += [{"role": "user", "content": (placeholder if i == 0 else "") + q},
                     {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": ("" if history else placeholder) + user})
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Checkpoints without a chat template (BLIP-2 OPT) use the "Question: ... Answer:" form they were tuned on.
    turns = "".join(f"Question: {q} Answer: {a} " for q, a in history)
    return f"{placeholder}{turns}Question: {user} Answer:"


def prompt_ids(encode, text: str, image_token: str, bos: int | None, image_first: bool) -> list[int]:
    """A prompt's token ids as the checkpoint's tokenizer and processor make them. `encode` tokenises text with
    no special tokens added; `bos` is the id the checkpoint's tokenizer starts a text with (transformers'
    add_special_tokens=True: LLaMA-2 / Vicuna / LLaVA-1.5 `<s>`, OPT `</s>`), None for one that adds none
    (SmolLM2). LLaVA's processor tokenises the whole prompt, so BOS comes first; BLIP-2's and InstructBLIP's
    (`image_first`) put the image tokens in front of the tokenised text, so there BOS follows the leading
    placeholders and the text after them is tokenised as a text of its own. A text that already starts
    with BOS (a chat template that renders it) gets no second one."""
    cut = 0
    while image_first and image_token and text.startswith(image_token, cut):
        cut += len(image_token)
    ids = encode(text[cut:])
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    return (encode(text[:cut]) if cut else []) + ids
