"""Load on `odlora serve`: bursts of simultaneous clients, then a thousand stalled connections.

    python bench/bench_serve_load.py --tiny        # a tiny random export built in a temp dir: a quick check
    python bench/bench_serve_load.py --export odlora-demo/exports/onnx \\
        --adapter odlora-demo/packed/onnx/dates.onnx_adapter --adapter odlora-demo/packed/onnx/contacts.onnx_adapter
    ... [--clients 64] [--bursts 4] [--max-tokens 16] [--stalled 1000] [--json]

Starts `odlora serve` on a free loopback port (a subprocess, stopped at the end), then:

1. the single-client answer to every request kind (each prompt x model x endpoint, greedy; models:
   `base`, each adapter, and blends of the first two), one request at a time;
2. `--bursts` bursts of `--clients` clients released together, each on its own new connection, the
   request kinds mixed and every other one streamed; every answer is compared with the single-client
   one. Prints connection resets, other failures (503s included), wrong answers, p50/p99 latency
   per burst, and the server's RSS before and after;
3. `--stalled` connections that stall (half send nothing, half half a request head), a request
   answered while they hang, and the time until the server has closed every one of them (its head
   timeout: `ServerSettings.head_timeout`), then a request answered again.

Loopback only, every wait bounded; it exits 1 when a check fails. The figures are worthless while
anything else runs on the machine (see the README's notes on benchmarks on 2 cores).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import selectors
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ondevice_lora.runtime.server import ServerSettings

PROMPTS = ["The cat looks at the river.", "My friend remembers 12 apples!", "What is the capital?",
           "She writes a red house."]
REQUEST_TIMEOUT = 600  # seconds for one answer in a burst: a bound, never reached when the server holds
CLOSE_SLACK = 30  # seconds beyond the head timeout for the server to close every stalled connection
TINY_MAX_SEQ = 128


# -- the export and the server ---------------------------------------------------------------------------

def tiny_export(root: Path) -> tuple[Path, list[str]]:
    """The tests' tiny random Llama (tests/conftest.py), exported for ONNX with two random adapters."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import build_tiny_tokenizer, make_tiny_hf_model
    from test_runtime import ADAPTERS, make_adapter

    from ondevice_lora.exporters.export import export, pack

    base_dir = make_tiny_hf_model("llama", root / "base", build_tiny_tokenizer())
    export(str(base_dir), "onnx", root / "onnx", max_rank=8, max_seq_len=TINY_MAX_SEQ, say=lambda *_: None)
    specs = []
    for name in ("a", "b"):
        blob = root / f"{name}.onnx_adapter"
        pack(make_adapter(base_dir, root / f"adapter-{name}", *ADAPTERS[name]), root / "onnx", blob)
        specs.append(f"{name}={blob}")
    return root / "onnx", specs


def start_server(export_dir: Path, adapters: list[str], work: Path, log) -> tuple[subprocess.Popen, int, list[str]]:
    """`odlora serve` on a free loopback port, its stderr (the access log) to `log`; (process, port, models)."""
    command = [sys.executable, "-m", "ondevice_lora", "serve", "--export", str(export_dir), "--port", "0",
               "--work", str(work), *[arg for spec in adapters for arg in ("--adapter", spec)]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline()  # "odlora serve: listening on http://127.0.0.1:PORT/v1 (models: ...)"
    if not line.startswith("odlora serve: listening on "):
        process.kill()
        raise SystemExit(f"odlora serve did not start: {line!r}; see {work / 'server.log'}")
    models = line.split("(models: ", 1)[1].rstrip(")\n").split(", ")
    return process, int(line.split()[4].rsplit(":", 1)[1].split("/")[0]), models


def rss_mb(pid: int) -> float:
    """The process's resident set now (Linux /proc, else ps)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024
    except OSError:
        return int(subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout) / 1024


# -- one request -----------------------------------------------------------------------------------------

def request_kinds(models: list[str], prompts: list[str], max_tokens: int) -> list[dict]:
    adapters = [m for m in models if m != "base"]
    blends = []
    if len(adapters) > 1:
        blends = [f"{adapters[0]}:0.7+{adapters[1]}:0.3", f"{adapters[0]}:0.5+{adapters[1]}:0.5"]
    kinds = []
    for prompt in prompts:
        for model in ["base", *adapters, *blends]:
            kinds.append({"path": "/v1/chat/completions", "body": {"model": model, "max_tokens": max_tokens,
                                                                  "messages": [{"role": "user", "content": prompt}]}})
            kinds.append({"path": "/v1/completions", "body": {"model": model, "max_tokens": max_tokens,
                                                             "prompt": prompt}})
    return kinds


def ask(port: int, kind: dict, stream: bool) -> str:
    """The answer's text (a streamed one joined from its events); raises on anything but a 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("POST", kind["path"], json.dumps({**kind["body"], "stream": stream}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
    chat = kind["path"].endswith("chat/completions")
    if not stream:
        choice = json.loads(data)["choices"][0]
        return choice["message"]["content"] if chat else choice["text"]
    events = [e[len("data: "):] for e in data.decode().split("\n\n") if e]
    if events[-1] != "[DONE]":
        raise RuntimeError(f"the stream ended without [DONE]: {events[-1][:200]}")
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        raise RuntimeError(f"an error event: {chunks[-1]}")
    pieces = [c["choices"][0] for c in chunks if c["choices"]]
    return "".join(p["delta"].get("content", "") if chat else p["text"] for p in pieces)


# -- the load --------------------------------------------------------------------------------------------

def burst(port: int, kinds: list[dict], want: list[str], clients: int, offset: int) -> dict:
    """`clients` requests released together; each its own connection, kinds mixed, every other one streamed."""
    outcomes = [None] * clients
    gate = threading.Barrier(clients)

    def client(i: int) -> None:
        k = (offset + i) % len(kinds)
        gate.wait()
        started = time.perf_counter()
        try:
            text = ask(port, kinds[k], stream=i % 2 == 1)
            outcomes[i] = ("ok" if text == want[k] else "wrong", time.perf_counter() - started, None)
        except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError, http.client.RemoteDisconnected) as e:
            outcomes[i] = ("reset", time.perf_counter() - started, repr(e))
        except Exception as e:  # a 503, a timeout, a broken answer: counted and shown
            outcomes[i] = ("failed", time.perf_counter() - started, repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT + 10)
    outcomes = [o or ("failed", float("nan"), "no answer in time") for o in outcomes]
    latencies = sorted(seconds for kind, seconds, _ in outcomes if kind in ("ok", "wrong"))
    count = {kind: sum(o[0] == kind for o in outcomes) for kind in ("ok", "wrong", "reset", "failed")}
    return {**count, "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "errors": sorted({e for _, _, e in outcomes if e})[:5]}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def stalled_connections(port: int, n: int, kinds: list[dict], want: list[str]) -> dict:
    """Open `n` connections that stall, check a request is answered meanwhile, time the server's closing."""
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
    socks = []
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:
            sock.sendall(head)  # half a head: no blank line ever comes
        sock.setblocking(False)
        socks.append(sock)
    opened = time.perf_counter()
    answered_meanwhile = ask(port, kinds[0], stream=False) == want[0]
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    closed, deadline = 0, opened + ServerSettings().head_timeout + CLOSE_SLACK
    while closed < n and time.perf_counter() < deadline:
        for key, _ in selector.select(timeout=1):
            try:
                data = key.fileobj.recv(4096)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if not data:
                selector.unregister(key.fileobj)
                key.fileobj.close()
                closed += 1
    seconds = time.perf_counter() - opened
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    answered_after = ask(port, kinds[1], stream=True) == want[1]
    return {"stalled": n, "closed_by_server": closed, "seconds_to_close_all": round(seconds, 2),
            "head_timeout_s": ServerSettings().head_timeout, "answered_meanwhile": answered_meanwhile,
            "answered_after": answered_after}


def raise_fd_limit(needed: int) -> None:
    """Room for the stalled connections on both ends (the server inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, needed)) if hard != resource.RLIM_INFINITY else max(soft, needed)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run(args, export_dir: Path, adapters: list[str], work: Path) -> dict:
    raise_fd_limit(2 * args.stalled + 256)
    with open(work / "server.log", "w") as log:
        return load_server(args, *start_server(export_dir, adapters, work, log))


def load_server(args, process: subprocess.Popen, port: int, models: list[str]) -> dict:
    try:
        kinds = request_kinds(models, args.prompt or PROMPTS, args.max_tokens)
        want = [ask(port, kind, stream=False) for kind in kinds]  # the single-client answers
        rss_before = rss_mb(process.pid)
        bursts = [burst(port, kinds, want, args.clients, offset=b * args.clients) for b in range(args.bursts)]
        rss_after = rss_mb(process.pid)
        stalled = stalled_connections(port, args.stalled, kinds, want) if args.stalled else None
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    latencies = [b["p50_s"] for b in bursts]
    return {"command": shlex.join([sys.executable, *sys.argv]), "models": models, "request_kinds": len(kinds),
            "clients": args.clients, "bursts": bursts, "rss_mb_before": round(rss_before, 1),
            "rss_mb_after": round(rss_after, 1), "median_p50_s": statistics.median(latencies), "stalled": stalled,
            "server_exit": process.returncode}


def report(result: dict) -> bool:
    """Print the figures; True when every check held."""
    print(f"command: {result['command']}")
    print(f"models: {', '.join(result['models'])}; {result['request_kinds']} request kinds")
    totals = {k: sum(b[k] for b in result["bursts"]) for k in ("ok", "wrong", "reset", "failed")}
    for i, b in enumerate(result["bursts"], 1):
        print(f"burst {i}: {result['clients']} clients: {b['ok']} right, {b['wrong']} wrong, {b['reset']} connection "
              f"resets, {b['failed']} other failures; latency p50 {b['p50_s']:.3f} s, p99 {b['p99_s']:.3f} s"
              + (f"; {b['errors']}" if b["errors"] else ""))
    print(f"all bursts: {totals['ok']} right, {totals['wrong']} wrong, {totals['reset']} connection resets, "
          f"{totals['failed']} other failures")
    print(f"server RSS: {result['rss_mb_before']:.1f} MB before the bursts, {result['rss_mb_after']:.1f} MB after")
    ok = totals["wrong"] == totals["reset"] == totals["failed"] == 0
    stalled = result["stalled"]
    if stalled:
        print(f"stalled: {stalled['closed_by_server']} of {stalled['stalled']} connections closed by the server in "
              f"{stalled['seconds_to_close_all']} s (head timeout {stalled['head_timeout_s']:g} s); answered "
              f"meanwhile: {stalled['answered_meanwhile']}, after: {stalled['answered_after']}")
        ok = ok and stalled["closed_by_server"] == stalled["stalled"] and stalled["answered_meanwhile"] \
            and stalled["answered_after"]
    print("all checks held" if ok else "A CHECK FAILED")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="Build a tiny random export with adapters a and b.")
    source.add_argument("--export", type=Path, help="An `odlora export` directory (or bundle).")
    parser.add_argument("--adapter", action="append", default=[], metavar="[ID=]FILE",
                        help="A packed adapter for --export (repeatable; two or more make blends).")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--bursts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stalled", type=int, default=1000, help="Stalled connections to open (0: skip).")
    parser.add_argument("--prompt", action="append", help="A prompt (repeatable; default: four short sentences).")
    parser.add_argument("--json", action="store_true", help="Also print the result as one JSON line.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="odlora-serve-load-") as tmp:
        work = Path(tmp)
        export_dir, adapters = tiny_export(work) if args.tiny else (args.export, args.adapter)
        result = run(args, export_dir, adapters, work)
    ok = report(result)
    if args.json:
        print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
