"""An OpenAI-compatible server over an Agent, on FastAPI + uvicorn (the stack of llama-cpp-python's own server).

    mmagent serve bundle/ --port 8000 --lanes 2 --api-key KEY

Routes: POST /v1/chat/completions (stream or not), GET /v1/models, GET /v1/adapters, POST /v1/adapters
{"name": ...} (loads an adapter the bundle's manifest lists: names only, never paths), DELETE
/v1/adapters/{name}, and GET /health (the only route without the API key).

The image comes as an `image_url` content part (a data: URL; local paths only with `allow_local_files`);
the model name picks the adapter (`mmagent` = the router chooses). Requests run on the agent's lanes
(llama.cpp contexts) in threads; up to `queue` more wait, and a request beyond that gets 429. Every
answer is built in its thread and handed over whole or piece by piece, so a slow or vanished client
never holds a lane. Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

AUTO = "mmagent"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
log = logging.getLogger("mmagent.server")


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None  # every route but /health needs `Authorization: Bearer <key>`
    allow_local_files: bool = False  # image URLs that are paths on this machine
    max_body_bytes: int = 16 << 20  # 413 above
    max_image_pixels: int = 16_000_000  # 413 above (width x height, read from the header before decoding)
    max_tokens: int = 1024  # the most new tokens a request may ask for (400 above)
    default_max_tokens: int = 48  # when a request names none
    queue: int = 16  # requests that may wait for a lane; one more gets 429
    timeout_s: float = 120.0  # per request, waiting included: 504 after it (an error event when streaming)


class RequestError(ValueError):
    """A request the server refuses: the HTTP status and an OpenAI-shaped error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- the request --------------------------------------------------------------------------------------------

def parse_chat(body: dict, allow_local_files: bool = False) -> tuple[object, str, list[tuple[str, str]]]:
    """(image, last user text, earlier (user, assistant) turns) from an OpenAI chat request."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list", param="messages")
    image, turns, pending = None, [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}] needs a role of system, user or assistant", param=f"messages[{i}].role")
        text, img = _content(m.get("content"), i, allow_local_files)
        image = img or image
        if m["role"] == "user":
            pending = text
        elif m["role"] == "assistant" and pending is not None:
            turns.append((pending, text))
            pending = None
    if pending is None:
        raise RequestError("the last message must come from the user", param="messages")
    if image is None:
        raise RequestError("no image: add a content part {\"type\": \"image_url\", \"image_url\": {\"url\": ...}}",
                           param="messages")
    return image, pending, turns


def _content(content, i: int, allow_local_files: bool) -> tuple[str, object]:
    if content is None or isinstance(content, str):
        return content or "", None
    if not isinstance(content, list):
        raise RequestError(f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content")
    texts, image = [], None
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url", "") if isinstance(url, dict) else url
            image = _image_from_url(str(url or ""), i, allow_local_files)
        else:
            raise RequestError(f"messages[{i}].content has a part of type {kind!r}; use text or image_url",
                               param=f"messages[{i}].content")
    return " ".join(texts), image


def _image_from_url(url: str, i: int, allow_local_files: bool):
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True)
        except (IndexError, ValueError) as e:
            raise RequestError(f"messages[{i}] has a data URL that is not base64 ({e})", param=f"messages[{i}]") from e
    if url.startswith(("http://", "https://")):
        raise RequestError("remote image URLs are not fetched; send the image as a data: URL", param=f"messages[{i}]")
    if not allow_local_files:  # else any client could make the server open files on its disk
        raise RequestError("send the image as a data: URL (local paths need `mmagent serve --allow-local-files`)",
                           param=f"messages[{i}]")
    return url.removeprefix("file://")


def _number(body: dict, key: str, default, kinds=(int, float)):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(f"`{key}` must be a {'whole ' if kinds == (int,) else ''}number, got {value!r}", param=key)
    return value


def parse_options(body: dict, settings: Settings) -> dict:
    """The decoding options of an OpenAI request, checked; unknown fields are ignored, as OpenAI does."""
    n = _number(body, "n", 1, (int,))
    if n != 1:
        raise RequestError(f"`n` must be 1 (got {n}): this server returns one choice; send n requests (with "
                           "different seeds) for several", param="n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, settings.default_max_tokens, (int,))
    if not 1 <= max_tokens <= settings.max_tokens:
        raise RequestError(f"`{key}` must be from 1 to {settings.max_tokens} (this server's limit), got {max_tokens}",
                           param=key)
    temperature = _number(body, "temperature", 0.0)  # absent: greedy (OpenAI's default would be 1)
    top_p = _number(body, "top_p", 1.0)
    seed = _number(body, "seed", None, (int,))
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("`stop` must be a string or a list of up to 4 non-empty strings", param="stop")
    if not 0 <= temperature <= 2:
        raise RequestError(f"`temperature` must be from 0 to 2, got {temperature}", param="temperature")
    if not 0 < top_p <= 1:
        raise RequestError(f"`top_p` must be above 0 and at most 1, got {top_p}", param="top_p")
    options = body.get("stream_options") or {}
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop,
            "stream": bool(body.get("stream")), "include_usage": bool(isinstance(options, dict)
                                                                      and options.get("include_usage"))}


def decode_image(image, max_pixels: int):
    """The picture, or 413 over the pixel limit (read from the header), 400 if it is not an image."""
    from PIL import Image

    from mmagent.images import ImageError, load_image
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as header:
            w, h = header.size
    except (OSError, ValueError, Image.DecompressionBombError):
        w = h = 0  # load_image says what is wrong with it
    if w * h > max_pixels:
        raise RequestError(f"the image is {w}x{h} = {w * h:,} pixels, over this server's limit of {max_pixels:,}; "
                           "downscale it", status=413, param="messages", code="image_too_large")
    try:
        return load_image(image, max_pixels)
    except ImageError as e:
        raise RequestError(str(e), param="messages", code="invalid_image") from e


def completion(answer, model: str, cid: str, created: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": answer.finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": answer.text}}],
            "usage": usage(answer),
            "mmagent": {"adapter": answer.adapter, "reason": answer.reason, "timings": answer.timings}}


def usage(answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": len(answer.tokens),
            "total_tokens": answer.prompt_tokens + len(answer.tokens)}


def chunk(cid: str, created: int, model: str, delta: dict, finish=None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


# ---- lanes and the queue ------------------------------------------------------------------------------------

class Lanes:
    """The agent's lanes as seen from the event loop: at most `lanes` generations run (each in a thread of
    its own), at most `queue` more wait; one more is refused with 429."""

    def __init__(self, lanes: int, queue: int):
        self.lanes, self.capacity = lanes, lanes + queue
        self.admitted = 0
        self._free: asyncio.Semaphore | None = None
        self.pool = ThreadPoolExecutor(lanes, thread_name_prefix="mmagent-lane")

    def admit(self) -> None:
        if self.admitted >= self.capacity:
            raise RequestError(f"the server is busy: {self.lanes} request(s) running and {self.capacity - self.lanes} "
                               "waiting; retry after a moment", status=429, code="rate_limit_exceeded",
                               kind="requests")
        self.admitted += 1

    def leave(self) -> None:
        self.admitted -= 1

    async def start(self, work, deadline: float) -> asyncio.Future:
        """Wait for a free lane until `deadline`, then run `work` in a thread; the lane is given back, and the
        admission ended, when the work ends (not when its client is done reading)."""
        self._free = self._free or asyncio.Semaphore(self.lanes)
        try:
            await asyncio.wait_for(self._free.acquire(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.leave()
            raise RequestError("timed out waiting for a free lane; retry later", status=504, code="timeout",
                               kind="timeout") from None
        except BaseException:
            self.leave()
            raise
        future = asyncio.get_running_loop().run_in_executor(self.pool, work)
        future.add_done_callback(lambda _: (self._free.release(), self.leave()))
        return future


# ---- the app ------------------------------------------------------------------------------------------------

def create_app(agent, settings: Settings | None = None):
    """The FastAPI app serving `agent`. Closing the app (its lifespan) waits for running generations."""
    settings = settings or Settings()
    lanes = Lanes(getattr(agent, "lanes", 1), settings.queue)

    @asynccontextmanager
    async def lifespan(app):
        yield
        lanes.pool.shutdown(wait=True)  # uvicorn has finished the in-flight requests; their threads end here

    app = FastAPI(title="mmagent", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lanes = lanes
    app.add_middleware(Gate, api_key=settings.api_key)  # request ids, the key, the log line

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = (f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/chat/completions, "
                   "/v1/adapters" if e.status_code == 404 else str(e.detail))
        return JSONResponse(error_body(message, code="not_found" if e.status_code == 404 else None), e.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        log.exception("%s failed", request.state.request_id)
        return JSONResponse(error_body(f"internal error: {e}", "server_error"), 500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "lanes": lanes.lanes, "admitted": lanes.admitted, "adapters": agent.adapters}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in [AUTO, *agent.adapters]]}

    @app.get("/v1/models/{model}")
    async def one_model(model: str):
        if model != AUTO and model not in agent.adapters:
            raise unknown_model(model, agent)
        return model_card(model)

    @app.get("/v1/adapters")
    async def adapters():
        loaded = agent.adapters
        names = list(dict.fromkeys([*loaded, *agent.available_adapters()]))
        return {"object": "list", "data": [{"id": n, "object": "adapter", "loaded": n in loaded} for n in names]}

    @app.post("/v1/adapters")
    async def load(request: Request):
        body = await read_json(request, settings.max_body_bytes)
        name = body.get("name")
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise RequestError("give the adapter's name, e.g. {\"name\": \"caption\"}: letters, digits, `_.-` (names "
                               "the bundle's manifest lists; never a path)", param="name")
        if name in agent.adapters:
            raise RequestError(f"adapter `{name}` is already loaded", status=409, param="name", code="conflict")
        if name not in agent.available_adapters():
            raise RequestError(f"the bundle lists no adapter `{name}`; it lists: "
                               f"{', '.join(agent.available_adapters()) or 'none'} (add one with `mmagent export RUN "
                               "--into BUNDLE`)", status=404, param="name", code="adapter_not_found")
        try:
            await asyncio.to_thread(agent.load_adapter, name)  # verifies sha256: off the event loop
        except (KeyError, ValueError) as e:
            raise RequestError(str(e).strip("'\""), status=409, param="name", code="conflict") from e
        request.state.note = f"loaded adapter={name}"
        return {"id": name, "object": "adapter", "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str, request: Request):
        try:
            await asyncio.to_thread(agent.unload_adapter, name)
        except KeyError as e:
            raise RequestError(str(e).strip("'\""), status=404, param="name", code="adapter_not_found") from e
        request.state.note = f"unloaded adapter={name}"
        return {"id": name, "object": "adapter", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        deadline = time.monotonic() + settings.timeout_s
        body = await read_json(request, settings.max_body_bytes)
        image, text, turns = parse_chat(body, settings.allow_local_files)
        options = parse_options(body, settings)
        model = body.get("model") or AUTO
        if not isinstance(model, str) or (model != AUTO and model not in agent.adapters):
            raise unknown_model(model, agent)
        picture = await asyncio.to_thread(decode_image, image, settings.max_image_pixels)
        loop, cancel, pieces = asyncio.get_running_loop(), threading.Event(), asyncio.Queue()

        def on_text(piece: str) -> None:  # in the lane's thread: hand over, never wait for the client
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        ask = partial(agent.ask, picture, text, None if model == AUTO else model, options["max_tokens"], turns,
                      on_text=on_text if options["stream"] else None, temperature=options["temperature"],
                      top_p=options["top_p"], seed=options["seed"], stop=options["stop"], cancel=cancel)
        lanes.admit()
        future = await lanes.start(ask, deadline)
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), cancel.set)  # whoever is reading
        future.add_done_callback(lambda _: (timer.cancel(), pieces.put_nowait(None)))
        rid = request.state.request_id
        cid, created = f"chatcmpl-{rid.removeprefix('req_')}", int(time.time())
        if options["stream"]:
            return StreamingResponse(stream(request, future, pieces, cancel, deadline, cid, created, model, options),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        answer = await finish(request, future, cancel, deadline)
        request.state.note = (f"adapter={answer.adapter} prompt_tokens={answer.prompt_tokens} "
                              f"completion_tokens={len(answer.tokens)}")
        return completion(answer, model, cid, created)

    async def stream(request, future, pieces, cancel, deadline, cid, created, model, options):
        try:
            yield chunk(cid, created, model, {"role": "assistant"})
            while (piece := await next_piece(pieces, cancel, deadline)) is not None:
                yield chunk(cid, created, model, {"content": piece})
            answer = await finish(request, future, cancel, deadline)
            yield chunk(cid, created, model, {}, answer.finish_reason)
            if options["include_usage"]:
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": usage(answer)}
                yield f"data: {json.dumps(body)}\n\n"
            request.state.note = f"adapter={answer.adapter} completion_tokens={len(answer.tokens)} stream"
        except RequestError as e:  # the status line is gone: the error goes inside the stream
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            cancel.set()  # the client left (or the stream ended): a generation still running stops
        yield "data: [DONE]\n\n"

    return app


async def next_piece(pieces: asyncio.Queue, cancel: threading.Event, deadline: float):
    """The next piece of text, or None when the generation has ended (or must: the deadline passed)."""
    try:
        return await asyncio.wait_for(pieces.get(), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        cancel.set()
        return None  # finish() reports the timeout


async def finish(request, future: asyncio.Future, cancel: threading.Event, deadline: float):
    """The answer of a running generation; cancels it when the client leaves or the deadline passes."""
    from mmagent.backends import Cancelled
    while not future.done():
        left = deadline - time.monotonic()
        if left <= 0 or await request.is_disconnected():
            cancel.set()
        await asyncio.wait([future], timeout=max(0.05, min(0.5, left)))
    try:
        return future.result()
    except Cancelled:
        if time.monotonic() >= deadline:
            raise RequestError("the request ran past this server's per-request timeout; ask for fewer tokens or "
                               "retry later", status=504, code="timeout", kind="timeout") from None
        raise RequestError("the client went away", status=499, code="client_closed") from None
    except KeyError as e:  # an adapter unloaded between the check and the start
        raise RequestError(str(e).strip("'\""), status=404, param="model", code="model_not_found") from e
    except ValueError as e:  # the prompt does not fit, the question is empty, the image has no pixels
        code = "context_length_exceeded" if type(e).__name__ == "PromptTooLong" else None
        raise RequestError(str(e), param="messages", code=code) from e


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "mmagent"}


def unknown_model(model, agent) -> RequestError:
    return RequestError(f"no model `{model}`; models: {', '.join([AUTO, *agent.adapters])}", status=404,
                        param="model", code="model_not_found")


async def read_json(request, limit: int) -> dict:
    """The body as a JSON object, read up to `limit` bytes (413 beyond)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise RequestError(f"the request body is {int(size):,} bytes, over this server's limit of {limit:,}",
                           status=413, code="request_too_large")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise RequestError(f"the request body is over this server's limit of {limit:,} bytes", status=413,
                               code="request_too_large")
    try:
        body = json.loads(data or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"body is not JSON ({e})") from e
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


# ---- request ids, the API key, logs -----------------------------------------------------------------------

class Gate:
    """ASGI middleware: a request id for every request (the client's `X-Request-Id` when it sends a sane
    one), the API key checked before any route but /health, and one log line per request when it ends."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.match(given) else f"req_{uuid.uuid4().hex[:20]}"
        state = scope.setdefault("state", {})
        state["request_id"], start, status = rid, time.perf_counter(), [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            if self.api_key is not None and scope["path"] != "/health" and not self._authorised(headers):
                return await self._refuse(send_with_id)
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("%s %s %s %s %.3fs %s", rid, scope["method"], scope["path"], status[0],
                     time.perf_counter() - start, state.get("note", ""))

    def _authorised(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    @staticmethod
    async def _refuse(send) -> None:
        body = json.dumps(error_body("missing or wrong API key: send `Authorization: Bearer <key>` (the key given "
                                     "to `mmagent serve --api-key`)", code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def server(agent, host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None,
           graceful_s: float | None = None):
    """A uvicorn server for `agent` (run it with `.run()`); on SIGINT/SIGTERM it stops taking connections
    and finishes the requests in flight (waiting up to `graceful_s`, forever when None)."""
    import uvicorn
    settings = settings or Settings()
    config = uvicorn.Config(create_app(agent, settings), host=host, port=port, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=graceful_s, timeout_keep_alive=5)
    return uvicorn.Server(config)


class Running:
    """A server in a background thread (tests, benchmarks): `url`, then `stop()` (graceful)."""

    def __init__(self, agent, host: str = "127.0.0.1", port: int = 0, settings: Settings | None = None):
        self.server = server(agent, host, port, settings)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{port}"

    def stop(self, timeout: float = 60) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
