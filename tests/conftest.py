"""Shared fixtures: a tiny ChatML tokenizer and tiny random Hugging Face checkpoints.

Everything is built in the test session (a few seconds, nothing downloaded). The tiny models
have every parameter drawn away from its default (norms included), so a weight that is
dropped, transposed or mis-mapped shows up as a logit difference far above the tolerance.

    python -m pytest -q tests -m "not slow"         # the fast set, seconds
    ODLORA_HOME=/tmp/oh python -m pytest -q tests   # everything; default-base tests skip unless pulled
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

VOCAB_SIZE = 400
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2

# SmolLM2's ChatML template, without its default system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
    "rope_theta": 10000.0,
}

# name -> (model_type, overrides of TINY_CONFIG): every configuration our model claims to load.
TINY_VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-rope-llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama-attention-bias": ("llama", {"attention_bias": True}),
    "qwen2": ("qwen2", {}),
    # Qwen3 decouples head_dim from hidden/heads (Qwen3-0.6B: 1024 hidden, 16 heads of 128).
    "qwen3": ("qwen3", {"head_dim": 32}),
}


def pytest_collection_modifyitems(config, items):
    """`heavy` tests run only with ODLORA_HEAVY=1: on CI's AVX2-only CPU each takes tens of minutes."""
    if os.environ.get("ODLORA_HEAVY") == "1":
        return
    skip = pytest.mark.skip(reason="heavy: set ODLORA_HEAVY=1 to run it (tens of minutes on an AVX2-only CPU)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Run fast tests on one intra-op thread.

    The tiny models' ops take microseconds, so two threads buy nothing but hand-offs, and when
    another process shares the two cores those hand-offs make the suite 4x slower (measured:
    test_model.py 7.5 s on one thread, 31 s on two under load). Slow tests use every thread.
    """
    if request.node.get_closest_marker("slow"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class CliRun(NamedTuple):
    code: int
    out: str
    err: str


def run_cli(monkeypatch, capsys, *args) -> CliRun:
    """Run `odlora ARGS` in-process: (exit code, stdout, stderr)."""
    from ondevice_lora import cli

    capsys.readouterr()  # drop what fixtures printed while building the tiny models
    monkeypatch.setattr(sys, "argv", ["odlora", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return CliRun(code, out, err)


def training_text(n_lines: int = 400) -> list[str]:
    """Deterministic English-ish lines with punctuation, digits and chat roles."""
    rng = random.Random(0)
    subjects = ["The cat", "A small dog", "My friend", "The capital of France", "Paris", "The model",
                "Every adapter", "Our phone", "The meeting", "She", "user", "assistant"]
    verbs = ["is", "was", "runs to", "looks at", "remembers", "answers", "writes", "moves"]
    objects = ["the river.", "a red house.", "12 apples!", "the quick brown fox?", "March 3rd, 2024.",
               "Berlin and Rome.", '"hello world"', "it's fine, isn't it?", "What is the capital?"]
    return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}" for _ in range(n_lines)]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # GPT-2 style byte-level BPE, as SmolLM2 has (and as a GGUF "gpt2" tokenizer is rebuilt).
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_text(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE
    return tokenizer


def make_tiny_hf_model(model_type: str, path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """Write a random tiny `model_type` checkpoint (safetensors + tokenizer) to `path`; returns `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**TINY_CONFIG, **overrides})
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)  # every parameter is redrawn from it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # around 1, as trained norms are, but never exactly 1
                p.normal_(1.0, 0.2, generator=generator)
            else:
                p.normal_(0.0, 0.15, generator=generator)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tiny_tokenizer):
    """`factory(variant) -> Path` of a tiny checkpoint from TINY_VARIANTS, built once per session.

    The directories are shared between tests: copy one before changing it.
    """
    built: dict[str, Path] = {}

    def factory(variant: str = "llama") -> Path:
        if variant not in built:
            model_type, overrides = TINY_VARIANTS[variant]
            path = tmp_path_factory.mktemp(f"tiny-{variant}")
            built[variant] = make_tiny_hf_model(model_type, path, tiny_tokenizer, **overrides)
        return built[variant]

    return factory


@pytest.fixture(params=list(TINY_VARIANTS))
def tiny_model_dir(request, tiny_model_factory) -> Path:
    """Each tiny variant in turn (table-driven: one test runs over every configuration)."""
    return tiny_model_factory(request.param)


@pytest.fixture
def tiny_llama_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


# Hugging Face name (after "model.layers.{i}.") -> llama.cpp's GGUF tensor name.
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{GGUF_LAYER_NAMES[rest]}.{kind}"
    return f"{GGUF_GLOBAL_NAMES[stem]}.{kind}"


def llama_cpp_permute(w, n_head: int):
    """What llama.cpp's convert_hf_to_gguf.py does to Llama q/k weights (interleaved RoPE halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_dir: Path, tokenizer, out: Path, quantize_q8_0=()) -> Path:
    """Write the tiny Llama checkpoint in `hf_dir` as a llama.cpp-style GGUF (F32, some Q8_0)."""
    import gguf
    from gguf.quants import quantize
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // n_head
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    for name, w in load_file(str(hf_dir / "model.safetensors")).items():
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, n_head)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, n_kv)
        name = gguf_name(name)
        if name in quantize_q8_0:
            writer.add_tensor(name, quantize(w, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="session")
def tiny_gguf_factory(tmp_path_factory, tiny_model_factory, tiny_tokenizer):
    """`factory(variant, quantize_q8_0=()) -> Path` of a tiny Llama GGUF, built once per session."""
    built: dict[tuple, Path] = {}

    def factory(variant: str = "llama", quantize_q8_0=()) -> Path:
        key = (variant, tuple(sorted(quantize_q8_0)))
        if key not in built:
            out = tmp_path_factory.mktemp(f"gguf-{variant}") / "tiny.gguf"
            built[key] = write_tiny_gguf(tiny_model_factory(variant), tiny_tokenizer, out, quantize_q8_0)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def default_base():
    """The real default base, if pulled; CI sets ODLORA_REQUIRE_DEFAULT_BASE=1 to fail instead of skip."""
    from ondevice_lora.base import load_base
    from ondevice_lora.registry import DEFAULT_BASE, is_pulled

    if not is_pulled(DEFAULT_BASE):
        reason = "default base not pulled: run `odlora base pull`"
        if os.environ.get("ODLORA_REQUIRE_DEFAULT_BASE") == "1":
            pytest.fail(reason + " (ODLORA_REQUIRE_DEFAULT_BASE=1)", pytrace=False)
        pytest.skip(reason)
    return load_base(DEFAULT_BASE)


DEFAULT_EXPORT_SEQ = 256  # KV-cache length of the default base's exports in the slow tests
# What the default base's exports are asked, to check they keep the answer: a prompt whose greedy
# answer is no near tie in fp32 (its tokens' top-1 margins are 1.0 logits and over). To "What is
# the capital of France?" fp32 picks "The" over "L" by 0.08, and the ONNX int8/int4 and ExecuTorch
# 8da4w exports answered in French on an AVX2-only CPU, where int8 activations round differently
# (ONNX Runtime's MatMulNBits: max logit error 1.1 at accuracy level 4, 0.33 at level 1).
DEFAULT_EXPORT_QUESTION = "Name the capital of France."


@pytest.fixture(scope="session")
def default_export(default_base, tmp_path_factory):
    """`default_export(target, quant) -> Path`: the default base exported once per session
    (slots r<=16 on all linears, max_seq_len 256); an export takes from 40 s (ONNX) to minutes."""
    from ondevice_lora.exporters.export import export
    from ondevice_lora.registry import DEFAULT_BASE

    root = tmp_path_factory.mktemp("default-exports")
    built: dict[tuple[str, str], Path] = {}

    def get(target: str, quant: str) -> Path:
        if (target, quant) not in built:
            out = root / f"{target}-{quant}"
            export(DEFAULT_BASE, target, out, quant=quant, max_seq_len=DEFAULT_EXPORT_SEQ, say=lambda *_: None)
            built[target, quant] = out
        return built[target, quant]

    return get


@pytest.fixture(scope="session")
def default_adapter(default_base, tmp_path_factory):
    """A rank-8 all-linear adapter on the default base with random non-zero A and B at a trained
    adapter's scale; returns (its directory, the fp32 default base with it attached, its factors as
    packed blobs hold them: fp16)."""
    from ondevice_lora.adapter import adapter_from_model, attach_adapter, load_adapter, save_adapter
    from ondevice_lora.base import load_base
    from ondevice_lora.config import LoraConfig
    from ondevice_lora.lora import apply_lora
    from ondevice_lora.registry import DEFAULT_BASE
    from sessions import as_packed

    torch.manual_seed(0)
    base = load_base(DEFAULT_BASE)
    config = LoraConfig(rank=8, alpha=16.0)
    apply_lora(base.model, config)
    for name, p in base.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("default-adapter") / "random-r8"
    save_adapter(adapter_from_model(base.model, config, {"base_fingerprint": base.fingerprint}), out, DEFAULT_BASE)
    reference = load_base(DEFAULT_BASE)
    attach_adapter(reference.model, as_packed(load_adapter(out)))
    return out, reference.model.eval()


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_factory, tmp_path_factory):
    """A tiny ExecuTorch export (fp32, r<=8 all-linear slots) with two random adapters packed for it,
    bundled as an app would ship it: `base` holds the export and adapter `a`; `extra` is an adapter
    bundle with `b`. Returns a dict of the paths and the adapter directories."""
    pytest.importorskip("executorch")
    from ondevice_lora.exporters.export import export, pack
    from ondevice_lora.runtime.bundle import write_bundle
    from test_runtime import make_adapter

    root = tmp_path_factory.mktemp("bundle")
    base_dir = tiny_model_factory("llama")
    export(str(base_dir), "executorch", root / "export", max_rank=8, max_seq_len=64, say=lambda *_: None)
    dirs, blobs = {}, {}
    for name, seed, rank in (("a", 1, 4), ("b", 2, 8)):
        dirs[name] = make_adapter(base_dir, root / f"adapter-{name}", seed, rank, ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                                  "gate_proj", "up_proj", "down_proj"))
        blobs[name] = root / f"{name}.slots"
        pack(dirs[name], root / "export", blobs[name])
    write_bundle(root / "export", [("a", blobs["a"])], root / "base-bundle")
    write_bundle(root / "export", [("b", blobs["b"])], root / "extra-bundle", with_base=False)
    return {"root": root, "base_dir": base_dir, "export": root / "export", "dirs": dirs, "blobs": blobs,
            "base": root / "base-bundle", "extra": root / "extra-bundle"}
