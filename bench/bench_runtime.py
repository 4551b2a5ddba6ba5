"""The runtime's adapter swap on the default base: swap latency (warm, cold) against reloading the
model, prefill and decode speed with an adapter against none, and memory with 1 vs 50 adapters.

    ODLORA_HOME=/tmp/oh python bench/bench_runtime.py                        # onnx and executorch, fp32
    ODLORA_HOME=/tmp/oh python bench/bench_runtime.py --backends onnx --quant int4 --work /tmp/rt-bench
    ODLORA_HOME=/tmp/oh python bench/bench_runtime.py --quant onnx=int4,executorch=8da4w
    ODLORA_HOME=/tmp/oh python bench/bench_runtime.py --quick                # few samples: does it run?

Setup, all kept in --work and reused on a second run (delete a directory to rebuild it): per
backend one `export()` of the base (slots r <= --max-rank on all seven linears), --adapters random
rank --adapter-rank all-linear adapters (PEFT init for A, B ~ N(0, 0.01), alpha 2r; or --adapter
DIR, a trained one, for the swap and speed parts) and their packed blobs.

1. Swap. A request's path before its first forward is `Runtime.resolve_adapter` (the adapter from the
   LRU cache, or loaded from disk) then `backend.sequence(loaded)` (its per-request state: the
   ONNX KV-cache buffers and RunOptions with the adapter active; nothing for ExecuTorch). Timed
   per request, --swaps requests per mode:

       base       no adapter: the per-request floor (the swap's cost is a row minus this one)
       same       the adapter of the previous request (no switch)
       warm       a switch to another adapter in the cache
       cold       a switch after the cache was emptied: read from disk (page cache warm)
       cold-disk  the same with the blob dropped from the page cache first (posix_fadvise; best
                  effort: a file still mapped elsewhere stays cached)

   Columns: resolve alone, resolve + sequence (the swap), and the swap plus the first one-token
   forward (which also pays what a backend defers to its first run: ExecuTorch's per-layer
   input views of a new adapter, ONNX's first touch of a memory-mapped blob). Against it, one
   reload of the model: `Runtime.open` (checksums, tokenizer, program), and with a first forward.
2. Speed. Prefill --prompt-tokens tokens of ondevice_lora/samples/general.txt, then --tokens greedy
   one-token decode steps, with the adapter and with zero slots (no adapter), interleaved, best
   of --rounds; tokens/s and the ratio adapter / none (the goal is >= 0.9).
3. Memory. A fresh process per count (0, 1, --adapters) opens the export, registers that many
   distinct packed blobs and generates --rss-tokens tokens with each. RSS before the open (Python
   and the backend's libraries), after it (plus the base), the peak from then on (VmHWM reset after
   the open; Linux), at the end, and the process's lifetime peak (ru_maxrss: imports and open
   included). Adapters beyond the cache budget (--cache-mb) are evicted, so what 50 adapters add
   is bounded by the budget, and the base is there once whatever the count.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BACKENDS = ("onnx", "executorch")  # the targets that run here
MODES = ("base", "same", "warm", "cold", "cold-disk")


# -- setup: exports, adapters, blobs (kept in --work) ------------------------------------------

def make_adapters(base, root: Path, rank: int, n: int) -> list[Path]:
    """`n` distinct random rank-`rank` all-linear adapters for `base` (made once, kept in `root`)."""
    from ondevice_lora.adapter import adapter_from_model, save_adapter
    from ondevice_lora.config import LoraConfig
    from ondevice_lora.lora import apply_lora, lora_layers, remove_lora

    dirs = [root / f"adapter-r{rank}-{i:02d}" for i in range(n)]
    missing = [(i, d) for i, d in enumerate(dirs) if not (d / "adapter_config.json").exists()]
    if missing:
        config = LoraConfig(rank=rank, alpha=2.0 * rank)
        apply_lora(base.model, config)
        with torch.no_grad():
            for i, d in missing:
                torch.manual_seed(i)
                for layer in lora_layers(base.model).values():
                    torch.nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))
                    layer.lora_B.weight.normal_(0.0, 0.01)
                save_adapter(adapter_from_model(base.model, config, {"base_fingerprint": base.fingerprint}), d, base.spec)
        remove_lora(base.model)
    return dirs


def export_once(base, backend: str, quant: str, args) -> Path:
    from ondevice_lora.exporters.export import export, read_manifest

    out = args.work / f"{backend}-{quant}-r{args.max_rank}-s{args.max_seq_len}"
    if not (out / "manifest.json").exists():
        print(f"exporting {backend} {quant} into {out} (once) ...", flush=True)
        export(args.base, backend, out, quant=quant, max_rank=args.max_rank, max_seq_len=args.max_seq_len,
               force=True, say=lambda *_: None)
    if read_manifest(out, verify=False)["base_fingerprint"] != base.fingerprint:
        sys.exit(f"{out} was exported from another base: delete it or use another --work")
    return out


def pack_once(adapter_dirs: list[Path], export_dir: Path, backend: str) -> list[Path]:
    from ondevice_lora.exporters.export import pack
    from ondevice_lora.formats.targets import target

    blobs = []
    for d in adapter_dirs:
        blob = export_dir.parent / f"blobs-{export_dir.name}" / (d.name + target(backend).blob_suffix)
        sidecar = blob.with_name(blob.name + ".json")
        if not sidecar.exists() or sidecar.stat().st_mtime < (d / "adapter_model.safetensors").stat().st_mtime:
            pack(d, export_dir, blob)
        blobs.append(blob)
    return blobs


def prompt_ids(tokenizer, n: int) -> list[int]:
    from ondevice_lora.samples import general_text_path

    ids = tokenizer.encode(general_text_path().read_text(), add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


# -- 1. swap ----------------------------------------------------------------------------------------

def drop_page_cache(path: Path) -> None:
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_swaps(rt, mode: str, ids: list[str], blobs: dict[str, Path], n: int, token: int) -> dict:
    """(p50, p99) seconds per request for `mode`: resolve, resolve + sequence (the swap), swap + first forward."""
    times = []
    for i in range(n):
        name = {"base": None, "same": ids[0]}.get(mode, ids[(i + 1) % len(ids)])  # warm/cold: alternate
        if mode in ("cold", "cold-disk"):
            rt.cache.drop(lambda key: True)
            gc.collect()  # the dropped adapter's memory and mappings go now, not inside the timing
            if mode == "cold-disk":
                drop_page_cache(blobs[name])
        times.append(one_request(rt, name, token))
    return {k: (percentile(v, 50), percentile(v, 99)) for k, v in zip(("resolve", "swap", "first"), zip(*times))}


def one_request(rt, name, token: int) -> tuple[float, float, float]:
    """What `Runtime.generate` does before and at its first forward, timed (nothing outlives the call)."""
    started = time.perf_counter()
    loaded, _ = rt.resolve_adapter(name)
    resolved = time.perf_counter()
    with rt.backend.sequence(loaded) as seq:
        entered = time.perf_counter()
        seq.forward([token], 0)
        done = time.perf_counter()
    return resolved - started, entered - started, done - started


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]  # nearest rank


def time_reload(export_dir: Path, threads: int, cache_bytes: int, token: int) -> tuple[float, float]:
    from ondevice_lora.runtime import Runtime

    started = time.perf_counter()
    rt = Runtime.open(export_dir, threads=threads, cache_bytes=cache_bytes)
    opened = time.perf_counter()
    with rt.backend.sequence(None) as seq:
        seq.forward([token], 0)
    return opened - started, time.perf_counter() - started


# -- 2. speed ---------------------------------------------------------------------------------------

def run_sequence(rt, loaded, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `tokens` greedy one-token steps)."""
    with rt.backend.sequence(loaded) as seq:
        started = time.perf_counter()
        logits = seq.forward(prompt, 0)
        prefilled = time.perf_counter()
        for pos in range(len(prompt), len(prompt) + tokens):
            logits = seq.forward([int(logits.argmax())], pos)
        return prefilled - started, time.perf_counter() - prefilled


def measure_speed(rt, adapter_id: str, prompt: list[int], tokens: int, rounds: int) -> dict:
    """{"none"|"adapter": (prefill tokens/s, decode tokens/s)}, best of interleaved rounds."""
    runs = {"none": None, "adapter": rt.resolve_adapter(adapter_id)[0]}
    for loaded in runs.values():  # warm-up: first runs allocate
        run_sequence(rt, loaded, prompt, tokens)
    best = {name: [math.inf, math.inf] for name in runs}
    for _ in range(rounds):
        for name, loaded in runs.items():
            prefill, decode = run_sequence(rt, loaded, prompt, tokens)
            best[name] = [min(best[name][0], prefill), min(best[name][1], decode)]
    return {name: (len(prompt) / p, tokens / d) for name, (p, d) in best.items()}


# -- 3. memory, in a fresh process --------------------------------------------------------------------

def rss_child(spec: dict) -> None:
    from ondevice_lora.config import SamplingConfig
    from ondevice_lora.runtime import Runtime

    target = json.loads((Path(spec["export"]) / "manifest.json").read_text())["target"]
    importlib.import_module({"onnx": "onnxruntime", "executorch": "executorch.runtime"}[target])
    before_open = proc_status("VmRSS")  # Python, torch, the runtime's libraries: no base yet
    rt = Runtime.open(spec["export"], threads=spec["threads"], cache_bytes=spec["cache_bytes"])
    after_open = proc_status("VmRSS")
    reset = reset_peak_rss()  # from here VmHWM is the peak of what adapters and requests add
    names = [f"a{i}" for i in range(len(spec["blobs"]))]
    for name, blob in zip(names, spec["blobs"]):
        rt.register_adapter(name, blob)
    cfg = SamplingConfig(max_new_tokens=spec["tokens"])
    for name in names or [None]:
        rt.generate(spec["prompt"], adapter=name, sampling=cfg, chat=False)
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(json.dumps({"before_open": before_open, "after_open": after_open,
                      "peak_after_open": proc_status("VmHWM") if reset else None,
                      "end": proc_status("VmRSS"), "process_peak": process_peak, **rt.stats()}))


def proc_status(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status in bytes (Linux; None elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith(field + ":")), None)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_rss(export_dir: Path, blobs: list[Path], counts: list[int], args) -> dict:
    out = {}
    for n in counts:
        spec = {"export": str(export_dir), "blobs": [str(b) for b in blobs[:n]], "threads": args.threads,
                "cache_bytes": int(args.cache_mb * 2**20), "tokens": args.rss_tokens, "prompt": "The weather today is"}
        result = subprocess.run([sys.executable, __file__, "--rss-child", json.dumps(spec)], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"memory child with {n} adapters failed:\n{result.stderr[-3000:]}")
        out[n] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# -- the run ----------------------------------------------------------------------------------------

def parse_quants(spec: str | None, backends: list[str]) -> dict[str, str]:
    """`int4` (every backend) or `onnx=int4,executorch=8da4w`; unnamed backends take their default."""
    from ondevice_lora.formats.targets import target

    quants = {b: target(b).quants[0] for b in backends}
    for part in filter(None, (spec or "").split(",")):
        backend, _, quant = part.rpartition("=")
        for b in [backend] if backend else backends:
            if b not in quants:
                sys.exit(f"--quant {part}: {b} is not in --backends")
            if quant not in target(b).quants:
                sys.exit(f"--quant {part}: {b} takes {', '.join(target(b).quants)}")
            quants[b] = quant
    return quants


def ms(x: float) -> str:
    return f"{x * 1e3:9.3f}"


def mb(x) -> str:
    return f"{x / 2**20:8.1f}" if x is not None else "       -"


def bench_backend(backend: str, export_dir: Path, blobs: list[Path], swap_adapter_blobs: list[Path], args) -> dict:
    from ondevice_lora.runtime import Runtime

    manifest = json.loads((export_dir / "manifest.json").read_text())
    print(f"\n== {backend} {manifest['quant']}: {export_dir} (slots r<={manifest['slots']['max_rank']}, "
          f"max_seq_len {manifest['max_seq_len']}), {args.threads} threads, cache budget {args.cache_mb:g} MiB", flush=True)
    rt = Runtime.open(export_dir, threads=args.threads, cache_bytes=int(args.cache_mb * 2**20))
    ids = ["x0", "x1"]
    for name, blob in zip(ids, swap_adapter_blobs):
        rt.register_adapter(name, blob)
    by_id = dict(zip(ids, swap_adapter_blobs))
    token = prompt_ids(rt.tokenizer, 1)[0]
    row = {"export": str(export_dir), "quant": manifest["quant"], "packed_adapter_bytes": swap_adapter_blobs[0].stat().st_size}

    time_swaps(rt, "warm", ids, by_id, 3, token)  # warm-up
    print(f"1. swap ({args.swaps} requests per mode; ms; p50 / p99)")
    print(f"   {'mode':<10} {'resolve p50':>11} {'p99':>9} {'swap p50':>10} {'p99':>9} {'+1st fwd p50':>13} {'p99':>9}")
    row["swap_ms"] = {}
    for mode in MODES:
        t = time_swaps(rt, mode, ids, by_id, args.swaps, token)
        row["swap_ms"][mode] = {k: [round(v[0] * 1e3, 4), round(v[1] * 1e3, 4)] for k, v in t.items()}
        print(f"   {mode:<10} {ms(t['resolve'][0]):>11} {ms(t['resolve'][1])} {ms(t['swap'][0]):>10} {ms(t['swap'][1])} "
              f"{ms(t['first'][0]):>13} {ms(t['first'][1])}", flush=True)

    prompt = prompt_ids(rt.tokenizer, args.prompt_tokens)
    speed = measure_speed(rt, ids[0], prompt, args.tokens, args.rounds)
    row["tokens_per_s"] = {k: [round(v[0], 1), round(v[1], 2)] for k, v in speed.items()}
    row["ratio_adapter_over_none"] = {"prefill": speed["adapter"][0] / speed["none"][0],
                                      "decode": speed["adapter"][1] / speed["none"][1]}
    print(f"2. speed (prefill {len(prompt)} tokens, decode {args.tokens} tokens, best of {args.rounds}; tokens/s)")
    print(f"   {'':<16} {'prefill':>9} {'decode':>9}")
    for name, (p, d) in speed.items():
        print(f"   {name:<16} {p:9.1f} {d:9.2f}")
    r = row["ratio_adapter_over_none"]
    print(f"   {'adapter / none':<16} {r['prefill']:8.3f}x {r['decode']:8.3f}x   (goal >= 0.9x)", flush=True)

    stats = rt.stats()
    del rt, speed
    gc.collect()
    opened, first = time_reload(export_dir, args.threads, int(args.cache_mb * 2**20), token)
    row["reload_s"] = {"open": round(opened, 3), "open_and_first_forward": round(first, 3)}
    warm_swap = row["swap_ms"]["warm"]["swap"][0]
    print(f"   reload instead: Runtime.open {opened * 1e3:.0f} ms, + first forward {first * 1e3:.0f} ms "
          f"({opened * 1e3 / max(warm_swap, 1e-9):.0f}x the warm swap p50)", flush=True)

    counts = sorted({0, 1, args.adapters})
    rss = measure_rss(export_dir, blobs, counts, args)
    row["rss"] = {str(n): r for n, r in rss.items()}
    print(f"3. memory (fresh process per count; MiB; {args.rss_tokens} tokens generated per adapter; "
          f"cache budget {rss[counts[-1]]['cache_budget'] / 2**20:g} MiB)")
    print(f"   {'adapters':>8} {'before open':>11} {'after open':>10} {'peak after open':>15} {'end':>8} "
          f"{'process peak':>12} {'cached':>7} {'evicted':>8} {'cache MiB':>9}")
    for n, r in rss.items():
        print(f"   {n:>8} {mb(r['before_open']):>11} {mb(r['after_open']):>10} {mb(r['peak_after_open']):>15} {mb(r['end'])} "
              f"{mb(r['process_peak']):>12} {r['cache_entries']:>7} {r['evictions']:>8} {mb(r['cache_bytes']):>9}")
    n = counts[-1]
    if n > 1:
        per_adapter = {k: (rss[n][k] - rss[1][k]) / (n - 1) for k in ("peak_after_open", "end") if rss[n][k] and rss[1][k]}
        row["rss_delta_per_adapter"] = per_adapter
        files = sum(f["size"] for name, f in manifest["files"].items() if not name.startswith("tokenizer/"))
        print("   per extra adapter: " + ", ".join(f"{k} {v / 2**20:+.2f} MiB" for k, v in per_adapter.items())
              + f" (packed blob {row['packed_adapter_bytes'] / 2**20:.1f} MiB, "
              f"{stats['cache_bytes'] / max(1, stats['cache_entries']) / 2**20:.1f} MiB each in the cache; "
              f"the export's files {files / 2**20:.0f} MiB)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/odlora-bench-runtime"))
    parser.add_argument("--backends", default="onnx,executorch")
    parser.add_argument("--quant", help="one for every backend (int4), or per backend (onnx=int4,executorch=8da4w)")
    parser.add_argument("--base", default=None, help="default: the default base")
    parser.add_argument("--adapter", type=Path, help="a trained adapter directory for the swap and speed parts")
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--adapter-rank", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-mb", type=float, default=None, help="adapter cache budget (default: the runtime's)")
    parser.add_argument("--swaps", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=50)
    parser.add_argument("--rss-tokens", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="few samples, 4 adapters: checks that it runs, not figures")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(json.loads(args.rss_child))
    print("$ python " + shlex.join(sys.argv), flush=True)
    if args.quick:
        args.swaps, args.prompt_tokens, args.tokens, args.rounds, args.adapters = 10, 32, 8, 1, 4
    if args.prompt_tokens + args.tokens >= args.max_seq_len:
        sys.exit("--prompt-tokens + --tokens must stay below --max-seq-len")

    from ondevice_lora.base import load_base
    from ondevice_lora.runtime import DEFAULT_CACHE_BYTES

    args.cache_mb = args.cache_mb if args.cache_mb is not None else DEFAULT_CACHE_BYTES / 2**20
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := [b for b in backends if b not in BACKENDS]:
        sys.exit(f"--backends: {unknown[0]!r} is not one of {', '.join(BACKENDS)}")
    quants = parse_quants(args.quant, backends)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    base = load_base(args.base)
    adapter_dirs = make_adapters(base, args.work / "adapters", args.adapter_rank, max(2, args.adapters))
    swap_dirs = ([args.adapter] if args.adapter else []) + adapter_dirs[:2]
    print(f"base {base.spec} ({base.fingerprint[:19]}...), adapters r{args.adapter_rank} all-linear"
          f"{f', swap/speed adapter {args.adapter}' if args.adapter else ''}", flush=True)
    report = {}
    for backend in backends:
        export_dir = export_once(base, backend, quants[backend], args)
        blobs = pack_once(adapter_dirs, export_dir, backend)
        swap_blobs = pack_once(swap_dirs[:2], export_dir, backend)
        report[backend] = bench_backend(backend, export_dir, blobs, swap_blobs, args)
    print("\n" + json.dumps(report))


if __name__ == "__main__":
    main()
