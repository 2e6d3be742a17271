"""An OpenAI-compatible server over an Agent: POST /v1/chat/completions (stream or not), GET /v1/models.

The image comes as an `image_url` content part (a data: URL or a local file path); the model name picks
the adapter (`mmagent` = let the router choose, or an adapter name). Local file paths as image URLs only
with `--allow-local-files`. Standard library only.

    mmagent serve bundle/ --port 8000
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AUTO = "mmagent"
MAX_BODY = 32 << 20


class RequestError(ValueError):
    pass


def parse_chat(body: dict, allow_local_files: bool = False) -> tuple[object, str, list[tuple[str, str]]]:
    """(image, last user text, earlier (user, assistant) turns) from an OpenAI chat request."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list")
    image, turns, pending = None, [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] needs a role of system, user or assistant")
        text, img = _content(m.get("content"), i, allow_local_files)
        image = img or image
        if m["role"] == "user":
            pending = text
        elif m["role"] == "assistant" and pending is not None:
            turns.append((pending, text))
            pending = None
    if pending is None:
        raise RequestError("the last message must come from the user")
    if image is None:
        raise RequestError("no image: add a content part {\"type\": \"image_url\", \"image_url\": {\"url\": ...}}")
    return image, pending, turns


def _content(content, i: int, allow_local_files: bool) -> tuple[str, object]:
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise RequestError(f"messages[{i}].content must be a string or a list of parts")
    texts, image = [], None
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            image = _image_from_url(url, i, allow_local_files)
        else:
            raise RequestError(f"messages[{i}].content has a part of type {kind!r}; use text or image_url")
    return " ".join(texts), image


def _image_from_url(url: str, i: int, allow_local_files: bool):
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True)
        except (IndexError, ValueError) as e:
            raise RequestError(f"messages[{i}] has a data URL that is not base64 ({e})") from e
    if url.startswith(("http://", "https://")):
        raise RequestError("remote image URLs are not fetched; send the image as a data: URL")
    if not allow_local_files:  # else any client could make the server open files on its disk
        raise RequestError("send the image as a data: URL (local paths need `mmagent serve --allow-local-files`)")
    return url.removeprefix("file://")


def finish_reason(answer, max_tokens: int) -> str:
    return "length" if len(answer.tokens) >= max_tokens else "stop"


def completion(answer, model: str, created: int, max_tokens: int) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": created,
            "model": model, "choices": [{"index": 0, "finish_reason": finish_reason(answer, max_tokens),
                                         "message": {"role": "assistant", "content": answer.text}}],
            "usage": {"completion_tokens": len(answer.tokens)},
            "mmagent": {"adapter": answer.adapter, "reason": answer.reason, "timings": answer.timings}}


def make_handler(agent, allow_local_files: bool = False):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet by default; the CLI prints one line per request
            pass

        def _json(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str) -> None:
            self._json(code, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self):
            if self.path.rstrip("/") != "/v1/models":
                return self._error(404, f"no route {self.path}; try /v1/models or POST /v1/chat/completions")
            names = [AUTO, *agent.adapters]
            self._json(200, {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "mmagent"}
                                                        for n in names]})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}; POST /v1/chat/completions")
            try:
                n = int(self.headers.get("Content-Length", 0))
                if n > MAX_BODY:
                    raise RequestError(f"request body of {n} bytes is over {MAX_BODY}")
                body = json.loads(self.rfile.read(n) or b"null")
                if not isinstance(body, dict):
                    raise RequestError("the body must be a JSON object")
                image, text, turns = parse_chat(body, allow_local_files)
                model = body.get("model") or AUTO
                adapter = None if model == AUTO else model
                if adapter is not None and adapter not in agent.adapters:
                    raise RequestError(f"no model `{model}`; models: {', '.join([AUTO, *agent.adapters])}")
                max_tokens = int(body.get("max_tokens") or 48)
                if max_tokens < 1:
                    raise RequestError(f"`max_tokens` must be at least 1, got {max_tokens}")
            except json.JSONDecodeError as e:
                return self._error(400, f"body is not JSON ({e})")
            except (RequestError, ValueError, TypeError) as e:
                return self._error(400, str(e))
            try:
                if body.get("stream"):
                    return self._stream(image, text, adapter, model, turns, max_tokens)
                answer = agent.ask(image, text, adapter, max_tokens, history=turns)
            except ValueError as e:  # ImageError and friends: the client's input
                return self._error(400, str(e))
            except (BrokenPipeError, ConnectionResetError):  # the client left mid-stream
                return
            except Exception as e:  # ours, not the client's: say so rather than drop the connection
                return self._error(500, f"generation failed: {e}")
            self._json(200, completion(answer, model, int(time.time()), max_tokens))

        def _stream(self, image, text, adapter, model, turns, max_tokens):
            from mmagent.images import load_image
            picture = load_image(image)  # fail with 400 before the event stream starts
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())

            def send(delta, finish=None):
                chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            send({"role": "assistant"})
            try:
                answer = agent.ask(picture, text, adapter, max_tokens, history=turns,
                                   on_text=lambda p: send({"content": p}))
                send({}, finish_reason(answer, max_tokens))
            except (BrokenPipeError, ConnectionResetError):
                return  # the client left: nobody to tell
            except Exception as e:  # the status line is gone: report the error inside the stream
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(e)}})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

    return Handler


def serve(agent, host: str = "127.0.0.1", port: int = 8000, allow_local_files: bool = False) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), make_handler(agent, allow_local_files))
