"""ONNX Runtime target on the default base: export time, file sizes, packed adapter size, decode speed.

    ODLORA_HOME=/tmp/oh python bench/bench_export_onnx.py                      # fp32 int8 int4
    ODLORA_HOME=/tmp/oh python bench/bench_export_onnx.py --quants int4 --tokens 32 --work /tmp/ox-bench

Per quantisation: `export()` with slots (all-linear, --max-rank) into --work (kept and reused on a
second run; delete it to re-time the export), the same export without slots (the slot-free
reference), a random rank --adapter-rank all-linear adapter packed for it, then one-token decode
steps after a short chat prompt (median over --tokens steps, best of --rounds interleaved rounds), for

    no-slots    the slot-free export (what the base costs)
    zero-slots  the slotted export with no adapter active (the zero sparse-initializer defaults)
    adapter     the slotted export with the packed adapter's slot inputs fed

Two figures per mode: wall ms/token with --threads intra-op threads, and CPU ms/token on one
thread (the caller's thread CPU time: robust when other processes share the cores, as on CI).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def make_adapter(base, out: Path, rank: int) -> Path:
    from ondevice_lora.adapter import adapter_from_model, save_adapter
    from ondevice_lora.base import load_base
    from ondevice_lora.config import LoraConfig
    from ondevice_lora.lora import apply_lora

    if out.exists():
        return out
    torch.manual_seed(0)
    model = load_base(base.spec).model
    config = LoraConfig(rank=rank, alpha=2.0 * rank)
    apply_lora(model, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    save_adapter(adapter_from_model(model, config, {"base_fingerprint": base.fingerprint}), out, base.spec)
    return out


def export_once(out: Path, **kwargs) -> dict:
    from ondevice_lora.exporters.export import export, read_manifest

    if out.exists():
        return read_manifest(out, verify=False)
    return export(None, "onnx", out, say=lambda *_: None, **kwargs)


def decode_ms(session, prompt, tokens: int, adapter=None) -> tuple[float, float]:
    """Median (wall ms, this thread's CPU ms) per one-token decode step."""
    caches = session.new_cache()
    logits, caches = session.forward([prompt], np.arange(len(prompt)), caches, adapter)
    wall, cpu, pos = [], [], len(prompt)
    for _ in range(tokens):
        token = int(logits[0, -1].argmax())
        start, start_cpu = time.perf_counter(), time.thread_time()
        logits, caches = session.forward([[token]], [pos], caches, adapter)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.thread_time() - start_cpu) * 1e3)
        pos += 1
    return statistics.median(wall), statistics.median(cpu)


def measure(paths: dict, blob: Path, prompt, threads: int, tokens: int, rounds: int) -> dict:
    """{mode: (best median wall ms, best median CPU ms)} over interleaved rounds."""
    from ondevice_lora.runtime.onnx import OnnxSession

    plain = OnnxSession(paths["no-slots"], threads=threads, verify=False)
    slotted = OnnxSession(paths["slotted"], threads=threads, verify=False)
    adapter = slotted.load_adapter(blob)
    runs = {"no-slots": (plain, None), "zero-slots": (slotted, None), "adapter": (slotted, adapter)}
    for session, ad in runs.values():  # warm-up: first calls allocate
        decode_ms(session, prompt, 4, ad)
    results = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (session, ad) in runs.items():
            results[name].append(decode_ms(session, prompt, tokens, ad))
    return {name: (round(min(r[0] for r in rs), 2), round(min(r[1] for r in rs), 2)) for name, rs in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quants", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/odlora-bench-onnx"))
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--adapter-rank", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv), flush=True)

    from ondevice_lora.base import load_base
    from ondevice_lora.exporters.export import pack
    from ondevice_lora.prompts import encode_prompt

    base = load_base()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    adapter_dir = make_adapter(base, args.work / f"adapter-r{args.adapter_rank}", args.adapter_rank)
    prompt = encode_prompt(base.tokenizer, "What is the capital of France?")
    report = {}
    for quant in args.quants:
        common = dict(quant=quant, max_seq_len=args.max_seq_len)
        slotted = export_once(args.work / quant, max_rank=args.max_rank, **common)
        plain = export_once(args.work / f"{quant}-noslots", targets=(), **common)
        blob = args.work / f"{quant}.onnx_adapter"
        pack(adapter_dir, args.work / quant, blob)
        paths = {"no-slots": args.work / f"{quant}-noslots", "slotted": args.work / quant}
        wall = {k: v[0] for k, v in measure(paths, blob, prompt, args.threads, args.tokens, args.rounds).items()}
        cpu = {k: v[1] for k, v in measure(paths, blob, prompt, 1, args.tokens, args.rounds).items()}
        report[quant] = {
            "export_s": slotted["export_seconds"], "export_noslots_s": plain["export_seconds"],
            "model.onnx.data_MB": round(slotted["files"]["model.onnx.data"]["size"] / 1e6, 1),
            "model.onnx_MB": round(slotted["files"]["model.onnx"]["size"] / 1e6, 2),
            "noslots_data_MB": round(plain["files"]["model.onnx.data"]["size"] / 1e6, 1),
            f"adapter_r{args.adapter_rank}_packed_MB": round(blob.stat().st_size / 1e6, 2),
            f"wall_ms_per_token_{args.threads}_threads": wall,
            "cpu_ms_per_token_1_thread": cpu,
            "cpu zero-slots/no-slots": round(cpu["zero-slots"] / cpu["no-slots"], 3),
            "cpu adapter/no-slots": round(cpu["adapter"] / cpu["no-slots"], 3),
            f"wall adapter/no-slots ({args.threads} threads)": round(wall["adapter"] / wall["no-slots"], 3),
        }
        print(json.dumps({quant: report[quant]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
