"""The OpenAI-compatible server over the bundle, driven by the official `openai` client (raw HTTP only where
the client cannot send the request: bodies that are not JSON, a client that never reads, no API key)."""
import base64
import io
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI

KEY = "test-key"
LIMITS = dict(max_body_bytes=256 << 10, max_image_pixels=100 * 100, max_tokens=900)


@pytest.fixture(scope="module")
def agent(bundle):
    from mmagent import Agent
    # two lanes of one llama.cpp thread each: the two cores of this machine
    agent = Agent.load(bundle, n_threads=1, lanes=2)
    yield agent
    agent.close()


@pytest.fixture(scope="module")
def server(agent):
    from mmagent.server import Running, Settings
    with Running(agent, settings=Settings(api_key=KEY, **LIMITS)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def data_url(sample_image):
    return "data:image/png;base64," + base64.b64encode(sample_image.read_bytes()).decode()


def messages(question: str, image_url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def ask(client, data_url, question="is there a circle?", model="mmagent", **extra):
    return client.chat.completions.create(model=model, messages=messages(question, data_url), **extra)


def raw(url: str, path: str, body=None, data: bytes | None = None, key: str | None = KEY, method=None):
    """(status, parsed JSON or text, headers) of a request sent without the openai client."""
    data = data if data is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text, h = r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        status, text, h = e.code, e.read().decode(), e.headers
    return status, (json.loads(text) if h.get("Content-Type") == "application/json" else text), h


def wait_idle(server, seconds: float = 30) -> None:
    """Until no request is admitted (running or waiting) on the server."""
    end = time.monotonic() + seconds
    while raw(server.url, "/health", key=None)[1]["admitted"] and time.monotonic() < end:
        time.sleep(0.02)
    assert raw(server.url, "/health", key=None)[1]["admitted"] == 0


# ---- the plain request ------------------------------------------------------------------------------------

def test_completion_matches_the_sdk_with_usage_and_request_id(client, agent, data_url, sample_image, caplog):
    with caplog.at_level(logging.INFO, logger="mmagent.server"):
        reply = client.chat.completions.with_raw_response.create(model="mmagent",
                                                                 messages=messages("is there a circle?", data_url))
        rid = reply.headers["x-request-id"]
        logged = lambda: any(rid in r.getMessage() and " 200 " in r.getMessage() for r in caplog.records)  # noqa: E731
        for _ in range(100):  # the line is written once the response has gone out
            if not logged():
                time.sleep(0.01)
        assert logged()
    body = reply.parse()
    alone = agent.ask(sample_image, "is there a circle?")
    assert body.choices[0].message.content == alone.text  # greedy by default: the same answer
    assert body.choices[0].message.role == "assistant" and body.model == "mmagent"
    assert body.usage.prompt_tokens == alone.prompt_tokens > 16  # image rows and the chat template count
    assert body.usage.completion_tokens == len(alone.tokens) > 0
    assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
    assert body.id == "chatcmpl-" + rid.removeprefix("req_")


def test_models_and_model_name_picks_the_adapter(client, data_url):
    assert [m.id for m in client.models.list()] == ["mmagent", "vqa", "caption"]
    assert client.models.retrieve("caption").id == "caption"
    body = ask(client, data_url, model="caption")
    assert body.model == "caption" and body.model_extra["mmagent"]["adapter"] == "caption"
    assert body.model_extra["mmagent"]["reason"] == "chosen by the caller"
    with pytest.raises(openai.NotFoundError, match="no model `nope`"):
        ask(client, data_url, model="nope")


def test_unknown_fields_are_ignored_and_n_other_than_1_is_refused(client, data_url):
    plain = ask(client, data_url).choices[0].message.content
    extra = ask(client, data_url, n=1, frequency_penalty=0.5, user="me", extra_body={"not_a_field": [1]})
    assert extra.choices[0].message.content == plain
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, data_url, n=2)
    assert e.value.body["param"] == "n" and "must be 1" in e.value.body["message"]


# ---- decoding options ------------------------------------------------------------------------------------

def test_seed_same_answer_other_seed_other_answer(client, data_url):
    def sampled(seed):
        return ask(client, data_url, model="caption", temperature=2.0, seed=seed, max_tokens=12).choices[0].message.content

    assert sampled(1) == sampled(1)
    assert len({sampled(s) for s in (1, 2, 3)}) > 1  # at temperature 2 a tiny model's answers differ by seed


def test_a_tiny_top_p_keeps_only_the_greedy_token(client, data_url):
    greedy = ask(client, data_url, model="caption", max_tokens=12).choices[0].message.content
    assert ask(client, data_url, model="caption", max_tokens=12, temperature=1.5, top_p=1e-6,
               seed=5).choices[0].message.content == greedy


@pytest.fixture(scope="module")
def sampled(client, data_url) -> dict:
    """Request fields whose answer (sampled at temperature 2, a fixed seed) runs to 12 tokens, every time."""
    for seed in range(20):
        fields = dict(model="caption", temperature=2.0, seed=seed)
        if ask(client, data_url, max_tokens=12, **fields).usage.completion_tokens == 12:
            return fields
    pytest.fail("no seed of 20 gave a 12-token answer")


def test_max_tokens_and_max_completion_tokens(client, data_url, sampled):
    full = ask(client, data_url, max_tokens=12, **sampled)
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    assert ask(client, data_url, max_tokens=2, **sampled).usage.completion_tokens == 2
    both = ask(client, data_url, max_tokens=12, max_completion_tokens=1, **sampled)  # the newer name wins
    assert both.usage.completion_tokens == 1
    with pytest.raises(openai.BadRequestError, match="from 1 to 900"):
        ask(client, data_url, max_tokens=901)


def test_stop_ends_the_answer_before_the_stop_string(client, data_url, sampled):
    full = ask(client, data_url, max_tokens=12, **sampled).choices[0].message.content
    stop = full[len(full) // 2:][:2]
    expected = full[:full.find(stop)].rstrip()
    cut = ask(client, data_url, max_tokens=12, stop=[stop, "never appears"], **sampled)
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 12
    streamed = ask(client, data_url, max_tokens=12, stop=stop, stream=True, **sampled)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_stream_joins_to_the_answer_and_reports_usage(client, data_url):
    whole = ask(client, data_url, "Describe the picture.")
    chunks = list(ask(client, data_url, "Describe the picture.", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


# ---- security and limits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                          ("GET", "/v1/adapters"), ("DELETE", "/v1/adapters/vqa"),
                                          ("GET", "/no/such/route")])
def test_every_route_but_health_needs_the_key(server, method, path):
    for key in (None, "wrong"):
        status, body, headers = raw(server.url, path, {} if method == "POST" else None, key=key, method=method)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, key)
        assert headers["x-request-id"].startswith("req_")
    assert raw(server.url, "/health", key=None)[0] == 200


def test_the_client_reports_a_wrong_key(server):
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_route_is_an_openai_shaped_404(server):
    status, body, _ = raw(server.url, "/v1/nope")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def png(width: int, height: int) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_limits_body_413_pixels_413(server, client):
    status, body, _ = raw(server.url, "/v1/chat/completions", data=b" " * (300 << 10))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, png(101, 100))
    assert e.value.status_code == 413 and e.value.body["code"] == "image_too_large"
    assert "10,100 pixels" in e.value.body["message"]


PNG_HEADER_ONLY = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()


@pytest.mark.parametrize("make, message", [  # make: the good image's data URL -> the request body
    (lambda img: b"{not json", "body is not JSON"),
    (lambda img: [1, 2], "the body must be a JSON object"),
    (lambda img: {}, "`messages` must be a non-empty list"),
    (lambda img: {"messages": [{"role": "user", "content": "is there a circle?"}]}, "no image"),
    (lambda img: {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] needs a role"),
    (lambda img: {"messages": messages("hi", "data:image/png;base64,!!not base64!!")}, "not base64"),
    (lambda img: {"messages": messages("hi", "https://example.com/cat.png")}, "remote image URLs are not fetched"),
    (lambda img: {"messages": messages("hi", "/etc/passwd")}, "local paths need"),
    (lambda img: {"messages": messages("hi", PNG_HEADER_ONLY)}, "is not a readable image"),
    (lambda img: {"messages": messages("hi", PNG_HEADER_ONLY), "stream": True}, "is not a readable image"),
    (lambda img: {"messages": messages("hi", img), "temperature": 3}, "`temperature` must be from 0 to 2"),
    (lambda img: {"messages": messages("hi", img), "top_p": 0}, "`top_p` must be above 0"),
    (lambda img: {"messages": messages("hi", img), "seed": "x"}, "`seed` must be a whole number"),
    (lambda img: {"messages": messages("hi", img), "stop": ["a", "b", "c", "d", "e"]}, "up to 4"),
    (lambda img: {"messages": messages("hi", img), "max_tokens": 0}, "`max_tokens` must be from 1"),
    (lambda img: {"messages": messages("x " * 2000, img)}, "context holds"),
], ids=["not-json", "not-object", "no-messages", "no-image", "bad-role", "bad-base64", "remote-url", "local-path",
        "not-an-image", "not-an-image-stream", "temperature", "top_p", "seed", "stop", "max_tokens", "too-long"])
def test_bad_requests_are_400_naming_the_problem(server, data_url, make, message):
    body = make(data_url)
    status, reply, _ = raw(server.url, "/v1/chat/completions", data=body if isinstance(body, bytes) else None,
                           body=None if isinstance(body, bytes) else body)
    assert status == 400 and message in reply["error"]["message"], reply
    assert reply["error"]["type"] == "invalid_request_error"


# ---- parallel requests, the queue, time ------------------------------------------------------------------

def test_concurrent_requests_keep_their_own_adapter(client, agent, data_url, sample_image):
    cases = [("vqa", "is there a circle?"), ("caption", "is there a circle?"), ("mmagent", "Describe it."),
             ("vqa", "how many squares?"), ("caption", "Describe it."), ("mmagent", "is there a square?")]
    alone = {c: agent.ask(sample_image, c[1], adapter=None if c[0] == "mmagent" else c[0]).text for c in cases}
    results = {}

    def one(case):
        results[case] = ask(client, data_url, case[1], model=case[0]).choices[0].message.content

    threads = [threading.Thread(target=one, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == alone


def test_a_full_queue_answers_429_and_the_rest_are_right(agent, data_url, sample_image):
    from mmagent.server import Running, Settings
    alone = agent.ask(sample_image, "Describe it.", adapter="caption", max_new_tokens=48).text
    with Running(agent, settings=Settings(queue=1)) as busy:  # 2 lanes + 1 waiting: the 4th request and on get 429
        c = OpenAI(base_url=busy.url + "/v1", api_key="none", max_retries=0, timeout=60)
        go, outcomes = threading.Barrier(8), []

        def one():
            go.wait()
            try:
                outcomes.append(ask(c, data_url, "Describe it.", model="caption").choices[0].message.content)
            except openai.RateLimitError as e:
                outcomes.append(e.body["code"])

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert "rate_limit_exceeded" in outcomes and alone in outcomes
    assert set(outcomes) == {"rate_limit_exceeded", alone}


class SlowAgent:
    """A stand-in for Agent whose answers take `pieces` x `every` seconds: the server's timing machinery
    (deadline, a client that leaves, shutdown) tested without depending on how long a model talks."""
    lanes, adapters = 1, []

    def __init__(self, every: float = 0.02):
        self.every, self.cancelled = every, threading.Event()

    def available_adapters(self):
        return []

    def ask(self, image, question, adapter, max_new_tokens, history=(), on_text=None, *, cancel=None, **_):
        from mmagent.agent import Answer
        from mmagent.backends import Cancelled
        for _ in range(max_new_tokens):
            if cancel.wait(self.every):
                self.cancelled.set()
                raise Cancelled
            if on_text:
                on_text("x")
        return Answer("x" * max_new_tokens, None, "slow", [0] * max_new_tokens, {}, 3, "length")


def test_the_per_request_timeout_is_504_and_frees_the_lane(data_url):
    from mmagent.server import Running, Settings
    slow = SlowAgent()
    with Running(slow, settings=Settings(timeout_s=0.3)) as server:
        c = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        t = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:  # 100 pieces x 20 ms: 2 s
            ask(c, data_url, max_tokens=100)
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout" and time.monotonic() - t < 1.5
        assert slow.cancelled.is_set()  # the generation itself was stopped
        with pytest.raises(openai.APIError, match="timeout"):
            list(ask(c, data_url, max_tokens=100, stream=True))
        wait_idle(server, 1)


def test_cancel_stops_a_generation_in_the_sdk(agent, sample_image):
    from mmagent.backends import Cancelled
    gone = threading.Event()
    gone.set()
    with pytest.raises(Cancelled):
        agent.ask(sample_image, "Describe it.", adapter="caption", cancel=gone)


def test_a_client_that_never_reads_blocks_nobody(server, client, data_url):
    body = json.dumps({"model": "caption", "messages": messages("Describe it.", data_url), "stream": True,
                       "max_tokens": 900, "temperature": 2.0, "seed": 1}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sleeper:  # sends, then never reads a byte
        sleeper.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        for _ in range(4):
            assert ask(client, data_url).choices[0].message.content
        wait_idle(server)  # its whole answer was generated and handed to the event loop: no lane held


def test_a_client_that_leaves_mid_stream_stops_its_generation(data_url):
    from mmagent.server import Running
    slow = SlowAgent()
    with Running(slow) as server:
        c = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = ask(c, data_url, max_tokens=200, stream=True)  # 4 s of answer
        next(iter(stream))
        stream.close()
        assert slow.cancelled.wait(2)
        wait_idle(server, 1)


def test_graceful_shutdown_finishes_requests_in_flight(data_url):
    from mmagent.server import Running
    running = Running(SlowAgent())
    c = OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=60)
    got = []
    worker = threading.Thread(target=lambda: got.append(ask(c, data_url, max_tokens=40)))  # 0.8 s
    worker.start()
    end = time.monotonic() + 10
    while not raw(running.url, "/health", key=None)[1]["admitted"] and time.monotonic() < end:
        time.sleep(0.005)
    running.stop()
    worker.join(timeout=60)
    assert got and got[0].choices[0].message.content == "x" * 40
    with pytest.raises(openai.APIConnectionError):
        ask(c, data_url)


# ---- adapters on the live server ---------------------------------------------------------------------------

def test_adapter_routes_take_names_only(server):
    status, body, _ = raw(server.url, "/v1/adapters")
    assert status == 200 and {a["id"]: a["loaded"] for a in body["data"]} == {"vqa": True, "caption": True}
    for name, status_code in (("../../etc/passwd", 400), ("/tmp/x", 400), ("nope", 404), ("vqa", 409)):
        status, body, _ = raw(server.url, "/v1/adapters", {"name": name})
        assert status == status_code and body["error"]["param"] == "name", (name, body)
    assert raw(server.url, "/v1/adapters/nope", method="DELETE")[0] == 404
