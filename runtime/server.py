"""An OpenAI-compatible HTTP server over one Runtime, so that any OpenAI client can call an export
and pick an adapter per request through `model`.

    odlora serve --export exports/onnx --adapter dates=dates.onnx_adapter    # prints where it listens
    curl -s localhost:8000/v1/chat/completions -d '{"model": "dates",
        "messages": [{"role": "user", "content": "Normalise: March 5th, 2021"}]}'

    GET  /v1/models              `base` and every registered adapter id
    GET  /v1/models/{id}         one of them
    POST /v1/chat/completions    messages, asked as the adapter was trained (the export's chat template;
                                 for one trained with `--format raw`, a single user message as raw text)
    POST /v1/completions         raw prompts (no template): text or token ids, one or a list

`model` is `base`, an adapter id, or a blend written as results label one (`a:0.7+b:0.3`).
Requests honour max_tokens / max_completion_tokens, temperature, top_p, top_k, seed, stop,
presence_penalty, frequency_penalty, logit_bias, n, logprobs / top_logprobs, echo (completions),
response_format (text, json_object, json_schema: the answer is constrained to the schema token by
token, `grammar.py`) and stream (server-sent events in OpenAI's chunk format, with
stream_options.include_usage). Any other field is refused: bodies are checked by
`openai_schema.py`. A bad request gets a 4xx with OpenAI's error JSON naming the field and its
code (a prompt too long for the export: `context_length_exceeded`), and fails alone. Every answer
carries the export's base fingerprint as `system_fingerprint`. `n` answers, and the answers to a
list of prompts, are generated one after another in one worker (choice i of a seeded request uses
seed + i).

`odlora serve` also hands the server a `ondevice_lora.web.app.WebApp`: the demo page at `/` and its `/odlora/...`
routes (personalisation jobs), answered by that module.

The stack: Starlette routes, served by uvicorn (h11). Starlette rather than FastAPI because every
body here is read by our own code first (a size and a time limit, then pydantic's JSON parser, whose
first problem becomes OpenAI's error JSON): FastAPI's automatic body models, 422 format and OpenAPI
pages would each have to be switched off or overridden. What makes it hold (limits in `ServerSettings`):

- a listen backlog of 2048 (the kernel caps it at net.core.somaxconn), so that a burst of clients
  waits to be accepted instead of being reset;
- uvicorn closes an idle keep-alive connection after 5 s and refuses a request head that grows past
  16 KiB unfinished (h11 buffers no more);
  `HeadDeadline` closes a connection whose request head has not arrived 10 s after it started
  (uvicorn alone waits forever on a client that connects and stalls), and a body must arrive within
  30 s (408) and stay under 4 MiB (413);
- generations run in worker threads (`Generations`; the Runtime is thread-safe), never on the event
  loop, at most `concurrency` at once with up to `queue` more waiting; past that a 503 with
  Retry-After. A streamed answer is handed from its thread to the loop piece by piece, and a client
  that leaves stops its generation at the next piece;
- every route, the page's included, passes `access.Guard` first: the Host/Origin allow-list and the
  optional API key.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
import socket
import threading
import time
import traceback
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import SamplingConfig
from ..errors import ContextLengthExceeded, OdloraError
from ..generate import TokenLogprob
from ..grammar import json_grammar
from .access import Access, Guard
from .adapters import normalise, parse_label
from .engine import GenerationResult, Runtime
from .openai_schema import APIError, ChatCompletionRequest, CompletionRequest, GenerationRequest, parse_body


@dataclass(frozen=True)
class ServerSettings:
    """How much the server takes, and for how long it waits (seconds)."""

    backlog: int = 2048
    concurrency: int = 4  # generations at once, each in a worker thread
    queue: int = 64  # requests that may wait for one of them; one more is a 503
    retry_after: int = 1  # what the 503 tells a client to wait
    max_body_bytes: int = 4 * 2**20  # far more than any prompt an export's KV cache holds
    max_head_bytes: int = 16 * 2**10  # what h11 buffers of an unfinished request line and headers
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0  # an idle connection between requests
    shutdown_timeout: float = 5.0  # for requests in flight when the server stops


@dataclass(frozen=True)
class Endpoint:
    """What differs between chat and plain completions: the body and the response shapes."""

    schema: type
    chat: bool
    template: Optional[bool]  # Runtime.generate's `chat`: None asks each adapter as it was trained
    object: str
    chunk_object: str
    id_prefix: str
    prompt_field: str  # what a too-long prompt's error names

    def choice(self, index: int, text: str, finish: str, logprobs: Optional[dict]) -> dict:
        out = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": index, **out, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, index: int, text: str, finish: Optional[str] = None, first: bool = False,
              logprobs: Optional[dict] = None) -> dict:
        """One streamed piece; in a chat stream the first names the role and the last has an empty delta."""
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def logprobs(self, rt: Runtime, entries: list[TokenLogprob], offset: int = 0) -> dict:
        """OpenAI's log-probabilities of `entries`: chat's `content` list, or the completions API's
        parallel lists (`text_offset` counts from `offset`, where the text before them ended)."""
        if self.chat:
            return {"content": [{**token_entry(rt, e.token, e.logprob),
                                 "top_logprobs": [token_entry(rt, t, lp) for t, lp in e.top]} for e in entries],
                    "refusal": None}
        texts = [rt.token_text(e.token) for e in entries]
        offsets = list(itertools.accumulate((len(t) for t in texts), initial=offset))[:-1]
        return {"tokens": texts, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{rt.token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def token_entry(rt: Runtime, token: int, logprob: float) -> dict:
    return {"token": rt.token_text(token), "logprob": logprob, "bytes": list(rt.token_bytes(token))}


CHAT = Endpoint(ChatCompletionRequest, True, None, "chat.completion", "chat.completion.chunk", "chatcmpl", "messages")
COMPLETIONS = Endpoint(CompletionRequest, False, False, "text_completion", "text_completion", "cmpl",  # raw text
                       "prompt")


@dataclass
class Completion:
    """One checked request to a completion endpoint: one or more prompts, `n` choices each."""

    endpoint: Endpoint
    body: GenerationRequest
    adapter: list  # [(id, weight)], [] for the base
    id: str
    created: int
    fingerprint: str  # the export's base fingerprint: OpenAI's system_fingerprint
    grammar: Optional[str]  # what response_format asks of every answer (grammar.py)

    def envelope(self, obj: str, **fields) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.body.model,
                "system_fingerprint": self.fingerprint, **fields}

    def chunk(self, choice: dict) -> str:
        return sse(self.envelope(self.endpoint.chunk_object, choices=[choice]))

    @functools.cached_property
    def answers(self) -> list[tuple[int, object, SamplingConfig]]:
        """(choice index, prompt, sampling) of every answer asked for: n per prompt, each n its own seed."""
        n = self.body.choices
        return [(p * n + i, prompt, self.body.sampling(self.grammar, choice=i))
                for p, prompt in enumerate(self.body.prompts) for i in range(n)]

    @functools.cached_property
    def prompts(self) -> dict:
        """choice index -> its prompt"""
        return {index: prompt for index, prompt, _ in self.answers}

    def echoed(self, rt: Runtime, prompt) -> str:
        """What `echo` puts before a completion: the prompt's text."""
        if not getattr(self.body, "echo", None):
            return ""
        return prompt if isinstance(prompt, str) else rt.detokenize(prompt)


def response_grammar(body: GenerationRequest) -> Optional[str]:
    """The grammar a chat request's response_format asks for (None: free text)."""
    response_format = getattr(body, "response_format", None)
    if response_format is None or response_format.type == "text":
        return None
    schema = response_format.json_schema.schema_ if response_format.type == "json_schema" else None
    param = "response_format.json_schema.schema" if schema is not None else "response_format"
    try:
        return json_grammar(schema, param)
    except OdloraError as e:
        raise APIError(400, str(e), param=param, code="invalid_value") from None


def resolve_model(rt: Runtime, model: str) -> list:
    """The adapter blend `model` names; a name that is no model here is OpenAI's 404."""
    try:
        return normalise(parse_label(model), 1.0, dict(rt.adapters))  # a copy: a web job may add one meanwhile
    except OdloraError as e:
        raise APIError(404, f"the model {model!r} does not exist: {e}", param="model", code="model_not_found") from None


def model_ids(rt: Runtime) -> list[str]:
    return ["base", *sorted(rt.adapters)]


def usage(results: list[tuple[int, GenerationResult]], choices_per_prompt: int) -> dict:
    """Token counts: each prompt once (not once per choice), every choice's completion."""
    prompt = sum(r.prompt_tokens for index, r in results if index % choices_per_prompt == 0)
    completion = sum(len(r.token_ids) for _, r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def api_error(error: BaseException, endpoint: Optional[Endpoint] = None) -> APIError:
    """What a client is told of a failure: its own APIError, the Runtime's refusal of the request
    (the prompt, the sampling, the adapter: a 400), or a bug (a 500; uvicorn logs its traceback)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ContextLengthExceeded):
        return APIError(400, str(error), param=endpoint.prompt_field if endpoint else None,
                        code="context_length_exceeded")
    if isinstance(error, OdloraError):
        return APIError(400, str(error), param=error.param, code="invalid_value" if error.param else None)
    return APIError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error")


class FiniteJSONResponse(JSONResponse):
    """JSON with non-finite numbers (a diverged training loss) as null: strict JSON, never a 500."""

    def render(self, content) -> bytes:
        return super().render(finite(content))


def finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


# -- the line in front of the Runtime -------------------------------------------------------------------

class ClientGone(Exception):
    """Raised into a generation whose client has left, so that its thread stops at the next piece."""


class Generations:
    """At most `concurrency` generations at once, in worker threads, and `queue` more waiting for
    one; a request beyond that is refused at once (a 503), so that a burst never piles up unbounded.
    A place is held from admission until its generation's thread is done with it."""

    def __init__(self, settings: ServerSettings):
        self.capacity, self.retry_after = settings.concurrency + settings.queue, settings.retry_after
        self.executor = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="odlora-generate")
        self.admitted = 0
        self._lock = threading.Lock()

    def submit(self, work: Callable) -> Future:
        with self._lock:
            if self.admitted >= self.capacity:
                raise APIError(503, f"the server is busy ({self.capacity} requests running or waiting): retry in "
                                    f"{self.retry_after} s", code="server_busy", kind="server_error",
                               headers={"Retry-After": str(self.retry_after)})
            self.admitted += 1
        future = self.executor.submit(work)
        future.add_done_callback(self._release)  # also when cancelled before it started
        return future

    async def run(self, work: Callable):
        return await asyncio.wrap_future(self.submit(work))

    def _release(self, _future: Future) -> None:
        with self._lock:
            self.admitted -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# -- the routes -----------------------------------------------------------------------------------------

class OpenAIRoutes:
    def __init__(self, rt: Runtime, generations: Generations):
        self.rt, self.generations, self.created = rt, generations, int(time.time())
        self.fingerprint = f"odlora-{rt.manifest['base_fingerprint'][:16]}"

    def routes(self) -> list[Route]:
        return [Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/v1/chat/completions", functools.partial(self.complete, endpoint=CHAT), methods=["POST"]),
                Route("/v1/completions", functools.partial(self.complete, endpoint=COMPLETIONS), methods=["POST"])]

    def model_entry(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "odlora"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_entry(name) for name in model_ids(self.rt)]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in model_ids(self.rt):
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(self.model_entry(name))

    async def complete(self, request: Request, endpoint: Endpoint) -> Response:
        body = parse_body(endpoint.schema, await read_body(request))
        call = Completion(endpoint, body, resolve_model(self.rt, body.model),
                          f"{endpoint.id_prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), self.fingerprint,
                          response_grammar(body))
        try:
            if body.stream:
                return await self.stream(call)
            results = await self.generations.run(lambda: [(index, self.generate(call, prompt, sampling))
                                                          for index, prompt, sampling in call.answers])
        except ContextLengthExceeded as e:
            raise api_error(e, endpoint) from None
        choices = [self.choice(call, index, call.prompts[index], result) for index, result in results]
        return JSONResponse(call.envelope(endpoint.object, choices=choices, usage=usage(results, body.choices)))

    def choice(self, call: Completion, index: int, prompt, result: GenerationResult) -> dict:
        echoed = call.echoed(self.rt, prompt)
        logprobs = None
        if call.body.logprobs_asked is not None:
            logprobs = call.endpoint.logprobs(self.rt, result.logprobs, offset=len(echoed))
        return call.endpoint.choice(index, echoed + result.text, result.finish_reason, logprobs)

    def generate(self, call: Completion, prompt, sampling: SamplingConfig, on_text=None,
                 on_logprobs=None) -> GenerationResult:
        return self.rt.generate(prompt, adapter=call.adapter, sampling=sampling, on_text=on_text,
                                chat=call.endpoint.template, logprobs=call.body.logprobs_asked,
                                on_logprobs=on_logprobs)

    async def stream(self, call: Completion) -> Response:
        """The answers as server-sent events, one after another. The status line waits for the first
        piece (or the end), so that an error found before it (an over-long prompt, a blend too large)
        is still a 4xx."""
        loop = asyncio.get_running_loop()
        # ("text", index, text, logprobs)..., ("done", index, result) per answer; then ("end",) | ("error", exception)
        pieces: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def put(item) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, item)

        def work() -> None:
            try:
                for index, prompt, sampling in call.answers:
                    handed: list = []  # the logprobs behind the next piece of text

                    def on_text(text: str, index=index, handed=handed) -> None:
                        if gone.is_set():
                            raise ClientGone
                        put(("text", index, text, list(handed)))

                    result = self.generate(call, prompt, sampling, on_text,
                                           lambda entries, handed=handed: handed.__setitem__(slice(None), entries))
                    put(("done", index, result))
                put(("end",))
            except ClientGone:
                pass
            except Exception as e:  # told to the client, in its stream or as its status
                put(("error", e))

        self.generations.submit(work)
        try:
            first = await pieces.get()
        except BaseException:  # cancelled (the server stops): the generation need not go on
            gone.set()
            raise
        if first[0] == "error":
            gone.set()
            raise api_error(first[1], call.endpoint)
        return StreamingResponse(self.events(call, first, pieces, gone),  # SSE is UTF-8 by definition: no charset
                                 headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def events(self, call: Completion, event: tuple, pieces: asyncio.Queue, gone: threading.Event):
        endpoint = call.endpoint
        offsets: dict[int, int] = {}  # per answer: the length of its text so far (completions' text_offset)
        results: list = []
        try:
            while event[0] in ("text", "done"):
                index = event[1]
                if index not in offsets:  # an answer's first chunk: chat names the role, echo the prompt
                    echoed = call.echoed(self.rt, call.prompts[index])
                    offsets[index] = len(echoed)
                    if endpoint.chat or echoed:
                        yield call.chunk(endpoint.delta(index, echoed, first=True))
                if event[0] == "text":
                    _, index, text, entries = event
                    logprobs = None
                    if call.body.logprobs_asked is not None:
                        logprobs = endpoint.logprobs(self.rt, entries, offsets[index])
                    offsets[index] += len(text)
                    yield call.chunk(endpoint.delta(index, text, logprobs=logprobs))
                else:
                    results.append((index, event[2]))
                    yield call.chunk(endpoint.delta(index, "", event[2].finish_reason))
                event = await pieces.get()
            if event[0] == "error":
                error = api_error(event[1], endpoint)
                if error.status >= 500:  # a bug, after the status line: only our log can say where
                    traceback.print_exception(event[1])
                yield sse(error.body())
                return
            if call.body.include_usage:
                yield sse(call.envelope(endpoint.chunk_object, choices=[], usage=usage(results, call.body.choices)))
            yield sse("[DONE]")
        finally:  # the end, or the client left (Starlette cancels the stream): stop the generation
            gone.set()


async def read_body(request: Request) -> bytes:
    """The request body, within the server's size and time limits (413, 408)."""
    settings: ServerSettings = request.app.state.settings
    too_large = APIError(413, f"the body is over {settings.max_body_bytes} bytes", code="body_too_large",
                         headers={"Connection": "close"})
    if int(request.headers.get("content-length", 0)) > settings.max_body_bytes:  # h11 checked it is a number
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), settings.body_timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the body did not arrive within {settings.body_timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None


async def on_error(request: Request, error: Exception) -> Response:
    return api_error(error).response()


async def on_http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own refusals (no such route, another method) in OpenAI's error JSON; OPTIONS on
    a route is answered with the methods it allows (a preflight from a --cors-origin site never
    gets here: CORSMiddleware answers it)."""
    if request.method == "OPTIONS" and error.status_code == 405:
        return Response(status_code=204, headers=error.headers)
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return APIError(error.status_code, f"no route {request.method} {request.url.path}", code=code,
                    headers=error.headers).response()


async def on_disconnect(request: Request, error: ClientDisconnect) -> Response:
    return Response(status_code=400)  # nobody reads it: the client left while sending its body


ERROR_HANDLERS = {APIError: on_error, OdloraError: on_error, HTTPException: on_http_error,
                  ClientDisconnect: on_disconnect, Exception: on_error}


def build_app(rt: Runtime, access: Access, settings: ServerSettings, generations: Generations,
              webapp=None) -> Starlette:
    routes = OpenAIRoutes(rt, generations).routes() + (webapp.routes() if webapp is not None else [])
    middleware = [Middleware(Guard, access=access)]
    if access.cors_origins:  # outermost: a preflight carries no API key, and a refusal still needs the CORS headers
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=sorted(access.cors_origins),
                                        allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                                        max_age=600))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=ERROR_HANDLERS)
    app.state.settings = settings
    return app


# -- the connection and the process ---------------------------------------------------------------------

class HeadDeadline(H11Protocol):
    """uvicorn's h11 connection, plus a deadline for each request's head (request line and headers):
    uvicorn times out an idle keep-alive connection, but waits forever on one that connects and then
    sends nothing, or its headers a byte at a time."""

    def __init__(self, *args, head_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timeout, self.head_deadline = head_timeout, None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.head_deadline = self.loop.call_later(self.head_timeout, self.head_timed_out)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:  # a request is in: its head arrived
            self.cancel_head_deadline()
        elif self.head_deadline is None:  # the first bytes of the next request on a kept-alive connection
            self.head_deadline = self.loop.call_later(self.head_timeout, self.head_timed_out)

    def connection_lost(self, exc) -> None:
        self.cancel_head_deadline()
        super().connection_lost(exc)

    def cancel_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def head_timed_out(self) -> None:
        self.head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class QuietPolls:
    """A logging filter: the page polls a job twice a second; its answers stay out of the access log."""

    def filter(self, record) -> bool:
        if not (isinstance(record.args, tuple) and len(record.args) == 5):  # not uvicorn's access line
            return True
        _client, method, path, _version, status = record.args
        return not (method == "GET" and path.startswith("/odlora/jobs/") and status == 200)


# `odlora serve`'s log: one line per request and uvicorn's warnings on stderr; nothing at start-up
# (the command says where it listens itself).
LOG_CONFIG = {
    "version": 1, "disable_existing_loggers": False,
    "filters": {"polls": {"()": QuietPolls}},
    "formatters": {"access": {"()": "uvicorn.logging.AccessFormatter", "use_colors": False,
                              "fmt": '%(client_addr)s "%(request_line)s" %(status_code)s'},
                   "plain": {"format": "odlora serve: %(message)s"}},
    "handlers": {"access": {"class": "logging.StreamHandler", "formatter": "access", "filters": ["polls"]},
                 "plain": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
                "uvicorn.error": {"handlers": ["plain"], "level": "WARNING", "propagate": False}},
}


class OpenAIServer:
    """uvicorn serving the app on a socket that listens from construction on, so that port 0 is known
    at once and a client that connects before `serve_forever()` waits in the backlog."""

    def __init__(self, app: Starlette, sock: socket.socket, settings: ServerSettings, generations: Generations,
                 access_log: bool):
        self.app, self.sock, self.generations = app, sock, generations
        config = uvicorn.Config(app, http=functools.partial(HeadDeadline, head_timeout=settings.head_timeout),
                                lifespan="off", backlog=settings.backlog, proxy_headers=False,
                                timeout_keep_alive=settings.keep_alive_timeout,
                                h11_max_incomplete_event_size=settings.max_head_bytes,
                                timeout_graceful_shutdown=settings.shutdown_timeout, server_header=False,
                                headers=[("Server", "odlora")], access_log=access_log,
                                log_config=LOG_CONFIG if access_log else None)
        self.uvicorn = uvicorn.Server(config)
        self._serving, self._stopped = threading.Event(), threading.Event()

    @property
    def root(self) -> str:
        """Where the server listens (the web demo's page, when it has one)."""
        host, port = self.sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def url(self) -> str:
        """The base URL of OpenAI's API here."""
        return f"{self.root}/v1"

    def serve_forever(self) -> None:
        """Serve until `shutdown()` (from another thread) or, in the main thread, SIGINT/SIGTERM
        (uvicorn then raises the signal again once stopped: Ctrl-C ends as a KeyboardInterrupt)."""
        self._serving.set()
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving; returns once `serve_forever()` has."""
        self.uvicorn.should_exit = True
        if self._serving.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        self.sock.close()
        self.generations.close()


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket: IPv6 for an IPv6 address, else IPv4 (`localhost` is 127.0.0.1, as before)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except (OSError, OverflowError) as e:
        raise OdloraError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None


def build_server(rt: Runtime, host: str = "127.0.0.1", port: int = 8000, webapp=None,
                 settings: ServerSettings = ServerSettings(), access: Optional[Access] = None,
                 access_log: bool = False) -> OpenAIServer:
    """The server, listening but not serving yet: call `serve_forever()` (port 0 binds a free port;
    see `.url`). `webapp` (a `ondevice_lora.web.app.WebApp`) adds the demo page and its personalisation jobs;
    `access` who may call (default: loopback Host names, no API key; see `access.Access.build`);
    `access_log` logs each request on stderr (`odlora serve`)."""
    access = access or Access.build(host)
    generations = Generations(settings)
    app = build_app(rt, access, settings, generations, webapp)
    return OpenAIServer(app, listen(host, port, settings.backlog), settings, generations, access_log)
