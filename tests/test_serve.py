"""`odlora serve`: OpenAI's API over a Runtime, each request choosing its adapter by `model`.

    python -m pytest -q tests/test_serve.py        # a tiny ONNX export, a server on a free loopback port

The oracle is `Runtime.generate` on the same runtime: the server must only translate, never change
what is generated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ondevice_lora.exporters.export import export, pack  # noqa: E402
from ondevice_lora.config import SamplingConfig  # noqa: E402
from ondevice_lora.runtime import Runtime  # noqa: E402
from ondevice_lora.runtime.server import build_server  # noqa: E402
from test_runtime import ADAPTERS, MAX_SEQ, PROMPT, make_adapter, quiet  # noqa: E402

GREEDY = SamplingConfig(max_new_tokens=8)
MESSAGES = [{"role": "user", "content": PROMPT}]


BUILT: dict = {}  # the tiny export, built once per session for every module that imports `tiny_export`


@pytest.fixture(scope="module")
def tiny_export(tiny_model_factory, tmp_path_factory):
    """A tiny fp32 ONNX export (r<=8, 64-token cache) and adapters a and b packed for it (shared:
    test_serve_abuse, test_web and test_chat import this fixture; copy a file before changing it)."""
    if "onnx" not in BUILT:
        root = tmp_path_factory.mktemp("serve")
        base_dir = tiny_model_factory("llama")
        export(str(base_dir), "onnx", root / "onnx", max_rank=8, max_seq_len=MAX_SEQ, say=quiet)
        blobs = {}
        for name in ("a", "b"):
            blobs[name] = root / f"{name}.onnx_adapter"
            pack(make_adapter(base_dir, root / f"adapter-{name}", *ADAPTERS[name]), root / "onnx", blobs[name])
        BUILT["onnx"] = root / "onnx", blobs
    return BUILT["onnx"]


def open_runtime(tiny_export, **kw) -> Runtime:
    export_dir, blobs = tiny_export
    rt = Runtime.open(export_dir, threads=1, **kw)
    for name, blob in blobs.items():
        rt.register_adapter(name, blob)
    return rt


@pytest.fixture(scope="module")
def rt(tiny_export):
    return open_runtime(tiny_export)


@contextmanager
def serving(rt, **kw):
    """The server (build_server's keywords) on a free loopback port, in a thread; yields its base URL (…/v1)."""
    server = build_server(rt, "127.0.0.1", 0, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def url(rt):
    with serving(rt) as base_url:
        yield base_url


def call(url: str, path: str, body=None) -> tuple[int, object]:
    """(status, parsed JSON) of GET (no body) or POST (a dict, or raw bytes) to url + path."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def events(url: str, path: str, body: dict) -> tuple[str, list]:
    """(Content-Type, the data of each server-sent event) of a streamed request."""
    request = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        lines = response.read().decode().split("\n\n")
        content_type = response.headers["Content-Type"]
    assert lines[-1] == "" and all(line.startswith("data: ") for line in lines[:-1]), lines
    return content_type, [line[len("data: "):] for line in lines[:-1]]


def chat_body(model: str, **extra) -> dict:
    return {"model": model, "messages": MESSAGES, "max_tokens": GREEDY.max_new_tokens, "temperature": 0, **extra}


def expected(rt, adapter, prompt=MESSAGES, cfg=GREEDY, chat=True):
    return rt.generate(prompt, adapter=adapter, sampling=cfg, chat=chat)


# -- routes -------------------------------------------------------------------------------------------

def test_models_lists_base_and_adapters(url):
    status, body = call(url, "/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["base", "a", "b"]
    assert all(m["object"] == "model" for m in body["data"])


@pytest.mark.parametrize("model,adapter", [("a", "a"), ("base", None), ("a:0.7+b:0.3", [("a", 0.7), ("b", 0.3)])])
def test_chat_completion_equals_runtime_generate(rt, url, model, adapter):
    want = expected(rt, adapter)
    status, body = call(url, "/chat/completions", chat_body(model))
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == model and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want.text}
    assert choice["finish_reason"] == want.finish_reason == "length"
    assert body["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": len(want.token_ids),
                             "total_tokens": want.prompt_tokens + len(want.token_ids)}


def test_completion_is_raw_text_and_honours_sampling_fields(rt, url):
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=3)
    want = expected(rt, "b", prompt=PROMPT, cfg=cfg, chat=False)
    status, body = call(url, "/completions", {"model": "b", "prompt": PROMPT, "max_tokens": 6, "temperature": 0.9,
                                              "top_p": 0.9, "seed": 3})
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == want.text and body["usage"]["prompt_tokens"] == want.prompt_tokens
    full = expected(rt, "a").text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    status, body = call(url, "/chat/completions", chat_body("a", stop=stop))
    assert body["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_chat_asks_each_adapter_as_it_was_trained(tiny_export, tiny_model_factory, tmp_path):
    """Train as you serve: an adapter trained on raw text (`--format raw`) gets a chat client's one
    user message as that raw text, not through the chat template."""
    export_dir, _ = tiny_export
    adapter = make_adapter(tiny_model_factory("llama"), tmp_path / "r", 5, 4, ADAPTERS["a"][2])
    meta = json.loads((adapter / "odlora.json").read_text())
    (adapter / "odlora.json").write_text(json.dumps({**meta, "prompt_format": "raw"}))
    pack(adapter, export_dir, tmp_path / "r.onnx_adapter")
    rt = open_runtime(tiny_export)
    rt.register_adapter("r", tmp_path / "r.onnx_adapter")
    want = expected(rt, "r", prompt=PROMPT, chat=False)
    assert want.text != expected(rt, "r", chat=True).text, "the template must change the answer"
    with serving(rt) as url:
        status, body = call(url, "/chat/completions", chat_body("r"))
    assert status == 200 and body["choices"][0]["message"]["content"] == want.text
    assert body["usage"]["prompt_tokens"] == want.prompt_tokens == len(rt.tokenizer.encode(PROMPT))


def test_streamed_chat_concatenates_to_the_same_text(rt, url):
    want = expected(rt, "a")
    content_type, data = events(url, "/chat/completions", chat_body("a", stream_options={"include_usage": True}))
    assert content_type == "text/event-stream" and data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert deltas[0]["delta"]["role"] == "assistant"
    assert "".join(d["delta"].get("content", "") for d in deltas) == want.text
    assert deltas[-1]["finish_reason"] == "length" and deltas[-1]["delta"] == {}
    assert chunks[-1]["usage"]["completion_tokens"] == len(want.token_ids)


def test_streamed_completion(rt, url):
    want = expected(rt, "b", prompt=PROMPT, chat=False)
    _, data = events(url, "/completions", {"model": "b", "prompt": PROMPT, "max_tokens": GREEDY.max_new_tokens})
    chunks = [json.loads(d) for d in data[:-1]]
    assert data[-1] == "[DONE]" and {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# -- errors --------------------------------------------------------------------------------------------

BAD = {
    "unknown model": ("/chat/completions", chat_body("zzz"), 404, "model", "model_not_found"),
    "unknown model in a blend": ("/chat/completions", chat_body("a:0.5+zzz"), 404, "model", "model_not_found"),
    "bad JSON": ("/chat/completions", b'{"model": "a", ', 400, None, "invalid_json"),
    "missing messages": ("/chat/completions", {"model": "a"}, 400, "messages", "missing_required_parameter"),
    "missing model": ("/completions", {"prompt": PROMPT}, 400, "model", "missing_required_parameter"),
    "wrong type": ("/chat/completions", chat_body("a", max_tokens="ten"), 400, "max_tokens", "invalid_type"),
    "message without a role": ("/chat/completions", {"model": "a", "messages": [{"content": 1}]}, 400,
                               "messages[0].role", "missing_required_parameter"),
    "message content a number": ("/chat/completions", {"model": "a", "messages": [{"role": "user", "content": 1}]},
                                 400, "messages[0].content", "invalid_type"),
    "no messages": ("/chat/completions", {"model": "a", "messages": []}, 400, "messages", "invalid_value"),
    "prompt too long": ("/completions", {"model": "a", "prompt": PROMPT * 20}, 400, "prompt", "context_length_exceeded"),
    "messages too long": ("/chat/completions", {"model": "a", "messages": [{"role": "user", "content": PROMPT * 20}]},
                          400, "messages", "context_length_exceeded"),
    "bad temperature": ("/chat/completions", chat_body("a", temperature=-1), 400, "temperature", "invalid_value"),
    "n of 200": ("/chat/completions", chat_body("a", n=200), 400, "n", "invalid_value"),
    "tools": ("/chat/completions", chat_body("a", tools=[]), 400, "tools", "unsupported_parameter"),
    "no such route": ("/embeddings", {"model": "a"}, 404, None, "not_found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_fail_alone(rt, url, case):
    path, body, status, param, code = BAD[case]
    got, answer = call(url, path, body)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
    assert (answer["error"]["param"], answer["error"]["code"]) == (param, code)
    status, body = call(url, "/chat/completions", chat_body("a"))
    assert status == 200 and body["choices"][0]["message"]["content"] == expected(rt, "a").text


def test_prompt_too_long_names_the_limit(url):
    status, body = call(url, "/completions", {"model": "a", "prompt": PROMPT * 20, "stream": True})
    assert status == 400 and f"max_seq_len {MAX_SEQ}" in body["error"]["message"]  # a 400 even when streaming


def test_corrupt_blob_fails_its_requests_only(tiny_export, tmp_path):
    _, blobs = tiny_export
    blob = Path(shutil.copy(blobs["a"], tmp_path / "mine.onnx_adapter"))
    shutil.copy(blobs["a"].with_name("a.onnx_adapter.json"), tmp_path / "mine.onnx_adapter.json")
    rt = open_runtime(tiny_export, cache_bytes=0)  # nothing cached: every request reads its blob
    rt.register_adapter("mine", blob)
    with serving(rt) as url:
        assert call(url, "/chat/completions", chat_body("mine"))[0] == 200
        blob.write_bytes(blob.read_bytes()[:-8] + b"\0" * 8)
        status, body = call(url, "/chat/completions", chat_body("mine"))
        assert status == 400 and "corrupt" in body["error"]["message"]
        status, body = call(url, "/chat/completions", chat_body("b"))
        assert status == 200 and body["choices"][0]["message"]["content"] == expected(rt, "b").text


# -- concurrency ---------------------------------------------------------------------------------------

def test_concurrent_requests_get_their_own_adapter(rt, url):
    models = {"base": None, "a": "a", "b": "b", "a:0.5+b:1": [("a", 0.5), ("b", 1.0)]}
    want = {model: expected(rt, adapter).text for model, adapter in models.items()}
    assert len(set(want.values())) == len(want), "the adapters must change the greedy text"
    results, errors = [], []
    start = threading.Barrier(8)

    def worker(i):
        try:
            start.wait()
            for j in range(2):
                model = list(models)[(i + j) % len(models)]
                status, body = call(url, "/chat/completions", chat_body(model))
                results.append((model, status, body["choices"][0]["message"]["content"]))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 16 and all(status == 200 and text == want[model] for model, status, text in results)


# -- the command line ----------------------------------------------------------------------------------

def test_serve_help_explains_itself():
    from click.testing import CliRunner

    from ondevice_lora.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    for words in ("OpenAI", "/v1/models", "/v1/chat/completions", "/v1/completions", "a:0.7+b:0.3", "--adapter",
                  "[ID=]FILE", "--host", "127.0.0.1", "--port", "--backend", "stream"):
        assert words in result.output, words


@contextmanager
def serve_process(tiny_export, *flags, env=None):
    """`odlora serve` on a free port with adapters dates (a) and b; yields (process, its first line)."""
    export_dir, blobs = tiny_export
    process = subprocess.Popen([sys.executable, "-m", "ondevice_lora", "serve", "--export", export_dir, "--port", "0",
                                "--adapter", f"dates={blobs['a']}", "--adapter", blobs["b"], *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})},
                               # A shell starts background jobs with SIGINT ignored, and a child
                               # inherits that: give the server the terminal's default, as a user's has.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    result = {}
    try:
        yield process, process.stdout.readline(), result
    finally:
        process.send_signal(signal.SIGINT)
        result["out"], result["err"] = process.communicate(timeout=30)


def test_serve_command_says_where_it_listens_and_stops_on_ctrl_c(tiny_export):
    with serve_process(tiny_export) as (process, line, result):
        pattern = r"odlora serve: listening on http://127\.0\.0\.1:\d+/v1 \(models: base, b, dates\)\n"
        assert re.fullmatch(pattern, line), line + process.stderr.read()
        status, body = call(line.split()[4], "/models")
        assert status == 200 and [m["id"] for m in body["data"]] == ["base", "b", "dates"]
        page = process.stdout.readline()
        assert page == f"odlora serve: web demo on {line.split()[4].removesuffix('/v1')}/\n", page
        with urllib.request.urlopen(page.split()[-1], timeout=30) as response:  # the demo page (tests/test_web.py)
            assert response.headers["Content-Type"].startswith("text/html")
    assert process.returncode == 0 and "odlora serve: stopped" in result["err"]
    assert re.search(r'127\.0\.0\.1:\d+ "GET /v1/models HTTP/1\.1" 200', result["err"]), result["err"]  # access log


def test_serve_command_with_an_api_key_and_an_allowed_host(tiny_export):
    key = "k3y-from-the-environment"
    with serve_process(tiny_export, "--allow-host", "phone.local", env={"ODLORA_API_KEY": key}) as (process, line, _):
        url = line.split()[4]
        process.stdout.readline()  # the web demo's address
        assert "needs the API key" in process.stdout.readline() and key not in line
        for headers, status in (({}, 401), ({"Authorization": "Bearer nope"}, 401),
                                ({"Authorization": f"Bearer {key}"}, 200),
                                ({"Authorization": f"Bearer {key}", "Host": "phone.local:8000"}, 200),
                                ({"Authorization": f"Bearer {key}", "Host": "other.local"}, 403)):
            request = urllib.request.Request(url + "/models", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    got = response.status
            except urllib.error.HTTPError as e:
                got = e.code
            assert got == status, headers


BAD_SERVE_FLAGS = {
    # name -> (flags, what the error names)
    "an empty API key": (["--api-key", ""], "--api-key"),
    "an API key with a space": (["--api-key", "two words"], "--api-key"),
    "a non-ASCII API key": (["--api-key", "clé"], "--api-key"),
    "an allowed host with a scheme": (["--allow-host", "http://evil.example/"], "--allow-host"),
    "an allowed host with a port": (["--allow-host", "evil.example:80"], "--allow-host"),
    "a port over 65535": (["--port", "99999"], "--port"),
    "a CORS site that is no web origin": (["--cors-origin", "ftp://app.example"], "--cors-origin"),
    "a CORS site with a path": (["--cors-origin", "https://app.example/page"], "--cors-origin"),
    "a CORS site with a bad port": (["--cors-origin", "https://app.example:http"], "--cors-origin"),
}


@pytest.mark.parametrize("case", list(BAD_SERVE_FLAGS))
def test_serve_refuses_bad_flags_before_loading(tiny_export, tmp_path, monkeypatch, capsys, case):
    from ondevice_lora.cli import main

    flags, named = BAD_SERVE_FLAGS[case]
    monkeypatch.setattr(sys, "argv", ["odlora", "serve", "--export", str(tiny_export[0]), "--work",
                                      str(tmp_path / "work"), *flags])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and named in err and "Traceback" not in err, err
    if named != "--port":  # click's own usage errors are the CLI's business (tests/test_bad_input.py)
        assert err.count("\n") == 1 and err.startswith("odlora: error: "), err
