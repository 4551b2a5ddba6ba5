"""The default base lowered to each ExecuTorch delegate: export time, size, how much of the graph the
delegate took, and, where it runs here, parity with PyTorch and decode speed with an adapter.

    ODLORA_HOME=/tmp/oh python bench/bench_delegates.py --work /tmp/delegates
    python bench/bench_delegates.py --work /tmp/delegates --backends xnnpack,openvino --rounds 5

Exports (fp32, slots r <= 16 on all seven linears, max_seq_len 512) are kept in --work and reused.
A delegate that cannot lower here (QNN without Qualcomm's SDK) gets its reason in the table.
Parity: the largest |logit difference| from the PyTorch base over a chat prompt and 8 greedy
steps, with a random rank-8 all-linear adapter packed for that export. Speed: one 128-token
prefill and 64 greedy decode steps, best of --rounds, base and adapter in turns.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from ondevice_lora.adapter import attach_adapter, load_adapter
from ondevice_lora.base import load_base
from ondevice_lora.errors import OdloraError
from ondevice_lora.exporters.executorch_delegates import DELEGATES
from ondevice_lora.exporters.export import export, pack
from ondevice_lora.formats.manifest import read_manifest
from ondevice_lora.lora import remove_lora
from ondevice_lora.prompts import encode_prompt
from ondevice_lora.registry import DEFAULT_BASE
from ondevice_lora.runtime.executorch import ExecutorchSession

sys.path.insert(0, str(Path(__file__).parent))
from bench_runtime import make_adapters, prompt_ids  # noqa: E402

MAX_SEQ = 512
QUESTION = "What is the capital of France?"


def export_once(backend: str, work: Path) -> Path:
    """The export for `backend`, made once (its manifest keeps the export's seconds)."""
    out = work / f"executorch-{backend}"
    if not (out / "manifest.json").exists():
        print(f"exporting {backend} ...", flush=True)
        export(DEFAULT_BASE, "executorch", out, max_seq_len=MAX_SEQ, force=True, say=lambda *_: None,
               options={"backend": backend})
    return out


def parity(base, session: ExecutorchSession, adapter_dir: Path, blob: Path) -> float:
    """Largest |logit difference| from PyTorch with the adapter: the chat prompt, then 8 greedy steps."""
    model = base.model
    attach_adapter(model, load_adapter(adapter_dir))
    model.setup_cache(1, MAX_SEQ)
    slots = session.load_adapter(blob)
    prompt = encode_prompt(base.tokenizer, QUESTION)
    try:
        with torch.no_grad():
            want = model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
            worst = float((session.forward(prompt, 0, slots) - want).abs().max())
            for pos in range(len(prompt), len(prompt) + 8):
                token = int(want[0, -1].argmax())
                want = model(torch.tensor([[token]]), input_pos=torch.tensor([pos]))
                worst = max(worst, float((session.forward([token], pos, slots) - want).abs().max()))
    finally:
        model.drop_cache()
        remove_lora(model)
    return worst


def speed(session: ExecutorchSession, slots, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy request."""
    started = time.perf_counter()
    logits = session.forward(prompt, 0, slots)
    prefilled = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + tokens):
        logits = session.forward([int(logits[0, -1].argmax())], pos, slots)
    done = time.perf_counter()
    return len(prompt) / (prefilled - started), tokens / (done - prefilled)


def measure(backend: str, base, adapter_dir: Path, args) -> dict:
    row = {"backend": backend, "device": DELEGATES[backend].device}
    try:
        out = export_once(backend, args.work)
    except OdloraError as e:
        return {**row, "ran": f"no: {e}"}
    manifest = read_manifest(out, verify=False)
    lowering = manifest["executorch"]["lowering"]["forward"]
    row.update(export_s=manifest["export_seconds"], size_mb=sum(f["size"] for f in manifest["files"].values()) / 1e6,
               partitions=lowering["partitions"], share=lowering["delegated_share"], cpu_ops=lowering["cpu_ops"])
    try:
        session = ExecutorchSession(out, threads=args.threads)
    except OdloraError as e:
        return {**row, "ran": "no: " + str(e).split(": ", 1)[-1]}
    blob = args.work / f"{backend}.slots"
    pack(adapter_dir, out, blob, force=True)
    row["parity"] = parity(base, session, adapter_dir, blob)
    prompt = prompt_ids(base.tokenizer, 128)
    adapter = session.load_adapter(blob)
    best = {"none": (0.0, 0.0), "adapter": (0.0, 0.0)}
    for _ in range(args.rounds):
        for name, slots in (("none", None), ("adapter", adapter)):
            prefill, decode = speed(session, slots, prompt, args.tokens)
            best[name] = (max(best[name][0], prefill), max(best[name][1], decode))
    return {**row, "ran": "yes", **{f"{k}_{name}": v for name, pair in best.items() for k, v in zip(("prefill", "decode"), pair)}}


def report(rows: list[dict]) -> None:
    print("| delegate | runs on | export s | size MB | partitions/method | delegated ops | on CPU | ran here | "
          "max |logit diff| | prefill tok/s (none/adapter) | decode tok/s (none/adapter) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cell = lambda key, fmt: (fmt.format(r[key]) if r.get(key) is not None else "-")  # noqa: E731
        cpu = ", ".join(f"{op} x{n}" for op, n in r.get("cpu_ops", {}).items()) or ("none" if "share" in r else "-")
        speeds = [f"{r['prefill_none']:.0f} / {r['prefill_adapter']:.0f}", f"{r['decode_none']:.1f} / {r['decode_adapter']:.1f}"] \
            if "decode_none" in r else ["-", "-"]
        print(f"| {r['backend']} | {r['device']} | {cell('export_s', '{:.0f}')} | {cell('size_mb', '{:.0f}')} | "
              f"{cell('partitions', '{}')} | {cell('share', '{:.1%}')} | {cpu} | {r['ran']} | {cell('parity', '{:.2g}')} | "
              f"{speeds[0]} | {speeds[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/odlora-bench-delegates"))
    parser.add_argument("--backends", default=",".join(DELEGATES), help="comma-separated delegates")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    base = load_base(DEFAULT_BASE)
    adapter_dir = make_adapters(base, args.work, rank=8, n=1)[0]
    rows = [measure(backend, base, adapter_dir, args) for backend in args.backends.split(",")]
    print("\n" + " ".join(["python", *map(shlex.quote, sys.argv)]))
    report(rows)


if __name__ == "__main__":
    main()
