"""llama.cpp on the default base's own GGUF with our rank-8 adapter as a llama.cpp LoRA adapter:
prefill and decode tokens/s with and without it, and a check that it does what it does in our model.

    pip install llama-cpp-python==0.3.36       # builds llama.cpp from source; not a project dependency
    ODLORA_HOME=/tmp/oh python bench/bench_llamacpp.py
    ODLORA_HOME=/tmp/oh python bench/bench_llamacpp.py --threads 2 --adapter my-adapter --work /tmp/lcpp-bench
    ODLORA_HOME=/tmp/oh python bench/bench_llamacpp.py --quick                # few tokens: does it run?

The base is the GGUF that `odlora base pull` keeps beside the converted base (--gguf; the default
base's is SmolLM2-135M-Instruct Q4_1), run by llama.cpp as it is. The adapter is --adapter, or the
same random rank --adapter-rank all-linear adapter bench_runtime.py makes (kept in --work/adapters),
written as a llama.cpp LoRA GGUF by `ondevice_lora.adapter_gguf.write_lora_gguf` (f32 factors,
q/k rows in llama.cpp's RoPE order).

Speed: --prompt-tokens tokens of ondevice_lora/samples/general.txt in one llama_decode (n_batch =
the prompt), then --tokens greedy one-token decodes, wall time, best of --rounds interleaved
rounds, for the base alone and the base with the adapter (two contexts, each loaded once).

Effect: on a chat prompt, the last position's logits with and without the adapter (max |Δ|), the
cosine between llama.cpp's Δlogits and our fp32 model's Δlogits for the same adapter, and the
greedy continuations with and without it. llama.cpp multiplies Q4_1 weights by activations it
quantises to 8 bits, we dequantise the weights to fp32, so the two bases already differ (up to ~2
in a logit here, another first token) and the cosine is ~0.9, not 1. The conversion itself is
exact: with an F32 GGUF of the same dequantised weights (and an F32 KV cache) llama.cpp matched
our model to 5e-5 in the logits, cosine 0.9999998 (tests/test_adapter_gguf.py checks the same on
a tiny model whenever llama-cpp-python is installed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import make_adapters, prompt_ids  # noqa: E402  the same adapter as bench_runtime

INSTALL = ("llama-cpp-python is not installed (it is not a project dependency); build it from source:\n"
           "    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python==0.3.36\n"
           "(or pip install a local llama_cpp_python-0.3.36.tar.gz the same way)")


def open_llama(gguf: Path, n_ctx: int, n_batch: int, threads: int, lora: Path | None = None):
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora)} if lora else {}
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                 n_threads_batch=threads, logits_all=False, verbose=False, **kwargs)


def last_logits(llm) -> np.ndarray:
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def run(llm, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, greedy tokens) for a fresh sequence."""
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    prefilled = time.perf_counter()
    out = []
    for _ in range(tokens):
        out.append(int(last_logits(llm).argmax()))
        llm.eval([out[-1]])
    return prefilled - started, time.perf_counter() - prefilled, out


@torch.no_grad()
def our_delta(base, adapter_dir: Path, ids: list[int]) -> np.ndarray:
    """Our fp32 model's last-position Δlogits for the adapter (the model is left with it attached)."""
    from ondevice_lora.adapter import attach_adapter, load_adapter

    x = torch.tensor([ids])
    plain = base.model(x)[0, -1]
    attach_adapter(base.model, load_adapter(adapter_dir))
    return (base.model(x)[0, -1] - plain).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="default: the default base's source GGUF")
    parser.add_argument("--work", type=Path, default=Path("/tmp/odlora-bench-runtime"))
    parser.add_argument("--adapter", type=Path, help="a trained adapter directory (default: a random one)")
    parser.add_argument("--adapter-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="few tokens, one round: checks that it runs")
    args = parser.parse_args()
    print("$ python " + shlex.join(sys.argv), flush=True)
    if args.quick:
        args.prompt_tokens, args.tokens, args.rounds = 32, 8, 1
    try:
        import llama_cpp
    except ImportError:
        sys.exit(INSTALL)

    from ondevice_lora.adapter import check_base, load_adapter
    from ondevice_lora.adapter_gguf import write_lora_gguf
    from ondevice_lora.base import load_base
    from ondevice_lora.prompts import encode_prompt
    from ondevice_lora.registry import DEFAULT_BASE, source_gguf

    gguf = args.gguf or source_gguf(DEFAULT_BASE)
    if not gguf.is_file():
        sys.exit(f"{gguf}: no such GGUF; pass --gguf (the default base's is kept there by `odlora base pull`)")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    base = load_base(str(gguf))  # our reading of the same file: the config, the fingerprint, the Δlogits oracle
    adapter_dir = args.adapter or make_adapters(base, args.work / "adapters", args.adapter_rank, 1)[0]
    adapter = load_adapter(adapter_dir)
    check_base(adapter, base.fingerprint, str(adapter_dir))
    lora = args.work / f"{adapter_dir.name}.lora.gguf"
    info = write_lora_gguf(adapter, base.config, lora)
    print(f"llama-cpp-python {llama_cpp.__version__}; base {gguf} ({base.fingerprint[:19]}...); adapter {adapter_dir} "
          f"(rank {adapter.rank}, {len(adapter.A)} modules) -> {lora} ({info['bytes'] / 2**20:.1f} MiB, "
          f"alpha {info['alpha']:g}{', scales folded into B' if info['folded'] else ''}); {args.threads} threads", flush=True)

    prompt = prompt_ids(base.tokenizer, args.prompt_tokens)
    n_ctx = args.prompt_tokens + args.tokens + 8
    llms = {"none": open_llama(gguf, n_ctx, args.prompt_tokens, args.threads),
            "adapter": open_llama(gguf, n_ctx, args.prompt_tokens, args.threads, lora)}
    for llm in llms.values():  # warm-up: first runs allocate
        run(llm, prompt, args.tokens)
    best = {name: [float("inf"), float("inf")] for name in llms}
    for _ in range(args.rounds):
        for name, llm in llms.items():
            prefill, decode, _ = run(llm, prompt, args.tokens)
            best[name] = [min(best[name][0], prefill), min(best[name][1], decode)]
    speed = {name: (len(prompt) / p, args.tokens / d) for name, (p, d) in best.items()}
    print(f"speed (prefill {len(prompt)} tokens, decode {args.tokens} tokens, best of {args.rounds}; tokens/s)")
    print(f"   {'':<16} {'prefill':>9} {'decode':>9}")
    for name, (p, d) in speed.items():
        print(f"   {name:<16} {p:9.1f} {d:9.2f}")
    ratio = {"prefill": speed["adapter"][0] / speed["none"][0], "decode": speed["adapter"][1] / speed["none"][1]}
    print(f"   {'adapter / none':<16} {ratio['prefill']:8.3f}x {ratio['decode']:8.3f}x", flush=True)

    chat = encode_prompt(base.tokenizer, "What is the capital of France?")
    greedy, logits = {}, {}
    for name, llm in llms.items():
        greedy[name] = run(llm, chat, 16)[2]
        llm.reset()
        llm.eval(chat)
        logits[name] = last_logits(llm)
    delta = logits["adapter"] - logits["none"]
    ours = our_delta(base, adapter_dir, chat)
    cosine = float(delta @ ours / (np.linalg.norm(delta) * np.linalg.norm(ours) + 1e-12))
    texts = {name: base.tokenizer.decode(ids, skip_special_tokens=True) for name, ids in greedy.items()}
    print("effect (chat prompt 'What is the capital of France?', last position)")
    print(f"   max |Δlogits| llama.cpp {np.abs(delta).max():.4f}, ours (fp32) {np.abs(ours).max():.4f}; "
          f"cosine(Δ llama.cpp, Δ ours) {cosine:.4f}")
    for name, text in texts.items():
        print(f"   greedy {name:<8} {text!r}")
    print(f"   continuation differs: {greedy['adapter'] != greedy['none']}", flush=True)
    print("\n" + json.dumps({"tokens_per_s": {k: [round(p, 1), round(d, 2)] for k, (p, d) in speed.items()},
                             "ratio_adapter_over_none": ratio, "max_abs_dlogits": float(np.abs(delta).max()),
                             "dlogits_cosine_vs_ours": cosine, "greedy_differs": greedy["adapter"] != greedy["none"],
                             "greedy": texts, "lora_gguf_bytes": info["bytes"]}))


if __name__ == "__main__":
    main()
