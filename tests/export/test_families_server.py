"""Each real family served through the OpenAI-compatible server (`mmagent serve`): InstructBLIP and LLaVA-1.5
from their edge bundles, BLIP-2 + OPT and BLIP-2 + Flan-T5 (which the edge refuses) from their run directories
on the torch backend. The tiny checkpoints, runs and bundles are the export tests' (tests/export/conftest.py)."""
import base64
import io
import json
import random
import urllib.error
import urllib.request
from dataclasses import dataclass

import openai
import pytest
from openai import OpenAI

from mmagent import Agent

pytestmark = pytest.mark.slow

# family -> (the session fixture that trained it, served from: "edge" (its bundle) or "torch" (its run),
# the adapter's name, a question of the adapter's kind)
FAMILIES = {
    "instructblip": ("instructblip_bundle", "edge", "vqa", "what colour is the circle?"),
    "llava-1.5": ("llava_export", "edge", "vqa", "what colour is the circle?"),
    "blip2-opt": ("blip2_opt_run", "torch", "vqa", "how many squares?"),
    "blip2-flan-t5": ("blip2_t5_run", "torch", "cap", "what is there?"),
}
TOKENS = 8


@dataclass
class Served:
    agent: Agent
    url: str
    client: OpenAI
    adapter: str
    question: str


@pytest.fixture(scope="module")
def png() -> bytes:
    from mmagent.train.data.shapes import draw_scene, sample_scene
    buf = io.BytesIO()
    draw_scene(sample_scene(random.Random(3)), 32).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request):
    from mmagent.server import Running
    fixture, backend, adapter, question = FAMILIES[request.param]
    trained = request.getfixturevalue(fixture)
    path = trained if backend == "torch" else trained[1]  # a run directory, or (run, bundle)
    agent = Agent.load(path, backend=backend)
    try:
        with Running(agent) as running:
            client = OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=120)
            yield Served(agent, running.url, client, adapter, question)
    finally:
        agent.close()


def ask(served: Served, png: bytes, model: str, question: str | None = None):
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return served.client.chat.completions.create(model=model, max_tokens=TOKENS, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question or served.question}]}])


def post(url: str, path: str, body: dict | None = None, method: str = "POST") -> tuple[int, dict]:
    req = urllib.request.Request(url + path, json.dumps(body).encode() if body is not None else None,
                                 {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def sdk(served: Served, png: bytes, adapter: str | None):
    return served.agent.ask(png, served.question, adapter=adapter, max_new_tokens=TOKENS)


def test_the_servers_answer_is_the_sdks(served, png):
    """Greedy (the server's default), the adapter named by `model` or chosen by the router: what Agent.ask gives."""
    alone = sdk(served, png, served.adapter)
    assert alone.tokens  # the family's backend answered at all
    for model in (served.adapter, "mmagent"):  # one adapter: the router picks it too
        reply = ask(served, png, model)
        assert reply.choices[0].message.content == alone.text, model
        assert reply.usage.completion_tokens == len(alone.tokens) and reply.usage.prompt_tokens == alone.prompt_tokens
        assert reply.model_extra["mmagent"]["adapter"] == served.adapter


def test_the_adapter_a_request_names_changes_the_answer_as_in_the_sdk(served, png):
    """The adapter unloaded over the server's API, the base model answers what the SDK's base does (not the
    adapter's answer); naming the gone adapter is a 404; loaded again by name, its answer comes back."""
    adapted = sdk(served, png, served.adapter)
    with_adapter = ask(served, png, served.adapter).choices[0].message.content
    assert post(served.url, f"/v1/adapters/{served.adapter}", method="DELETE")[0] == 200
    try:
        base = sdk(served, png, None)
        assert base.adapter is None and base.tokens != adapted.tokens  # the adapter changes this answer
        reply = ask(served, png, "mmagent")
        assert reply.choices[0].message.content == base.text != with_adapter
        assert reply.model_extra["mmagent"]["adapter"] is None
        with pytest.raises(openai.NotFoundError, match=f"no model `{served.adapter}`"):
            ask(served, png, served.adapter)
    finally:
        assert post(served.url, "/v1/adapters", {"name": served.adapter})[0] == 200
    assert ask(served, png, served.adapter).choices[0].message.content == with_adapter


def test_malformed_requests_get_a_4xx_naming_the_problem(served, png):
    status, body = post(served.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "no image" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="no model `nope`"):
        ask(served, png, "nope")
    # longer than the family's context (the torch model's positions, or the edge's llama.cpp context): refused
    # before any generation, by the backend that serves it
    with pytest.raises(openai.BadRequestError) as e:
        ask(served, png, served.adapter, "is it " * 1200 + "?")
    assert e.value.body["code"] == "context_length_exceeded" and "context holds" in e.value.body["message"]
