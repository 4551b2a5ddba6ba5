"""An OpenAI-compatible HTTP server over one Runtime, so that any OpenAI client can call an export
and pick an adapter per request through `model`.

    odlora serve --export exports/onnx --adapter dates=dates.onnx_adapter    # prints where it listens
    curl -s localhost:8000/v1/chat/completions -d '{"model": "dates",
        "messages": [{"role": "user", "content": "Normalise: March 5th, 2021"}]}'

    GET  /v1/models              `base` and every registered adapter id
    POST /v1/chat/completions    messages, rendered with the export's chat template
    POST /v1/completions         a raw prompt (no template)

`model` is `base`, an adapter id, or a blend written as results label one (`a:0.7+b:0.3`).
Requests honour max_tokens, temperature, top_p, seed, stop, and stream (server-sent events in
OpenAI's chunk format); absent fields take odlora's defaults (greedy, 128 tokens), not OpenAI's.
A bad request gets a 4xx with OpenAI's error JSON and fails alone.

`odlora serve` also hands the server a `webapp.WebApp`: the demo page at `/` and its `/odlora/...`
routes (personalisation jobs), answered by that module.

Each request runs in its own thread; the Runtime is thread-safe. The standard library's
http.server is enough: the API is a few JSON routes, meant for one device's loopback.
"""

from __future__ import annotations

import json
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from ..errors import OdloraError
from ..generate import SamplingConfig
from .adapters import normalise, parse_label
from .engine import GenerationResult, Runtime

MAX_BODY_BYTES = 4 * 2**20  # far more than any prompt an export's KV cache holds
DEFAULTS = SamplingConfig()
REQUIRED = object()
NUMBER = (int, float)
TYPE_NAMES = {str: "a string", int: "an integer", NUMBER: "a number", bool: "a boolean", list: "a list",
              dict: "an object", (str, list): "a string or a list of strings"}


class APIError(Exception):
    """A failed request, answered with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Endpoint:
    """What differs between chat and plain completions: the input and the response shapes."""

    chat: bool
    object: str
    chunk_object: str
    id_prefix: str

    def read_prompt(self, body: dict):
        return read_messages(body) if self.chat else field(body, "prompt", str)

    def choice(self, text: str, finish: str) -> dict:
        out = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": 0, **out, "logprobs": None, "finish_reason": finish}

    def delta(self, text: str, finish: Optional[str] = None, first: bool = False) -> dict:
        """One streamed piece; in a chat stream the first names the role and the last has an empty delta."""
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


ENDPOINTS = {
    "/v1/chat/completions": Endpoint(True, "chat.completion", "chat.completion.chunk", "chatcmpl"),
    "/v1/completions": Endpoint(False, "text_completion", "text_completion", "cmpl"),
}


@dataclass
class Request:
    endpoint: Endpoint
    model: str  # as the client wrote it: responses echo it
    adapter: list  # [(id, weight)], [] for the base
    prompt: object  # messages (chat) or a string
    sampling: SamplingConfig
    stream: bool
    include_usage: bool  # stream_options.include_usage: one more chunk with the token counts
    id: str
    created: int

    def envelope(self, obj: str, **fields) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, **fields}


# -- reading a request ---------------------------------------------------------------------------------

def field(body: dict, name: str, kind, default=REQUIRED):
    """body[name] if it has the JSON type `kind`; absent or null: `default` (REQUIRED: a 400)."""
    value = body.get(name)
    if value is None:
        if default is REQUIRED:
            raise APIError(400, f"missing required parameter {name!r}", param=name, code="missing_required_parameter")
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise APIError(400, f"{name!r} must be {TYPE_NAMES[kind]}, got {json.dumps(value)[:40]}", param=name,
                       code="invalid_type")
    return value


def read_messages(body: dict) -> list[dict]:
    """The chat messages, reduced to the role and content the chat template reads."""
    messages = field(body, "messages", list)
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in messages):
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects with string values",
                       param="messages", code="invalid_type")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_stop(body: dict) -> list[str]:
    stop = field(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", param="stop", code="invalid_type")
    return stops


def read_sampling(body: dict) -> SamplingConfig:
    """The sampling fields; their ranges are checked by `Runtime.generate` (a 400 from its OdloraError)."""
    return SamplingConfig(max_new_tokens=field(body, "max_tokens", int, DEFAULTS.max_new_tokens),
                          temperature=float(field(body, "temperature", NUMBER, DEFAULTS.temperature)),
                          top_p=float(field(body, "top_p", NUMBER, DEFAULTS.top_p)),
                          seed=field(body, "seed", int, None), stop=read_stop(body))


def resolve_model(rt: Runtime, model: str) -> list:
    """The adapter blend `model` names; a name that is no model here is OpenAI's 404."""
    try:
        return normalise(parse_label(model), 1.0, rt.adapters)
    except OdloraError as e:
        raise APIError(404, f"the model {model!r} does not exist: {e}", param="model", code="model_not_found") from None


def read_json(raw: bytes) -> dict:
    """A request body that must be one JSON object."""
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


def parse_request(endpoint: Endpoint, raw: bytes, rt: Runtime) -> Request:
    body = read_json(raw)
    if field(body, "n", int, 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    model = field(body, "model", str)
    include_usage = bool(field(body, "stream_options", dict, {}).get("include_usage"))
    return Request(endpoint, model, resolve_model(rt, model), endpoint.read_prompt(body), read_sampling(body),
                   field(body, "stream", bool, False), include_usage, f"{endpoint.id_prefix}-{uuid.uuid4().hex[:24]}",
                   int(time.time()))


def model_ids(rt: Runtime) -> list[str]:
    return ["base", *sorted(rt.adapters)]


def usage(result: GenerationResult) -> dict:
    completion = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


# -- answering -------------------------------------------------------------------------------------------

class EventStream:
    """A streamed answer as server-sent events. The status line waits for the first piece of text,
    so that an error found before it (an over-long prompt, a blend too large) is still a 4xx."""

    def __init__(self, handler: "Handler", request: Request):
        self.handler, self.request, self.started = handler, request, False

    def piece(self, text: str) -> None:
        self.chunk(self.request.endpoint.delta(text))

    def finish(self, result: GenerationResult) -> None:
        self.chunk(self.request.endpoint.delta("", result.finish_reason))
        if self.request.include_usage:
            self.send(self.request.envelope(self.request.endpoint.chunk_object, choices=[], usage=usage(result)))
        self.send("[DONE]")

    def chunk(self, choice: dict) -> None:
        self.send(self.request.envelope(self.request.endpoint.chunk_object, choices=[choice]))

    def send(self, data) -> None:
        if not self.started:
            self.start()
        self.handler.wfile.write(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())

    def start(self) -> None:
        self.started = True
        self.handler.send_response(200)
        self.handler.send_header("Content-Type", "text/event-stream")
        self.handler.send_header("Cache-Control", "no-cache")
        self.handler.end_headers()
        if self.request.endpoint.chat:  # OpenAI's first chat chunk carries the role
            self.chunk(self.request.endpoint.delta("", first=True))


class Handler(BaseHTTPRequestHandler):
    server: "OpenAIServer"
    server_version = "odlora"

    def do_GET(self):
        self.respond(self.get)

    def do_POST(self):
        self.respond(self.post)

    def respond(self, route) -> None:
        """Run `route`; a failure answers this request only (an error event once streaming)."""
        self.stream: Optional[EventStream] = None
        self.quiet = False  # a route may keep its request out of the log (a progress poll)
        try:
            route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left: a streamed generation stops with it
        except APIError as e:
            self.fail(e)
        except OdloraError as e:  # the Runtime refused the request: the prompt, the sampling, the adapter
            self.fail(APIError(400, str(e)))
        except Exception as e:  # a bug: say so, and keep serving
            traceback.print_exc()
            self.fail(APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    def log_request(self, code="-", size="-") -> None:
        if not (self.quiet and code == 200):
            super().log_request(code, size)

    def fail(self, error: APIError) -> None:
        if self.stream is not None and self.stream.started:
            self.stream.send(error.body())
        else:
            self.send_json(error.status, error.body())

    def route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def get(self) -> None:
        if self.route() != "/v1/models":
            self.web_route("GET")
            return
        created = self.server.created
        data = [{"id": name, "object": "model", "created": created, "owned_by": "odlora"}
                for name in model_ids(self.server.runtime)]
        self.send_json(200, {"object": "list", "data": data})

    def post(self) -> None:
        endpoint = ENDPOINTS.get(self.route())
        if endpoint is None:
            self.web_route("POST")
            return
        request = parse_request(endpoint, self.read_body(), self.server.runtime)
        on_text = None
        if request.stream:
            self.stream = EventStream(self, request)
            on_text = self.stream.piece
        # Completions take raw text; messages always go through the chat template.
        result = self.server.runtime.generate(request.prompt, adapter=request.adapter, sampling=request.sampling,
                                              on_text=on_text, chat=False)
        if self.stream is not None:
            self.stream.finish(result)
            return
        choice = endpoint.choice(result.text, result.finish_reason)
        self.send_json(200, request.envelope(endpoint.object, choices=[choice], usage=usage(result)))

    def web_route(self, method: str) -> None:
        """The web demo's routes (`webapp.py`), when this server has it; else a 404."""
        webapp = self.server.webapp
        if webapp is None or not webapp.handle(self, method, self.route()):
            raise APIError(404, f"no route {method} {self.path}", code="not_found")

    def read_body(self) -> bytes:
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            raise APIError(400, "the request needs a Content-Length header (chunked bodies are not read)")
        if int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
        return self.rfile.read(int(length))

    def send_json(self, status: int, body: dict) -> None:
        self.send_bytes(status, json.dumps(body).encode(), "application/json")

    def send_bytes(self, status: int, data: bytes, content_type: str, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True  # a client holding its connection open never blocks shutdown

    def __init__(self, address: tuple[str, int], runtime: Runtime, webapp=None):
        super().__init__(address, Handler)
        self.runtime, self.webapp, self.created = runtime, webapp, int(time.time())

    @property
    def root(self) -> str:
        """Where the server listens (the web demo's page, when it has one)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url(self) -> str:
        """The base URL of OpenAI's API here."""
        return f"{self.root}/v1"


def build_server(rt: Runtime, host: str = "127.0.0.1", port: int = 8000, webapp=None) -> OpenAIServer:
    """The server, bound but not serving yet: call `serve_forever()` (port 0 binds a free port; see `.url`).
    `webapp` (a `webapp.WebApp`) adds the demo page and its personalisation jobs."""
    try:
        return OpenAIServer((host, port), rt, webapp)
    except OSError as e:
        raise OdloraError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
