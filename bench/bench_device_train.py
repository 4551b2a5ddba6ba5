"""On-device trainer (ExecuTorch training program) vs the laptop path (PyTorch): s/step and peak RSS.

    odlora export --target executorch --trainable --batch-size 4 --seq-len 128 --out /tmp/prog4
    odlora export --target executorch --trainable --quant int8 --batch-size 4 --seq-len 128 --out /tmp/prog4q
    python bench/bench_device_train.py --program /tmp/prog4 /tmp/prog4q   # 4 timed steps per engine

Same work for every configuration: the default base, the shipped `dates` task packed to the
program's rows (--seq-len), its --batch-size, rank 8 LoRA on all seven linears, AdamW (the
optimiser runs in Python on both paths), the same batches. `executorch:DIR` runs the exported
program DIR through ExecuTorch's Python training bindings (portable kernels, base fp32 or int8 as
exported); `odlora:Q:D`
is the laptop path with base quantisation Q and compute dtype D (the laptop default is int8:bf16;
none:fp32 holds the same fp32 base as the program). Each configuration runs in its own process,
so its peak RSS (loading included) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import packed_rows, run_children, run_odlora, time_engine_steps  # noqa: E402


def run_executorch(args, program: str):
    from ondevice_lora.base import load_tokenizer
    from ondevice_lora.device_train import ExecutorchEngine, read_program

    manifest = read_program(Path(program))
    fields = manifest["executorch_train"]
    if (fields["batch_size"], fields["seq_len"]) != (args.batch_size, args.seq_len):
        sys.exit(f"{program} is {fields['batch_size']} x {fields['seq_len']}, not {args.batch_size} x {args.seq_len}")
    data = packed_rows(load_tokenizer(Path(program) / "tokenizer"), args.seq_len)
    engine = ExecutorchEngine(Path(program), manifest, threads=args.threads)
    return time_engine_steps(args, engine, data)


def child(args):
    torch.set_num_threads(args.threads)
    engine, *rest = args.child.split(":")
    result = run_executorch(args, ":".join(rest)) if engine == "executorch" else run_odlora(args, *rest)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--program", nargs="+", default=[],
                        help="`odlora export --target executorch --trainable` dirs (each adds a config executorch:DIR).")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each configuration, taking turns")
    parser.add_argument("--configs", nargs="+", default=["odlora:int8:bf16", "odlora:none:fp32"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.set_defaults(profile=None)  # bench_train.time_steps reads it
    args = parser.parse_args()
    if args.child:
        return child(args)
    print("command:", " ".join([sys.executable, *sys.argv]))
    args.configs = [f"executorch:{p}" for p in args.program] + args.configs
    results = run_children(__file__, args)
    laptop = {c: r for c, r in results.items() if not c.startswith("executorch")}
    for config, et in results.items():
        if not config.startswith("executorch"):
            continue
        for other, r in laptop.items():
            print(f"{config} vs {other}: {et['seconds_per_step'] / r['seconds_per_step']:.1f}x the s/step, "
                  f"{et['peak_rss_mb'] / r['peak_rss_mb']:.2f}x the peak RSS")


if __name__ == "__main__":
    main()
