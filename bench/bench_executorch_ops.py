"""Where an ExecuTorch export's decode step spends its time, per XNNPACK operator type.

    python bench/bench_executorch_ops.py EXPORT_DIR                  # e.g. odlora-demo/exports/executorch
    python bench/bench_executorch_ops.py EXPORT_DIR --steps 32 --prompt-tokens 96

Loads the program with ExecuTorch's event tracer on (`_load_for_executorch(..., enable_etdump=True)`),
prefills --prompt-tokens positions in the program's prefill chunks, runs --steps one-token decode
steps with no adapter (zero slot inputs: the same ops as any adapter), and reads the trace back with
ExecuTorch's Inspector: the time of every operator inside the delegate and on the CPU, summed per
operator type and divided by the steps. The profiler's own cost is included, so the total is above
an unprofiled step (`bench/bench_native.py`, `bench/bench_decode.py` time those). Prints the table
and the command line.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

SKIP = ("Method::execute", "DELEGATE_CALL", "OPERATOR_CALL")  # containers of the operators below


def zero_inputs(module, method: str, tokens: list[int], start: int) -> list[torch.Tensor]:
    """tokens, their positions, then a zero tensor for every slot input the method takes."""
    meta = module.method_meta(method)
    inputs = [torch.tensor([tokens]), torch.arange(start, start + len(tokens))]
    return inputs + [torch.zeros(list(meta.input_tensor_meta(i).sizes())) for i in range(2, meta.num_inputs())]


def trace(export_dir: Path, threads: int, prompt_tokens: int, steps: int, out: Path) -> None:
    import executorch.kernels.quantized  # noqa: F401  registers the quantised embedding kernels
    from executorch.extension.pybindings import portable_lib

    manifest = json.loads((export_dir / "manifest.json").read_text())
    fields = manifest["executorch"]
    portable_lib._unsafe_reset_threadpool(threads)
    data = str(export_dir / fields["data"]) if fields.get("data") else None
    module = portable_lib._load_for_executorch(str(export_dir / fields["program"]), data_path=data, enable_etdump=True)
    chunk = fields["methods"]["prefill"]
    for start in range(0, prompt_tokens - chunk + 1, chunk):
        module.run_method("prefill", zero_inputs(module, "prefill", [1] * chunk, start))
    position = prompt_tokens - prompt_tokens % chunk
    for step in range(steps):
        module.run_method("forward", zero_inputs(module, "forward", [1], position + step))
    module.write_etdump_result_to_file(str(out))


def per_op_type(etdump: Path) -> tuple[int, dict[str, float], dict[str, int]]:
    """(decode calls, ms per call by operator type, operators of each type) of the decode method:
    the trace's last execution block (the blocks follow the methods' first calls)."""
    from executorch.devtools import Inspector

    inspector = Inspector(etdump_path=str(etdump))
    block = [b for b in inspector.event_blocks if b.name == "Execute"][-1]
    times, counts, calls = Counter(), Counter(), 0
    for event in block.events:
        if event.perf_data is None:
            continue
        if event.name == "Method::execute":
            calls = len(event.perf_data.raw)
        if event.name in SKIP:
            continue
        kind = re.sub(r" #\d+$", "", event.name)  # "Fully Connected (NC, QDU8, F32, QB4W) GEMM #7"
        times[kind] += sum(event.perf_data.raw)
        counts[kind] += 1
    return calls, {kind: ms / calls for kind, ms in times.most_common()}, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an ExecuTorch export directory (odlora export --target executorch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=96, help="positions filled before the decode steps")
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    print("$ python " + shlex.join(sys.argv), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "decode.etdp"
        trace(args.export, args.threads, args.prompt_tokens, args.steps, etdump)
        calls, ms, counts = per_op_type(etdump)
    total = sum(ms.values())
    print(f"\n{calls} decode steps after {args.prompt_tokens} positions, {args.threads} threads: {total:.2f} ms of "
          f"operator time per step (the profiler's own cost included)")
    print(f"{'operator type':<50} {'ms/step':>8} {'share':>6} {'ops':>5}")
    for kind, value in ms.items():
        if value / total >= 0.002:
            print(f"{kind[:50]:<50} {value:>8.3f} {value / total:>6.1%} {counts[kind]:>5}")


if __name__ == "__main__":
    main()
