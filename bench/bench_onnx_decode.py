"""Where an ONNX export's decode step spends its time, and how far it is from the memory-bandwidth limit.

    ODLORA_HOME=/tmp/oh python bench/bench_onnx_decode.py                       # int4, 2 threads
    ODLORA_HOME=/tmp/oh python bench/bench_onnx_decode.py --quant int8 --work /tmp/onnx-bench
    ODLORA_HOME=/tmp/oh python bench/bench_onnx_decode.py --against /tmp/old/onnx-int4-s512   # two exports, in turns

Setup (kept in --work and reused): one `export()` of the default base to ONNX (slots r <= 16 on all
seven linears, --max-seq-len). Then, with --threads threads, --rounds rounds in which each export
(this one, and --against if given) takes its turn; medians over the rounds:

1. Decode speed: prefill --prompt-tokens tokens of the shipped general text, then --tokens one-token
   steps on the runtime's per-request path (`OnnxSequence`): ms per step and steps/s (no sampling,
   detokenising or request handling around it).
2. End to end: `Runtime.generate` of --tokens greedy tokens after the same prompt, as a request
   sees it (sampling, detokenising and the runtime's per-request work included): decode tokens/s;
   and the same sampled (temperature 0.7, top-p 0.9, seeded), what a chat request usually asks.
3. Profile: the same steps again with ONNX Runtime's profiler on; the time of every node, summed
   per op type and divided by the steps: where a step goes (MatMulNBits, attention's MatMuls and
   Softmax, the cache's ScatterElements, ...).
4. The physical limit: the bytes a decode step must read (every initializer but the embedding
   table, of which one row is read, plus the KV cache the step attends over) against this
   machine's memory bandwidth (the best of 5 copies of a 1 GiB buffer, counted as read + write).

It prints each table and the command line. Compare it with llama.cpp (bench/bench_llamacpp.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np


def export_once(args) -> Path:
    from ondevice_lora.exporters.export import export

    out = args.work / f"onnx-{args.quant}-s{args.max_seq_len}"
    if not (out / "manifest.json").exists():
        print(f"exporting onnx {args.quant} into {out} (once) ...", flush=True)
        export(args.base, "onnx", out, quant=args.quant, max_seq_len=args.max_seq_len, force=True, say=lambda *_: None)
    return out


def prompt_ids(export_dir: Path, n: int) -> list[int]:
    from ondevice_lora.base import load_tokenizer
    from ondevice_lora.samples import general_text_path

    ids = load_tokenizer(export_dir / "tokenizer").encode(general_text_path().read_text(), add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def decode_steps(session, prompt: list[int], tokens: int) -> list[float]:
    """Seconds per one-token step after prefilling `prompt` (greedy on the graph's own logits), on
    the runtime's per-request path (`OnnxSequence`: in-place caches where the export has them)."""
    from ondevice_lora.runtime.onnx import OnnxSequence

    sequence = OnnxSequence(session, None)
    token, times = int(sequence.forward(prompt, 0).argmax()), []
    for pos in range(len(prompt), len(prompt) + tokens):
        t0 = time.perf_counter()
        logits = sequence.forward([token], pos)
        times.append(time.perf_counter() - t0)
        token = int(logits.argmax())
    return times


SAMPLED = {"temperature": 0.7, "top_p": 0.9, "seed": 0}  # the sampled end-to-end column's settings


def end_to_end(rt, prompt: list[int], tokens: int, sampling: Optional[dict] = None) -> tuple[float, int]:
    """Decode tokens/s of `Runtime.generate` (prefill excluded), greedy or with `sampling`'s
    SamplingConfig fields, and the tokens it made (up to `tokens`; the end-of-text token stops it sooner)."""
    from ondevice_lora.config import SamplingConfig

    text = rt.tokenizer.decode(prompt)
    result = rt.generate(text, sampling=SamplingConfig(max_new_tokens=tokens, stop=[], **(sampling or {})), chat=False)
    if len(result.token_ids) < 2:
        sys.exit("the base stopped at once: use another --prompt-tokens")
    return (len(result.token_ids) - 1) / (result.seconds - result.prefill_seconds), len(result.token_ids)


def profile_ops(export_dir: Path, threads: int, prompt: list[int], tokens: int) -> dict[str, float]:
    """Microseconds per decode step, per op type, from ONNX Runtime's profiler (prefill left out)."""
    import onnxruntime as ort

    from ondevice_lora.runtime.onnx import OnnxSession

    session = OnnxSession(export_dir, threads=threads, verify=False)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / "ort")
        model = export_dir / session.manifest["onnx"]["model"]
        session.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        caches = session.new_cache()
        _, caches = session.forward([prompt], range(len(prompt)), caches)
        for pos in range(len(prompt), len(prompt) + tokens):
            _, caches = session.forward([[1]], [pos], caches)
        events = json.loads(Path(session.session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    runs = 0  # a run's node events come before its "model_run" event: run 0 (the prefill) is skipped
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs += 1
        elif event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and runs >= 1:
            per_op[event["args"]["op_name"]] += event["dur"]
    return {op: us / tokens for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])}


def step_bytes(export_dir: Path, positions: int) -> dict[str, int]:
    """What one decode step reads: the weights (all initializers but the embedding table) and the KV cache."""
    import onnx

    from ondevice_lora.formats.manifest import read_manifest

    manifest = read_manifest(export_dir, verify=False)
    model = onnx.load(str(export_dir / manifest["onnx"]["model"]), load_external_data=False)
    # A table only gathered from (the embedding) is read one row a step; one the LM head also reads
    # (a tied head sharing the embedding's bytes) is read whole.
    gathered = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    gathered -= {name for n in model.graph.node if n.op_type not in ("Gather", "GatherBlockQuantized") for name in n.input}
    weights = 0
    for init in model.graph.initializer:
        if init.name in gathered:
            continue
        size = next((int(e.value) for e in init.external_data if e.key == "length"), None)
        weights += size if size is not None else len(init.raw_data)
    layout = manifest["onnx"]["cache_layout"]
    _, n_kv, _, head_dim = layout["shape"]
    cache = len(layout["past"]) * n_kv * positions * head_dim * 4
    return {"weights": weights, "kv_cache": cache}


def bandwidth() -> float:
    """Bytes per second of a large copy (read + write), the best of 5."""
    src = np.ones(2**30 // 8)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return 2 * src.nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="default: the default base")
    parser.add_argument("--quant", default="int4", choices=("fp32", "int8", "int4"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=90)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "odlora-onnx-bench")
    parser.add_argument("--against", type=Path, default=None,
                        help="another ONNX export (e.g. one an earlier version wrote) timed in the same rounds")
    args = parser.parse_args()
    print("$ python " + shlex.join(sys.argv), flush=True)

    from ondevice_lora.runtime import Runtime
    from ondevice_lora.runtime.onnx import OnnxSession

    export_dir = export_once(args)
    prompt = prompt_ids(export_dir, args.prompt_tokens)
    exports = [export_dir] + ([args.against] if args.against else [])
    opened = {d: (OnnxSession(d, threads=args.threads, verify=False), Runtime.open(d, threads=args.threads, verify=False))
              for d in exports}
    steps, e2e, sampled = defaultdict(list), defaultdict(list), defaultdict(list)
    for _ in range(args.rounds):  # the exports take turns in every round
        for d, (session, rt) in opened.items():
            steps[d].append(statistics.median(decode_steps(session, prompt, args.tokens)))
            e2e[d].append(end_to_end(rt, prompt, args.tokens))
            sampled[d].append(end_to_end(rt, prompt, args.tokens, SAMPLED)[0])
    del opened
    print(f"\ndecode, {args.threads} threads, after {len(prompt)} prompt tokens, {args.tokens} steps, medians of "
          f"{args.rounds} rounds (graph: the runtime's per-step call; end to end: Runtime.generate, greedy, "
          f"and sampled with {SAMPLED})")
    print(f"{'export':<48} {'ms/step':>8} {'steps/s':>8} {'e2e tok/s':>10} {'tokens':>7} {'sampled tok/s':>14}")
    for d in exports:
        step = statistics.median(steps[d])
        rate, made = statistics.median(r for r, _ in e2e[d]), e2e[d][0][1]
        print(f"{str(d):<48} {step * 1e3:>8.2f} {1 / step:>8.1f} {rate:>10.1f} {made:>7} "
              f"{statistics.median(sampled[d]):>14.1f}")
    step = statistics.median(steps[export_dir])

    per_op = profile_ops(export_dir, args.threads, prompt, args.tokens)
    total = sum(per_op.values())
    print(f"\nprofiled: {total / 1e3:.2f} ms of node time per step (the profiler's own cost included)")
    print(f"{'op type':<28} {'us/step':>9} {'share':>7}")
    for op, us in per_op.items():
        if us / total >= 0.005:
            print(f"{op:<28} {us:>9.0f} {us / total:>7.1%}")

    reads = step_bytes(export_dir, len(prompt) + args.tokens // 2)
    bytes_per_step = sum(reads.values())
    bw = bandwidth()
    print(f"\nbytes read per decode step: weights {reads['weights'] / 2**20:.1f} MiB + KV cache at "
          f"{len(prompt) + args.tokens // 2} positions {reads['kv_cache'] / 2**20:.1f} MiB")
    print(f"memory bandwidth (1 GiB copy, read + write): {bw / 2**30:.1f} GiB/s -> at most "
          f"{bw / bytes_per_step:.0f} steps/s; measured {1 / step:.1f} ({step * bw / bytes_per_step:.1f}x the limit's time)")


if __name__ == "__main__":
    main()
