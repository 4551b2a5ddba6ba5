"""ExecuTorch export of the default base: export time, file sizes, delegate partitions, packed
adapter size, prefill and decode speed with zero slots, with an adapter, without slots, and with
the adapter baked into the program as constants (the named-data / .ptd route's speed).

    ODLORA_HOME=/tmp/oh python bench/bench_export_executorch.py                    # fp32 and 8da4w
    ODLORA_HOME=/tmp/oh python bench/bench_export_executorch.py --quants 8da4w --threads 2 --steps 64

Exports go to --out (default /tmp/odlora-bench-executorch) and are reused when present (--fresh
re-exports). Figures are medians over --steps decode calls after a 32-token prompt.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from ondevice_lora.adapter import adapter_from_model, attach_adapter, save_adapter
from ondevice_lora import samples
from ondevice_lora.base import load_base
from ondevice_lora.exporters.executorch import DATA, PROGRAM, export_program
from ondevice_lora.exporters.export import export, pack
from ondevice_lora.config import LoraConfig
from ondevice_lora.lora import apply_lora, lora_layers
from ondevice_lora.registry import DEFAULT_BASE
from ondevice_lora.runtime.executorch import ExecutorchSession

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sessions import executorch_perplexity  # noqa: E402  the tests' helper, on the session directly

MAX_SEQ = 512


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def file_sizes(d: Path) -> tuple[int, int]:
    return (d / PROGRAM).stat().st_size, (d / DATA).stat().st_size


def random_adapter(base, out: Path, rank: int = 8) -> Path:
    """Rank-8 LoRA on all seven linears with B drawn away from zero (a trained adapter's shape)."""
    model = load_base(DEFAULT_BASE).model
    config = LoraConfig(rank=rank, alpha=2.0 * rank)
    torch.manual_seed(0)
    apply_lora(model, config)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0.0, 0.01)
    save_adapter(adapter_from_model(model, config, {"base_fingerprint": base.fingerprint}), out, DEFAULT_BASE)
    return out


def time_decode(forward, prefill, slots: list, steps: int) -> float:
    """Median ms per decode call after a 32-token prompt (prefill) at positions 32, 33, ..."""
    prompt = torch.arange(100, 132)[None]
    prefill.execute([prompt, torch.arange(32), *slots])
    times = []
    for pos in range(32, 32 + steps):
        started = time.perf_counter()
        forward.execute([torch.tensor([[pos % 1000 + 200]]), torch.tensor([pos]), *slots])
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def load(d: Path):
    from executorch.runtime import Runtime

    started = time.perf_counter()
    program = Runtime.get().load_program(d / PROGRAM, data_path=d / DATA)
    methods = program.load_method("forward"), program.load_method("prefill")
    return program, methods, time.perf_counter() - started


def report(quant: str, r: dict, args) -> None:
    fp32 = args.out / "fp32"
    fp32_size = sum(file_sizes(fp32)) if (fp32 / PROGRAM).exists() and (fp32 / DATA).exists() else None
    total = r["pte"] + r["ptd"]
    ratio = f" ({total / fp32_size:.2f}x fp32)" if fp32_size else ""
    print(f"\n[{quant}] default base {DEFAULT_BASE}, slots r<=16 on all linears, max_seq_len {MAX_SEQ}, "
          f"{args.threads} threads, median of {args.steps} decode steps", flush=True)
    print(f"  export time            {r['export_s']} s (slot-free {r.get('export_noslots_s', 'not rerun')} s)")
    print(f"  model.pte + model.ptd  {mb(r['pte'])} + {mb(r['ptd'])} = {mb(total)}{ratio}")
    print(f"  slot-free export       {mb(r['pte_noslots'])} + {mb(r['ptd_noslots'])}")
    print(f"  delegate partitions    {r['delegates']} (slot-free {r.get('delegates_noslots', '-')}, "
          f"baked {r.get('delegates_baked', '-')})")
    print(f"  packed adapter (r8)    {mb(r['packed_adapter'])}")
    print(f"  held-out perplexity    {r['perplexity']:.2f} (ondevice_lora/samples/general.txt, windows of {MAX_SEQ})")
    print(f"  program load           {r['load_s']:.2f} s (slot-free {r['load_noslots_s']:.2f} s, "
          f"adapter baked in {r['load_baked_s']:.2f} s)")
    print(f"  decode ms/token        zero slots {r['decode_ms_zero_slots']:.2f} | "
          f"adapter {r['decode_ms_adapter']:.2f} | "
          f"slot-free {r['decode_ms_noslots']:.2f} | adapter baked in {r['decode_ms_baked']:.2f}")
    print(f"  slots cost             {r['decode_ms_adapter'] / r['decode_ms_noslots']:.2f}x slot-free decode time")
    print(f"  prefill tokens/s       chunked {r['prefill_tok_s_chunked']} | one call per token "
          f"{r['prefill_tok_s_one_by_one']}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quants", nargs="+", default=["fp32", "8da4w"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("/tmp/odlora-bench-executorch"))
    parser.add_argument("--fresh", action="store_true", help="re-export even when an export is present")
    args = parser.parse_args()
    print("$", shlex.join([Path(sys.executable).name, *sys.argv]))

    import executorch.kernels.quantized  # noqa: F401  quantised embedding kernels
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(args.threads)
    torch.set_num_threads(args.threads)
    base = load_base(DEFAULT_BASE)
    args.out.mkdir(parents=True, exist_ok=True)
    adapter_dir = random_adapter(base, args.out / "adapter-r8")
    results = {}
    for quant in args.quants:
        row = results[quant] = {}
        slotted = args.out / quant
        if args.fresh or not (slotted / "manifest.json").exists():
            started = time.perf_counter()
            export(DEFAULT_BASE, "executorch", slotted, quant=quant, max_seq_len=MAX_SEQ, force=True,
                   say=lambda *_: None)
            row["export_s"] = round(time.perf_counter() - started, 1)
        manifest = json.loads((slotted / "manifest.json").read_text())
        row.setdefault("export_s", manifest["export_seconds"])
        row["pte"], row["ptd"] = file_sizes(slotted)
        row["delegates"] = manifest["executorch"]["delegate_partitions"]
        pack(adapter_dir, slotted, args.out / f"adapter-r8.{quant}.slots")
        row["packed_adapter"] = (args.out / f"adapter-r8.{quant}.slots").stat().st_size

        # Comparisons: the same base without slots, and with the adapter baked in as constants
        # (ExecuTorch's documented LoRA flow: adapter weights are program data, packed at load).
        for variant in ("noslots", "baked"):
            d = args.out / f"{quant}-{variant}"
            if args.fresh or not (d / PROGRAM).exists():
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()
                model = load_base(DEFAULT_BASE).model
                if variant == "baked":
                    from ondevice_lora.adapter import load_adapter

                    attach_adapter(model, load_adapter(adapter_dir))
                started = time.perf_counter()
                fields = export_program(model, None, d, quant, MAX_SEQ)
                row[f"export_{variant}_s"] = round(time.perf_counter() - started, 1)
                row[f"delegates_{variant}"] = fields["executorch"]["delegate_partitions"]
            row[f"pte_{variant}"], row[f"ptd_{variant}"] = file_sizes(d)

        session = ExecutorchSession(slotted)
        zeros = session.slot_inputs(session._zeros)
        adapter = session.slot_inputs(session.load_adapter(args.out / f"adapter-r8.{quant}.slots"))
        _, (forward, prefill), row["load_s"] = load(slotted)
        row["decode_ms_zero_slots"] = time_decode(forward, prefill, zeros, args.steps)
        row["decode_ms_adapter"] = time_decode(forward, prefill, adapter, args.steps)
        for variant in ("noslots", "baked"):
            _, (f, p), row[f"load_{variant}_s"] = load(args.out / f"{quant}-{variant}")
            row[f"decode_ms_{variant}"] = time_decode(f, p, [], args.steps)
        # Prefill: 256 prompt tokens in 32-token chunks vs one decode call per token.
        prompt = torch.arange(300, 556)
        started = time.perf_counter()
        session.forward(prompt, 0, None)
        row["prefill_tok_s_chunked"] = round(256 / (time.perf_counter() - started))
        started = time.perf_counter()
        for pos in range(64):
            session.forward(prompt[pos:pos + 1], pos, None)
        row["prefill_tok_s_one_by_one"] = round(64 / (time.perf_counter() - started))
        text = (Path(samples.__file__).parent / "general.txt").read_text()
        row["perplexity"] = executorch_perplexity(session, base.tokenizer.encode(text, add_special_tokens=False))
        report(quant, row, args)


if __name__ == "__main__":
    main()
