"""Prefill and decode speed of every path, with and without a rank-8 adapter, side by side in one run.

    ODLORA_HOME=/tmp/oh python bench/bench_decode.py                              # onnx int4, native vs llama.cpp
    ODLORA_HOME=/tmp/oh python bench/bench_decode.py --paths onnx,llamacpp,genai --rounds 5 --work /tmp/dec
    ODLORA_HOME=/tmp/oh python bench/bench_decode.py --quick                      # few tokens: does it run?
    ODLORA_HOME=/tmp/oh python bench/bench_decode.py --paths onnx,llamacpp,openvino --openvino-python /tmp/ov/bin/python

Paths (each optional but ours; a missing peer is reported, not faked):

    onnx      our ONNX int4 export through the Python runtime (`Runtime.generate`: sampling,
              detokenising and the per-request work included), the adapter packed for it
    native    the native runtime (runtime/native, C++, what an app ships) on a bundle of our
              ExecuTorch export (--native-quant, 8da4w by default) with the adapter packed in it;
              its `--requests` answers report the prefill and total times; peak RSS is its own
    llamacpp  llama.cpp (`llama-cpp-python`, built from source: see bench_llamacpp.py) on the base's
              own Q4_1 GGUF, the adapter as a llama.cpp LoRA GGUF; greedy on its logits per token
    genai     ONNX Runtime GenAI: its model builder's int4 CPU build of the same base (the fp32
              weights `odlora base pull` converted); the adapter through the builder's `adapter_path`,
              which bakes it into a second model (see setup_genai); greedy `Generator` loop
    openvino  OpenVINO GenAI's LLMPipeline on CPU: optimum-intel's int4 export of the same base (NNCF
              weight compression, asymmetric int4 in groups of 32), the adapter's PEFT safetensors as
              an `openvino_genai.Adapter` applied per request (its LoRA swap); greedy. OpenVINO wants its
              own environment (optimum-intel pins its own transformers and torch): --openvino-python
              names that interpreter, which exports the model and runs the workers:
                  python -m venv /tmp/ov && /tmp/ov/bin/pip install torch==2.13.0 \
                      && /tmp/ov/bin/pip install openvino-genai "optimum-intel[openvino]"

Setup, kept in --work and reused: the ONNX export (once), one random rank-8 all-linear adapter
(bench_runtime.make_adapters: PEFT init for A, B ~ N(0, 0.01)), packed and converted for each path.

Each measurement is a fresh process (`--worker PATH VARIANT`), and the paths take turns, round by
round: so no path runs warm in another's cache or while another runs. A worker opens its path,
warms it with one short request, then times one request: --prompt-tokens tokens of the shipped
general text as a plain prompt (prefill: tokens / time to the first token), then --tokens greedy
tokens (decode: tokens after the first / their time). Peak RSS is the worker's VmHWM (the
Python interpreter and the path's libraries included; not ru_maxrss, which Linux carries over
from the parent through fork and exec: the parent's export would be every worker's peak).
Medians over --rounds; ratios to llama.cpp with no adapter, the issue's bar. Prints the table, a
JSON line and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PATHS = ("onnx", "native", "llamacpp", "genai", "openvino")
VARIANTS = ("none", "adapter")
BAR = ("llamacpp", "none")  # what every row is divided by


# -- setup (in the parent process, once) ---------------------------------------------------------

def setup(args) -> dict:
    """Build or reuse what the paths need; returns {path: reason} for peers that cannot run."""
    from bench_runtime import make_adapters

    from ondevice_lora.base import load_base

    args.work.mkdir(parents=True, exist_ok=True)
    base = load_base(None)
    adapter_dir = make_adapters(base, args.work / "adapters", args.adapter_rank, 1)[0]
    missing = {}
    for path in args.paths:
        try:
            {"onnx": setup_onnx, "native": setup_native, "llamacpp": setup_llamacpp, "genai": setup_genai,
             "openvino": setup_openvino}[path](args, base, adapter_dir)
        except PeerMissing as e:
            missing[path] = str(e)
    return missing


class PeerMissing(Exception):
    pass


def setup_onnx(args, base, adapter_dir: Path) -> None:
    from ondevice_lora.exporters.export import export, pack

    out = args.work / "onnx-int4"
    if not (out / "manifest.json").exists():
        print(f"exporting onnx int4 into {out} (once) ...", flush=True)
        export(None, "onnx", out, quant="int4", force=True, say=lambda *_: None)
    blob = args.work / "adapter.onnx_adapter"
    if not blob.exists():
        pack(adapter_dir, out, blob)


def setup_native(args, base, adapter_dir: Path) -> None:
    """The native build, an ExecuTorch export (--native-quant) and a bundle of it with the adapter."""
    from ondevice_lora.exporters.export import export, pack
    from ondevice_lora.runtime.bundle import write_bundle
    from ondevice_lora.runtime.native_build import build

    build(say=lambda m: print(m, flush=True))
    out = args.work / f"executorch-{args.native_quant}"
    if not (out / "manifest.json").exists():
        print(f"exporting executorch {args.native_quant} into {out} (once) ...", flush=True)
        export(None, "executorch", out, quant=args.native_quant, force=True, say=lambda *_: None)
    bundle = args.work / f"bundle-executorch-{args.native_quant}"
    if not (bundle / "bundle.json").exists():
        blob = args.work / f"adapter.{args.native_quant}.slots"
        pack(adapter_dir, out, blob)
        write_bundle(out, [("bench", blob)], bundle, force=True)


def setup_llamacpp(args, base, adapter_dir: Path) -> None:
    from ondevice_lora.adapter import load_adapter
    from ondevice_lora.adapter_gguf import write_lora_gguf
    from ondevice_lora.registry import DEFAULT_BASE, source_gguf

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise PeerMissing("llama-cpp-python is not installed (bench_llamacpp.py says how to build it)") from None
    if not source_gguf(DEFAULT_BASE).is_file():
        raise PeerMissing(f"{source_gguf(DEFAULT_BASE)}: no such GGUF (odlora base pull keeps it)")
    lora = args.work / "adapter.lora.gguf"
    if not lora.exists():
        write_lora_gguf(load_adapter(adapter_dir), base.config, lora)


def setup_genai(args, base, adapter_dir: Path) -> None:
    """Two builds: the base, and the base with the adapter (`adapter_path`). ORT GenAI 0.18's builder
    writes the adapter's factors into the graph as constant int4 MatMulNBits pairs (no
    `.onnx_adapter` for its `Adapters` API to swap: that takes Olive's ExtractAdapters pass), so its
    adapter row is a second model, not a swap on one base."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise PeerMissing("onnxruntime-genai is not installed (pip install onnxruntime-genai)") from None
    for variant, extra in (("none", []), ("adapter", ["--extra_options", f"adapter_path={adapter_dir}"])):
        out = args.work / f"genai-int4-{variant}"
        if (out / "genai_config.json").exists():
            continue
        print(f"building the ONNX Runtime GenAI int4 model into {out} (once) ...", flush=True)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base.path), "-o", str(out),
                   "-p", "int4", "-e", "cpu", "-c", str(args.work / "genai-cache"), *extra]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise PeerMissing("ONNX Runtime GenAI's builder failed: " + " | ".join(tail))


def setup_openvino(args, base, adapter_dir: Path) -> None:
    """optimum-intel's int4 export (groups of 32: the base's widths are not multiples of its default
    128) and the prompt's token ids for the worker, which has no odlora to tokenise with."""
    check = subprocess.run([args.openvino_python, "-c", "import openvino_genai, optimum.intel"], capture_output=True)
    if check.returncode != 0:
        raise PeerMissing(f"{args.openvino_python} has no openvino_genai or optimum-intel (see --help)")
    from ondevice_lora.base import load_tokenizer

    out = args.work / "openvino-int4"
    if not (out / "openvino_model.xml").exists():
        print(f"exporting the OpenVINO int4 model into {out} (once) ...", flush=True)
        command = [args.openvino_python, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model",
                   str(base.path), "--task", "text-generation-with-past", "--weight-format", "int4",
                   "--group-size", "32", "--ratio", "1.0", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise PeerMissing("optimum-intel's OpenVINO export failed: " + " | ".join(tail))
    ids = prompt_ids(load_tokenizer(base.path), args.prompt_tokens)
    (args.work / "openvino-prompt.json").write_text(json.dumps({"ids": ids, "adapter": str(adapter_dir)}))


# -- workers (one fresh process per measurement) ---------------------------------------------------

def prompt_ids(tokenizer, n: int) -> list[int]:
    from ondevice_lora.samples import general_text_path

    ids = tokenizer.encode(general_text_path().read_text(), add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def worker_onnx(args, variant: str) -> tuple[float, float, int]:
    from ondevice_lora.config import SamplingConfig
    from ondevice_lora.runtime import Runtime

    rt = Runtime.open(args.work / "onnx-int4", threads=args.threads)
    adapter = None
    if variant == "adapter":
        rt.register_adapter("bench", args.work / "adapter.onnx_adapter")
        adapter = "bench"
    prompt = rt.tokenizer.decode(prompt_ids(rt.tokenizer, args.prompt_tokens))
    request = lambda n: rt.generate(prompt, adapter=adapter, chat=False,  # noqa: E731
                                    sampling=SamplingConfig(max_new_tokens=n, stop=[]))
    request(4)
    result = request(args.tokens)
    n = len(result.token_ids)
    return args.prompt_tokens / result.prefill_seconds, (n - 1) / (result.seconds - result.prefill_seconds), n


def worker_native(args, variant: str) -> tuple[float, float, int, float]:
    """One `odlora-native --requests` process: a short warm-up request, then the timed one (raw text,
    the prompt's ids decoded). Returns its own peak RSS too: this Python process only starts it."""
    from bench_native import run_child

    from ondevice_lora.base import load_tokenizer, resolve
    from ondevice_lora.runtime.native_build import build

    tokenizer = load_tokenizer(resolve(None))
    prompt = tokenizer.decode(prompt_ids(tokenizer, args.prompt_tokens))
    adapter = "bench" if variant == "adapter" else "base"
    requests = args.work / f"native-{variant}.jsonl"
    requests.write_text("".join(json.dumps({"prompt": p, "adapter": adapter, "max_new_tokens": n, "chat": False}) + "\n"
                                for p, n in ((prompt[:40], 4), (prompt, args.tokens))))
    bundle = args.work / f"bundle-executorch-{args.native_quant}"
    out, _, rss = run_child([str(build(say=lambda m: None)), str(bundle), "--requests", str(requests)])
    answer = json.loads(out.splitlines()[-1])
    n, prefill_s = len(answer["token_ids"]), answer["prefill_ms"] / 1e3
    return answer["prompt_tokens"] / prefill_s, (n - 1) / (answer["total_ms"] / 1e3 - prefill_s), n, rss


def worker_llamacpp(args, variant: str) -> tuple[float, float, int]:
    from bench_llamacpp import open_llama, run

    from ondevice_lora.base import load_tokenizer, resolve
    from ondevice_lora.registry import DEFAULT_BASE, source_gguf

    prompt = prompt_ids(load_tokenizer(resolve(None)), args.prompt_tokens)
    lora = args.work / "adapter.lora.gguf" if variant == "adapter" else None
    llm = open_llama(source_gguf(DEFAULT_BASE), args.prompt_tokens + args.tokens + 8, args.prompt_tokens,
                     args.threads, lora)
    run(llm, prompt[:8], 4)
    prefill, decode, out = run(llm, prompt, args.tokens)
    return len(prompt) / prefill, len(out) / decode, len(out)


def worker_genai(args, variant: str) -> tuple[float, float, int]:
    import onnxruntime_genai as og

    from ondevice_lora.base import load_tokenizer, resolve

    config = og.Config(str(args.work / f"genai-int4-{variant}"))
    config.clear_providers()
    model = og.Model(config)
    prompt = prompt_ids(load_tokenizer(resolve(None)), args.prompt_tokens)

    def request(ids: list[int], n: int) -> tuple[float, float, int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, do_sample=False, min_length=len(ids) + n)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter()
        made = 1
        while not generator.is_done():
            generator.generate_next_token()
            made += 1
        return first - started, time.perf_counter() - first, made

    request(prompt[:8], 4)
    prefill, decode, made = request(prompt, args.tokens)
    return len(prompt) / prefill, (made - 1) / decode, made


def worker_openvino(args, variant: str) -> tuple[float, float, int]:
    """Runs in --openvino-python's environment: numpy and openvino only."""
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    setup = json.loads((args.work / "openvino-prompt.json").read_text())
    adapter = og.Adapter(str(Path(setup["adapter"]) / "adapter_model.safetensors"))
    pipe = og.LLMPipeline(str(args.work / "openvino-int4"), "CPU", adapters=og.AdapterConfig(adapter),
                          INFERENCE_NUM_THREADS=args.threads)
    chosen = og.AdapterConfig(adapter) if variant == "adapter" else og.AdapterConfig()

    def request(ids: list[int], n: int):
        tokens = np.array([ids], np.int64)
        inputs = og.TokenizedInputs(ov.Tensor(tokens), ov.Tensor(np.ones_like(tokens)))
        config = og.GenerationConfig(max_new_tokens=n, min_new_tokens=n, ignore_eos=True, do_sample=False)
        return pipe.generate(inputs, config, adapters=chosen)

    request(setup["ids"][:8], 4)
    result = request(setup["ids"], args.tokens)
    metrics = result.perf_metrics  # milliseconds: time to the first token, then per output token
    return len(setup["ids"]) / (metrics.get_ttft().mean / 1e3), 1e3 / metrics.get_tpot().mean, len(result.tokens[0])


def worker(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    path, variant = args.worker
    prefill, decode, tokens, *child_peak = {"onnx": worker_onnx, "native": worker_native, "llamacpp": worker_llamacpp,
                                            "genai": worker_genai, "openvino": worker_openvino}[path](args, variant)
    peak = child_peak[0] if child_peak else peak_rss_mib()
    print(json.dumps({"prefill": prefill, "decode": decode, "tokens": tokens, "peak_rss_mib": peak}))


def peak_rss_mib() -> float:
    """This process's own peak resident set (Linux's VmHWM, in MiB)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def measure(args, path: str, variant: str) -> dict:
    python = args.openvino_python if path == "openvino" else sys.executable
    command = [python, __file__, "--worker", path, variant, "--work", str(args.work), "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--tokens", str(args.tokens),
               "--native-quant", args.native_quant]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{path} ({variant}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table ---------------------------------------------------------------------------------

def report(args, runs: dict, missing: dict) -> None:
    median = {key: {field: statistics.median(r[field] for r in rs) for field in rs[0]} for key, rs in runs.items()}
    bar = median.get(BAR)
    print(f"\n{args.threads} threads, prompt {args.prompt_tokens} tokens, then {args.tokens} greedy tokens; "
          f"medians of {args.rounds} rounds, each a fresh process; ratios to llama.cpp with no adapter")
    print(f"{'path':<10} {'adapter':<8} {'prefill tok/s':>13} {'decode tok/s':>12} {'x prefill':>9} {'x decode':>8} "
          f"{'adapter/none':>12} {'peak RSS MiB':>12}")
    for (path, variant), m in median.items():
        ratio = lambda field: f"{m[field] / bar[field]:8.2f}x" if bar else "       -"  # noqa: E731
        plain = median.get((path, "none"))
        own = f"{m['decode'] / plain['decode']:11.2f}x" if plain and variant == "adapter" else ""
        print(f"{path:<10} {variant:<8} {m['prefill']:13.1f} {m['decode']:12.1f} {ratio('prefill'):>9} "
              f"{ratio('decode'):>8} {own:>12} {m['peak_rss_mib']:12.0f}")
    for path, reason in missing.items():
        print(f"{path:<10} not run: {reason}")
    print(json.dumps({"median": {f"{p}/{v}": {k: round(x, 2) for k, x in m.items()} for (p, v), m in median.items()},
                      "not_run": missing}))
    print("$ python " + shlex.join(sys.argv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default="onnx,native,llamacpp,genai", help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--native-quant", default="8da4w", choices=("fp32", "8da4w", "8da8w"),
                        help="the ExecuTorch export the native path's bundle holds")
    parser.add_argument("--openvino-python", default=sys.executable,
                        help="the interpreter with openvino-genai and optimum-intel (the openvino path)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "odlora-bench-decode")
    parser.add_argument("--adapter-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="few tokens, one round: checks that it runs")
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown:
        sys.exit(f"--paths: unknown path {unknown[0]!r} (choose from {', '.join(PATHS)})")
    if args.quick:
        args.prompt_tokens, args.tokens, args.rounds = 32, 8, 1
    print("$ python " + shlex.join(sys.argv), flush=True)
    missing = setup(args)
    runnable = [p for p in args.paths if p not in missing]
    runs: dict = {}
    for round_index in range(args.rounds):
        for path in runnable:
            for variant in VARIANTS:
                runs.setdefault((path, variant), []).append(measure(args, path, variant))
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    report(args, runs, missing)


if __name__ == "__main__":
    main()
