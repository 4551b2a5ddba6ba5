"""The native runtime (runtime/native) against the Python runtime on one ExecuTorch bundle of the
default base: the same requests, adapters alternating per request on one loaded base.

    ODLORA_HOME=/tmp/oh python bench/bench_native.py                       # fp32 export, 2 adapters
    ODLORA_HOME=/tmp/oh python bench/bench_native.py --quant 8da4w --work /tmp/native-bench

Setup (kept in --work, reused on a second run): the native build (build/native), one ExecuTorch
export of the base (slots r <= 16 on all seven linears), two random rank-8 all-linear adapters
packed for it (bench_runtime's), and a bundle of all three. Then each runtime answers --rounds
rounds of [a, b, base] on the same prompts, greedy, --tokens tokens each, and the script prints:

- per runtime: open (verify every sha256 + load the base; the native process's wall time for
  `--verify`), the adapter lookup at the start of a request (the swap: the native engine builds an
  adapter's program inputs when it is registered), prefill ms and decode tokens/s for requests
  that switch adapter vs requests with the base, and the process's peak RSS;
- whether the native tokens equal the Python runtime's on every request (they should).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_runtime import export_once, make_adapters, pack_once  # noqa: E402

PROMPTS = ["What is the capital of France?", "Normalise: March 5th, 2021",
           "Write one sentence about the sea.", "Extract the phone number: call Ana on 0612 345 678."]


def run_child(cmd: list[str]) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS MB) of one child process. The peak is the child's own VmHWM,
    read from /proc while it runs: its ru_maxrss would carry this (large) process's peak over
    through fork and exec."""
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()
    watcher = threading.Thread(target=watch_peak_rss, args=(child.pid, peak, done))
    watcher.start()
    out = child.stdout.read()  # a line per request; stderr stays small
    done.set()
    watcher.join()
    if child.wait() != 0:
        sys.exit(f"{shlex.join(cmd)} failed: {child.stderr.read().strip()}")
    return out, time.perf_counter() - started, peak[0] / 1024


def watch_peak_rss(pid: int, peak: list, done: threading.Event) -> None:
    """Keep peak[0] at the largest VmHWM (KiB) of process `pid` seen until `done` or its exit."""
    status = Path(f"/proc/{pid}/status")
    while not done.is_set():
        try:
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        except (OSError, StopIteration):  # exited (or a zombie without memory)
            return
        peak[0] = max(peak[0], int(line.split()[1]))
        done.wait(0.02)


def native_run(binary: Path, bundle: Path, requests: list[dict], work: Path) -> tuple[list[dict], float]:
    path = work / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    out, _, rss = run_child([str(binary), str(bundle), "--requests", str(path)])
    return [json.loads(line) for line in out.splitlines()], rss


def python_run(bundle: Path, requests: list[dict], tokens: int) -> tuple[list[dict], float]:
    from ondevice_lora.config import SamplingConfig
    from ondevice_lora.runtime import Runtime

    started = time.perf_counter()
    rt = Runtime.open_bundle(bundle)
    opened = time.perf_counter() - started
    answers = []
    for r in requests:
        g = rt.generate(r["prompt"], adapter=None if r["adapter"] == "base" else r["adapter"],
                        sampling=SamplingConfig(max_new_tokens=tokens))
        answers.append({"adapter": r["adapter"], "token_ids": g.token_ids, "prefill_ms": g.prefill_seconds * 1000,
                        "total_ms": g.seconds * 1000})
    return answers, opened


def decode_tps(answers: list[dict]) -> float:
    """Decode tokens/s: the tokens after the first (which comes from the prefill) over the time after the prefill."""
    steps = sum(len(a["token_ids"]) - 1 for a in answers)
    return steps / (sum(a["total_ms"] - a["prefill_ms"] for a in answers) / 1000)


def summarise(answers: list[dict]) -> dict:
    switched = [a for i, a in enumerate(answers) if a["adapter"] != "base" and i > 0]
    base = [a for a in answers if a["adapter"] == "base"]
    out = {"prefill_ms_adapter": statistics.median(a["prefill_ms"] for a in switched),
           "prefill_ms_base": statistics.median(a["prefill_ms"] for a in base),
           "decode_tps_adapter": decode_tps(switched), "decode_tps_base": decode_tps(base)}
    if "swap_us" in answers[0]:
        out["swap_us_p50"] = statistics.median(a["swap_us"] for a in switched)
        out["swap_us_max"] = max(a["swap_us"] for a in switched)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None)
    p.add_argument("--quant", default="fp32", choices=["fp32", "8da8w", "8da4w"])
    p.add_argument("--work", type=Path, default=Path("/tmp/odlora-native-bench"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--max-rank", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    args = p.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)

    from ondevice_lora.base import load_base
    from ondevice_lora.runtime.bundle import write_bundle
    from ondevice_lora.runtime.native_build import build

    args.work.mkdir(parents=True, exist_ok=True)
    binary = build(say=lambda m: print(m, flush=True))
    base = load_base(args.base)
    args.base = base.spec
    export_dir = export_once(base, "executorch", args.quant, args)
    blobs = pack_once(make_adapters(base, args.work, 8, 2), export_dir, "executorch")
    bundle = args.work / f"bundle-{export_dir.name}"
    if not (bundle / "bundle.json").exists():
        write_bundle(export_dir, [("a", blobs[0]), ("b", blobs[1])], bundle, force=True)
    requests = [{"adapter": adapter, "prompt": PROMPTS[(i + j) % len(PROMPTS)], "max_new_tokens": args.tokens}
                for i in range(args.rounds) for j, adapter in enumerate(("a", "b", "base"))]

    _, verify_s, verify_rss = run_child([str(binary), str(bundle), "--verify"])
    native, native_rss = native_run(binary, bundle, requests, args.work)
    python, python_open_s = python_run(bundle, requests, args.tokens)
    same = [n["token_ids"] == p["token_ids"] for n, p in zip(native, python)]
    rows = {"native": {"open_s": verify_s, "peak_rss_mb": native_rss, **summarise(native)},
            "python": {"open_s": python_open_s, **summarise(python)}}
    print(f"\n{export_dir.name}: {len(requests)} requests ({args.rounds} rounds of a, b, base), {args.tokens} tokens each")
    for name, row in rows.items():
        print(f"{name:7s} " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()))
    print(f"native tokens == python tokens on {sum(same)}/{len(same)} requests")
    print(json.dumps({"rows": rows, "same_tokens": sum(same), "requests": len(same)}))


if __name__ == "__main__":
    main()
