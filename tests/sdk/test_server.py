"""The OpenAI-compatible server over the bundle, in a thread on a free loopback port."""
import base64
import json
import threading
import urllib.error
import urllib.request

import pytest


@pytest.fixture(scope="module")
def agent(bundle):
    from mmagent import Agent
    # one llama.cpp thread: two would spin-wait against other work on this shared 2-core machine
    return Agent.load(bundle, n_threads=1)


@pytest.fixture(scope="module")
def url(agent):
    from mmagent.server import serve
    server = serve(agent, "127.0.0.1", 0)  # port 0: the OS picks a free one
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def data_url(sample_image):
    return "data:image/png;base64," + base64.b64encode(sample_image.read_bytes()).decode()


def request(url: str, path: str, body=None, raw: bytes | None = None):
    """(status, parsed JSON or the raw text) of a GET (no body) or POST."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text, kind = r.status, r.read().decode(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        status, text, kind = e.code, e.read().decode(), e.headers.get("Content-Type")
    return status, (json.loads(text) if kind == "application/json" else text)


def chat(question: str, image_url: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                      {"type": "image_url", "image_url": {"url": image_url}}]}],
            **extra}


def test_models_lists_auto_and_every_adapter(url):
    status, body = request(url, "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["mmagent", "vqa", "caption"]
    status, body = request(url, "/v1/nope")
    assert status == 404 and "/v1/models" in body["error"]["message"]


def test_completion_routes_and_matches_the_sdk(url, agent, data_url, sample_image):
    status, body = request(url, "/v1/chat/completions", chat("is there a circle?", data_url))
    assert status == 200 and body["object"] == "chat.completion" and body["model"] == "mmagent"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == agent.ask(sample_image, "is there a circle?").text  # greedy: same answer
    assert body["mmagent"]["adapter"] == "vqa" and "is a question" in body["mmagent"]["reason"]
    assert body["usage"]["completion_tokens"] > 0


def test_model_name_picks_the_adapter(url, data_url):
    status, body = request(url, "/v1/chat/completions", chat("is there a circle?", data_url, model="caption"))
    assert status == 200 and body["model"] == "caption"
    assert body["mmagent"]["adapter"] == "caption" and body["mmagent"]["reason"] == "chosen by the caller"


def test_stream_sends_chunks_that_join_to_the_answer(url, data_url):
    req = chat("Describe the picture.", data_url)
    status, text = request(url, "/v1/chat/completions", {**req, "stream": True})
    assert status == 200
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = request(url, "/v1/chat/completions", req)[1]["choices"][0]
    assert streamed and streamed == whole["message"]["content"]
    # "length" when the answer hit max_tokens, "stop" when the model ended it: the same either way
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] in ("stop", "length")


def test_a_stream_that_fails_midway_stays_an_event_stream(url, data_url):
    # 3000 new tokens do not fit the edge backend's 1024-position context: generation fails after the
    # stream has begun. Refusing up front (400) or ending the stream cleanly are both fine.
    status, text = request(url, "/v1/chat/completions",
                           chat("is there a circle?", data_url, stream=True, max_tokens=3000))
    if status == 400:
        return
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events[-1]
    assert events[-1] == "data: [DONE]"


def test_concurrent_requests_keep_their_own_adapter(url, agent, data_url, sample_image):
    # the Agent (one llama.cpp context) is shared by the server's threads: each request must get its own
    # adapter and the answer it would get alone
    alone = {m: agent.ask(sample_image, "is there a circle?", adapter=a).text
             for m, a in (("vqa", "vqa"), ("caption", "caption"), ("mmagent", None))}
    results = {}

    def ask(model):
        results[model] = request(url, "/v1/chat/completions", chat("is there a circle?", data_url, model=model))

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("vqa", "caption", "mmagent")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {m: r[1]["mmagent"]["adapter"] for m, r in results.items()} == \
        {"vqa": "vqa", "caption": "caption", "mmagent": "vqa"}
    assert {m: r[1]["choices"][0]["message"]["content"] for m, r in results.items()} == alone


PNG_HEADER_ONLY = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()


@pytest.mark.parametrize("make, message", [  # make: the good image's data URL -> the request body
    (lambda img: b"{not json", "body is not JSON"),
    (lambda img: [1, 2], "the body must be a JSON object"),
    (lambda img: {}, "`messages` must be a non-empty list"),
    (lambda img: {"messages": [{"role": "user", "content": "is there a circle?"}]}, "no image"),
    (lambda img: {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] needs a role"),
    (lambda img: chat("hi", img, model="nope"), "no model `nope`"),
    (lambda img: chat("hi", "data:image/png;base64,!!not base64!!"), "not base64"),
    (lambda img: chat("hi", "https://example.com/cat.png"), "remote image URLs are not fetched"),
    (lambda img: chat("hi", PNG_HEADER_ONLY), "is not a readable image"),
    (lambda img: chat("hi", PNG_HEADER_ONLY, stream=True), "is not a readable image"),  # 400 before the stream
], ids=["not-json", "not-object", "no-messages", "no-image", "bad-role", "unknown-model", "bad-base64",
        "remote-url", "not-an-image", "not-an-image-stream"])
def test_bad_requests_are_400_naming_the_problem(url, data_url, make, message):
    body = make(data_url)
    status, reply = request(url, "/v1/chat/completions", raw=body) if isinstance(body, bytes) else \
        request(url, "/v1/chat/completions", body)
    assert status == 400 and message in reply["error"]["message"]
