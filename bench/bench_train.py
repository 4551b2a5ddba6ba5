"""Training throughput and peak memory: odlora personalize vs transformers + PEFT, same work.

    python bench/bench_train.py                      # 8 timed steps per run, 3 rounds
    python bench/bench_train.py --steps 4 --configs odlora:int8:bf16 peft
    python bench/bench_train.py --configs odlora:int8:bf16 odlora:int8:bf16:compile peft
    python bench/bench_train.py --profile odlora:int8:bf16 --steps 2   # the top ops of one config

Same base (the default base), same data (the shipped `dates` task, packed to --seq-len rows),
rank 8 LoRA on all seven linears, batch --batch-size, AdamW. A config is `peft` or
`odlora:BASE_QUANT:DTYPE[:compile]` (`:compile`: `personalize --compile`; its compile falls in
the untimed warm-up steps). Each configuration runs in its
own process so that its peak RSS (load included) is its own. Tokens/s counts every position of
every batch row (padding included) over the timed steps, after --warmup untimed steps.
PEFT runs the usual recipe: fp32 `LlamaForCausalLM`, `get_peft_model`, labels with -100.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import resource
import subprocess
import sys
import time

import torch


def packed_rows(tokenizer, seq_len):
    from ondevice_lora.data import pack, read_examples
    from ondevice_lora.samples import sample_path

    examples = read_examples(sample_path("dates"), tokenizer, seq_len)
    return pack(examples, seq_len, tokenizer.eos_token_id)


def time_engine_steps(args, engine, data) -> dict:
    """Time AdamW steps of a training engine (train.TorchEngine or device_train.ExecutorchEngine) on `data`."""
    optimizer = torch.optim.AdamW(engine.params.values(), lr=1e-4)

    def step(rows):
        engine.loss_and_grads({"input_ids": data.input_ids[rows], "targets": data.targets[rows],
                               "segment_ids": data.segment_ids[rows]}, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(args, step)


def run_odlora(args, base_quant, dtype, *options):
    from ondevice_lora.base import load_base
    from ondevice_lora.config import LoraConfig
    from ondevice_lora.lora import apply_lora
    from ondevice_lora.personalization import DTYPES
    from ondevice_lora.quant import quantize_base
    from ondevice_lora.train import TorchEngine

    base = load_base()
    data = packed_rows(base.tokenizer, args.seq_len)
    model = quantize_base(base.model, base_quant, DTYPES[dtype])
    apply_lora(model, LoraConfig(rank=8, alpha=16))
    engine = TorchEngine(model, compile="compile" in options)  # personalize's engine, training ops and all
    return time_engine_steps(args, engine, data)


def run_peft(args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ondevice_lora.base import load_tokenizer, resolve

    path = resolve(None)
    data = packed_rows(load_tokenizer(path), args.seq_len)
    labels = torch.cat([torch.full_like(data.targets[:, :1], -100), data.targets[:, :-1]], dim=1)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(rows):
        model(input_ids=data.input_ids[rows], labels=labels[rows]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(args, step)


def time_steps(args, step):
    batches = [slice(i * args.batch_size, (i + 1) * args.batch_size) for i in range(args.warmup + args.steps)]
    for rows in batches[: args.warmup]:
        step(rows)
    profiler = torch.profiler.profile() if args.profile else contextlib.nullcontext()
    with profiler:
        started = time.perf_counter()
        for rows in batches[args.warmup:]:
            step(rows)
        seconds = time.perf_counter() - started
    if args.profile:  # on stderr: stdout's last line is the result
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    tokens = args.steps * args.batch_size * args.seq_len
    return {"tokens_per_s": tokens / seconds, "seconds_per_step": seconds / args.steps}


def child(args):
    torch.set_num_threads(args.threads)
    engine, *rest = args.child.split(":")
    result = run_peft(args) if engine == "peft" else run_odlora(args, *rest)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def describe(config: str, r: dict) -> str:
    return (f"{config:<20} {r['tokens_per_s']:8.1f} tokens/s  {r['seconds_per_step']:6.2f} s/step  "
            f"peak RSS {r['peak_rss_mb']:7.0f} MB")


def run_child(script: str, args, config: str, extra: tuple = ()) -> dict | None:
    """Run `script --child CONFIG` in its own process and return its JSON result (None on failure)."""
    cmd = [sys.executable, script, "--child", config, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads),
           *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{config}: failed\n{out.stderr[-2000:]}")
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(describe(config, r), flush=True)
    return r


def run_children(script: str, args, extra: tuple = ()) -> dict:
    """Run each of args.configs `args.rounds` times, each run in its own process, and return
    {config: median of each figure}.

    A shared machine drifts by 10-20% over minutes, so the configurations take turns within each
    round (the order reversed every other round) and the figures are medians over rounds.
    """
    runs = {config: [] for config in args.configs}
    for round_no in range(args.rounds):
        if args.rounds > 1:
            print(f"round {round_no + 1}/{args.rounds}")
        order = args.configs if round_no % 2 == 0 else args.configs[::-1]
        for config in order:
            if (r := run_child(script, args, config, extra)) is not None:
                runs[config].append(r)
    return {config: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for config, rs in runs.items() if rs}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration, taking turns")
    parser.add_argument("--configs", nargs="+",
                        default=["peft", "odlora:int8:bf16", "odlora:int8:bf16:compile", "odlora:none:bf16",
                                 "odlora:int4:bf16", "odlora:none:fp32"])
    parser.add_argument("--profile", metavar="CONFIG",
                        help="run CONFIG once in this process under torch.profiler and print where the time goes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        args.child = args.profile
    if args.child:
        return child(args)
    print("command:", " ".join([sys.executable, *sys.argv]))
    results = run_children(__file__, args)
    print(f"medians over {args.rounds} rounds:")
    for config, r in results.items():
        print(describe(config, r))
    if "peft" in results:
        ref = results["peft"]
        for config, r in results.items():
            if config != "peft":
                print(f"{config:<20} vs peft: {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x tokens/s, "
                      f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
