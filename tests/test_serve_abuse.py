"""`odlora serve` under abuse: bad bodies, slow and vanishing clients, other sites, a missing API key,
a full generation queue. Every case must end in a clean 4xx/503 (or a closed connection) and the
server must go on answering correctly.

    python -m pytest -q tests/test_serve_abuse.py       # the tiny ONNX export of test_serve.py; seconds

Servers here run with short timeouts (ABUSE), so that the slow cases take
about a second each; the oracle for a good answer is `Runtime.generate` on the same runtime.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ondevice_lora.runtime.access import SESSION_COOKIE, Access  # noqa: E402
from ondevice_lora.runtime.server import ServerSettings, build_server  # noqa: E402
from ondevice_lora.web.app import WebApp  # noqa: E402
from test_serve import MESSAGES, chat_body, expected, rt, tiny_export  # noqa: E402,F401 (rt, tiny_export: fixtures)

ABUSE = ServerSettings(head_timeout=0.5, body_timeout=0.5, keep_alive_timeout=0.5)
SLACK = 5.0  # seconds a timed-out connection may take beyond its timeout on a busy CPU
KEY = "s3cret-Key_42"
CHAT = "/v1/chat/completions"
GOOD = json.dumps(chat_body("a")).encode()
# Every route, with a body that would be served as it is (a job body that is refused for its data,
# so that no job starts when the request gets through).
ROUTES = [("GET", "/", None), ("GET", "/app/app.js", None), ("GET", "/v1/models", None), ("POST", CHAT, GOOD),
          ("POST", "/v1/completions", json.dumps({"model": "b", "prompt": "The cat", "max_tokens": 4}).encode()),
          ("GET", "/odlora/state", None), ("POST", "/odlora/jobs", json.dumps({"name": "x"}).encode()),
          ("GET", "/odlora/jobs/nope", None), ("GET", "/no/such/route", None)]


@contextmanager
def running(rt, tmp_path, settings=ABUSE, access=None):
    """A server with the web app on a free loopback port, in a thread; yields (server, port)."""
    server = build_server(rt, "127.0.0.1", 0, webapp=WebApp(rt, tmp_path), settings=settings, access=access)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, server.sock.getsockname()[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def served(rt, tmp_path_factory):
    with running(rt, tmp_path_factory.mktemp("abuse-work")) as (server, port):
        yield server, port


@pytest.fixture
def port(served):
    return served[1]


def send(port, method, path, body=None, headers=None):
    """(status, headers with lower-case names, body bytes); the Host is this server's unless given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Host": f"127.0.0.1:{port}", "Content-Type": "application/json",
                                                       **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def error_of(data: bytes) -> dict:
    body = json.loads(data)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    return body["error"]


def answers_correctly(rt, port) -> None:
    status, _, data = send(port, "POST", CHAT, GOOD)
    assert status == 200, data
    assert json.loads(data)["choices"][0]["message"]["content"] == expected(rt, "a").text


# -- bad bodies ------------------------------------------------------------------------------------------

def chat(**fields) -> bytes:
    return json.dumps(chat_body("a", **fields)).encode()


def chat_with(raw_field: str) -> bytes:
    """A good chat body with one more field written as raw JSON text (NaN, 1e400, a 5,000-digit integer)."""
    return GOOD[:-1] + b", " + raw_field.encode() + b"}"


DEEP = 100_000
BAD_BODIES = {
    # name -> (path, raw body, status, param, code)
    "truncated JSON": (CHAT, b'{"model": "a", ', 400, None, "invalid_json"),
    "empty body": (CHAT, b"", 400, None, "invalid_json"),
    "a list": (CHAT, b"[1, 2]", 400, None, "invalid_json"),
    "not UTF-8": (CHAT, b'{"model": "\xff\xfe"}', 400, None, "invalid_json"),
    "a lone surrogate": (CHAT, b'{"model": "a", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, None,
                         "invalid_json"),
    "nested 100k deep": (CHAT, b'{"model": "a", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400, None,
                         "invalid_json"),
    "nested 100k deep in an ignored field": (CHAT, chat_with('"extra": ' + "[" * DEEP + "]" * DEEP), 400, None,
                                             "invalid_json"),
    "a 5000-digit integer": (CHAT, chat_with('"seed": 1' + "0" * 5000), 400, None, "invalid_json"),
    "NaN temperature": (CHAT, chat_with('"temperature": NaN'), 400, "temperature", "invalid_value"),
    "Infinity top_p": (CHAT, chat_with('"top_p": Infinity'), 400, "top_p", "invalid_value"),
    "1e400 temperature": (CHAT, chat_with('"temperature": 1e400'), 400, "temperature", "invalid_value"),
    "seed 2^70": (CHAT, chat(seed=2**70), 400, "seed", "invalid_value"),
    "seed -1": (CHAT, chat(seed=-1), 400, "seed", "invalid_value"),
    "seed 1.5": (CHAT, chat(seed=1.5), 400, "seed", "invalid_type"),
    "seed as text": (CHAT, chat(seed="1"), 400, "seed", "invalid_type"),
    "max_tokens 0": (CHAT, chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    "max_tokens 2^40": (CHAT, chat(max_tokens=2**40), 400, "max_tokens", "invalid_value"),
    "max_tokens 8.0": (CHAT, chat(max_tokens=8.0), 400, "max_tokens", "invalid_type"),
    "max_tokens true": (CHAT, chat(max_tokens=True), 400, "max_tokens", "invalid_type"),
    "temperature 5": (CHAT, chat(temperature=5), 400, "temperature", "invalid_value"),
    "temperature as text": (CHAT, chat(temperature="hot"), 400, "temperature", "invalid_type"),
    "top_p 0": (CHAT, chat(top_p=0), 400, "top_p", "invalid_value"),
    "top_p 1.5": (CHAT, chat(top_p=1.5), 400, "top_p", "invalid_value"),
    "an empty stop string": (CHAT, chat(stop=[""]), 400, "stop[0]", "invalid_value"),
    "a stop number": (CHAT, chat(stop=["x", 1]), 400, "stop[1]", "invalid_type"),
    "stop an object": (CHAT, chat(stop={"a": 1}), 400, "stop", "invalid_type"),
    "stream as text": (CHAT, chat(stream="yes"), 400, "stream", "invalid_type"),
    "include_usage as text": (CHAT, chat(stream_options={"include_usage": "yes"}), 400,
                              "stream_options.include_usage", "invalid_type"),
    "model a number": (CHAT, json.dumps({"model": 7, "messages": MESSAGES}).encode(), 400, "model", "invalid_type"),
    "messages an object": (CHAT, json.dumps({"model": "a", "messages": {"role": "user"}}).encode(), 400, "messages",
                           "invalid_type"),
    "a prompt of token ids past the vocabulary": ("/v1/completions", json.dumps({"model": "a", "prompt": [10**6]}).encode(),
                                                  400, "prompt", "invalid_value"),
    "a prompt list of mixed items": ("/v1/completions", json.dumps({"model": "a", "prompt": ["x", 1]}).encode(), 400,
                                     "prompt", "invalid_type"),
    "job steps NaN": ("/odlora/jobs", b'{"name": "x", "sample": "dates", "steps": NaN}', 400, "steps",
                      "invalid_type"),
    "job steps 10^30": ("/odlora/jobs", json.dumps({"name": "x", "sample": "dates", "steps": 10**30}).encode(), 400,
                        "steps", "invalid_value"),
    "job path with a NUL byte": ("/odlora/jobs", json.dumps({"name": "x", "path": "a\x00.jsonl"}).encode(), 400,
                                 "path", "invalid_value"),
    "job upload not an object": ("/odlora/jobs", json.dumps({"name": "x", "upload": "text"}).encode(), 400,
                                 "upload", "invalid_type"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_a_bad_body_is_a_400_naming_the_field(rt, port, case):
    path, raw, status, param, code = BAD_BODIES[case]
    got, _, data = send(port, "POST", path, raw)
    assert got == status, data[:300]
    error = error_of(data)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error
    if param is not None:
        assert param in error["message"]
    answers_correctly(rt, port)


def test_an_unknown_field_is_refused_by_name(rt, port):
    status, _, data = send(port, "POST", CHAT, chat(user="me", extra={"a": [1, 2]}))
    error = json.loads(data)["error"]
    assert status == 400 and (error["param"], error["code"]) == ("extra", "unsupported_parameter")


def test_null_fields_take_the_defaults(rt, port):
    body = {**chat_body("a"), "temperature": None, "top_p": None, "seed": None, "stop": None, "stream": None}
    status, _, data = send(port, "POST", CHAT, json.dumps(body).encode())
    assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == expected(rt, "a").text


def test_wrong_method_and_route_are_json_errors(port):
    status, headers, data = send(port, "GET", CHAT)
    assert status == 405 and error_of(data)["code"] == "method_not_allowed" and "POST" in headers["allow"]
    status, _, data = send(port, "POST", "/v1/embeddings", GOOD)
    assert status == 404 and error_of(data)["code"] == "not_found"


def test_an_oversized_body_is_a_413(rt, port):
    """Declared too large: refused before the body comes. Sent chunked (no length to warn the server):
    refused once the limit is crossed. (The client sends no more than that, so that the server's close
    cannot reset the connection before the 413 is read.)"""
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{head}Content-Length: {ABUSE.max_body_bytes + 1}\r\n\r\n".encode())
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 413 ") and b"body_too_large" in reply, reply[:300]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"x" * 2**16
        for _ in range(ABUSE.max_body_bytes // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 413 ") and b"body_too_large" in reply, reply[:300]
    answers_correctly(rt, port)


def test_a_declared_huge_body_is_refused_before_it_is_sent(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {10**12}\r\n\r\n".encode())
        head = read_until_closed(sock)
    assert head.startswith(b"HTTP/1.1 413 "), head[:200]


# -- slow, stalled and vanishing clients -------------------------------------------------------------------

def read_until_closed(sock: socket.socket, limit: float = ABUSE.head_timeout + SLACK) -> bytes:
    """Everything the server sends until it closes the connection (an AssertionError if it does not)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"the server kept the connection open over {limit} s; it sent {data[:200]!r}")
    return data


STALLS = {
    # name -> (what the client sends before it stalls, the timeout that must close it)
    "connects and sends nothing": (b"", ABUSE.head_timeout),
    "half a request line": (b"POST /v1/chat/com", ABUSE.head_timeout),
    "headers without their end": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", ABUSE.head_timeout),
    "headers, then half the body": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
                                    ABUSE.body_timeout),
}


@pytest.mark.parametrize("case", list(STALLS))
def test_a_stalled_client_is_closed_by_its_timeout(rt, port, case):
    sent, timeout = STALLS[case]
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(sent)
        answers_correctly(rt, port)  # meanwhile, others are served
        reply = read_until_closed(sock)
    took = time.monotonic() - started
    assert timeout * 0.8 <= took <= timeout + SLACK, took
    if case == "headers, then half the body":
        assert reply.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in reply, reply[:300]
    else:
        assert reply == b"", reply[:300]


def test_slowloris_headers_a_byte_at_a_time_are_cut_off(port):
    """The head's deadline counts from the connection, not from the last byte."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            for byte in b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
                if time.monotonic() - started > ABUSE.head_timeout + SLACK:
                    raise AssertionError("the server let a slow head go on past its deadline")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while sending: what the deadline should do
        else:
            assert read_until_closed(sock) == b""
    assert time.monotonic() - started <= ABUSE.head_timeout + SLACK


def test_an_idle_keep_alive_connection_is_closed(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/models")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("connection") != "close"
    response.read()
    started = time.monotonic()
    assert read_until_closed(conn.sock, ABUSE.keep_alive_timeout + SLACK) == b""
    assert time.monotonic() - started >= ABUSE.keep_alive_timeout * 0.8
    conn.close()


def test_a_head_growing_past_its_limit_is_a_400(rt, port):
    """An unfinished head is buffered up to max_head_bytes only: past that, a 400 (the head timeout
    would close the connection without a word)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * ABUSE.max_head_bytes)
        assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
    answers_correctly(rt, port)


def test_garbage_instead_of_http_is_a_400(rt, port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
    answers_correctly(rt, port)


def test_a_client_that_leaves_mid_stream_frees_its_place(rt, served):
    server, port = served
    body = json.dumps({"model": "b", "prompt": "The cat", "max_tokens": 60, "stream": True}).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")  # the head and the first events: then it leaves
    deadline = time.monotonic() + SLACK
    while server.generations.admitted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.generations.admitted == 0
    answers_correctly(rt, port)


# -- other sites -------------------------------------------------------------------------------------------

FOREIGN = {
    "a rebinding Host": {"Host": "evil.example:{port}"},
    "a Host with our port on another name": {"Host": "127.0.0.2:{port}"},
    "another site's Origin": {"Origin": "https://evil.example"},
    "our Host on another port as Origin": {"Origin": "http://127.0.0.1:1"},
    "a null Origin": {"Origin": "null"},
    "an Origin of another scheme": {"Origin": "ftp://127.0.0.1:{port}"},
}


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
@pytest.mark.parametrize("case", list(FOREIGN))
def test_another_site_is_refused_on_every_route(port, method, path, body, case):
    headers = {name: value.format(port=port) for name, value in FOREIGN[case].items()}
    status, _, data = send(port, method, path, body, headers)
    assert status == 403 and error_of(data)["code"] in ("host_not_allowed", "cross_origin"), data[:300]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_this_site_is_served_on_every_route(port, method, path, body):
    for headers in ({}, {"Host": f"localhost:{port}"}, {"Host": f"[::1]:{port}"},
                    {"Origin": f"http://127.0.0.1:{port}"}):
        status, _, data = send(port, method, path, body, headers)
        assert status not in (401, 403), (headers, data[:300])


def test_a_foreign_host_cannot_start_a_job(rt, tmp_path):
    job = json.dumps({"name": "x", "sample": "dates", "steps": 1}).encode()
    with running(rt, tmp_path) as (server, port):
        assert send(port, "POST", "/odlora/jobs", job, {"Host": "evil.example"})[0] == 403
        assert send(port, "POST", "/odlora/jobs", job, {"Origin": "http://evil.example"})[0] == 403
        state = json.loads(send(port, "GET", "/odlora/state")[2])
    assert state["job"] is None and not (tmp_path / "adapters").exists()


def test_missing_host_is_refused(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 403 ") and b"host_not_allowed" in reply, reply[:300]


def test_allow_host_adds_a_name(rt, tmp_path):
    access = Access.build("127.0.0.1", allow_hosts=["Device.Local"])
    with running(rt, tmp_path, access=access) as (_, port):
        assert send(port, "GET", "/v1/models", headers={"Host": "device.local:8000"})[0] == 200
        assert send(port, "GET", "/v1/models", headers={"Host": "other.local"})[0] == 403


# -- the API key ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(rt, tmp_path_factory):
    with running(rt, tmp_path_factory.mktemp("keyed-work"), access=Access.build("127.0.0.1", api_key=KEY)) as s:
        yield s[1]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_the_api_key_is_needed_on_every_route(keyed, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}, {"Cookie": f"{SESSION_COOKIE}={KEY}"}):
        status, reply_headers, data = send(keyed, method, path, body, headers)
        assert status == 401 and error_of(data)["code"] == "invalid_api_key", (headers, data[:300])
        assert reply_headers["www-authenticate"] == "Bearer"
    status, _, data = send(keyed, method, path, body, {"Authorization": f"Bearer {KEY}"})
    assert status not in (401, 403), data[:300]


def test_a_right_key_from_another_site_is_still_refused(keyed):
    status, _, _ = send(keyed, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}", "Host": "evil.example"})
    assert status == 403


def test_the_page_gets_in_with_the_key_once(rt, keyed):
    assert send(keyed, "GET", "/?key=wrong")[0] == 401
    status, headers, _ = send(keyed, "GET", f"/?key={KEY}")
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and KEY not in cookie
    session = {"Cookie": cookie.split(";")[0]}
    status, _, page = send(keyed, "GET", "/", headers=session)
    assert status == 200 and b'src="/app/app.js"' in page
    assert send(keyed, "GET", "/odlora/state", headers=session)[0] == 200
    status, _, data = send(keyed, "POST", CHAT, GOOD, {**session, "Origin": f"http://127.0.0.1:{keyed}"})
    assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == expected(rt, "a").text


# -- a full queue ----------------------------------------------------------------------------------------------

def test_a_full_generation_queue_is_a_503_then_serves_again(rt, tmp_path):
    """One generation at a time and one waiting: with both places held (by work the test controls,
    through the same line requests take), a request is refused at once; with one free, it waits."""
    settings = ServerSettings(concurrency=1, queue=1)
    with running(rt, tmp_path, settings=settings) as (server, port):
        release = threading.Event()
        server.generations.submit(release.wait)
        server.generations.submit(release.wait)
        started = time.monotonic()
        status, headers, data = send(port, "POST", CHAT, GOOD)
        assert status == 503 and headers["retry-after"] == str(settings.retry_after)
        assert time.monotonic() - started < SLACK  # refused at once, not after a wait
        error = error_of(data)
        assert (error["type"], error["code"]) == ("server_error", "server_busy")
        status, _, _ = send(port, "POST", CHAT, chat(stream=True))
        assert status == 503  # a stream too, before its status line
        release.set()
        deadline = time.monotonic() + SLACK
        while server.generations.admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        hold = threading.Event()
        server.generations.submit(hold.wait)  # the one running place is taken again: the next request waits
        waited = []
        waiter = threading.Thread(target=lambda: waited.append(send(port, "POST", CHAT, GOOD)))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and not waited  # queued behind the held place
        hold.set()
        waiter.join(timeout=30)
        status, _, data = waited[0]
        assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == expected(rt, "a").text


def test_a_burst_over_capacity_gets_answers_or_503s_only(rt, tmp_path):
    settings = ServerSettings(concurrency=1, queue=0)
    want = expected(rt, "a").text
    results = []
    start = threading.Barrier(8)

    def client():
        start.wait()
        results.append(send(port, "POST", CHAT, GOOD))

    with running(rt, tmp_path, settings=settings) as (_, port):
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(results) == 8
        for status, headers, data in results:
            if status == 503:
                assert error_of(data)["code"] == "server_busy" and headers["retry-after"]
            else:
                assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == want
        answers_correctly(rt, port)
