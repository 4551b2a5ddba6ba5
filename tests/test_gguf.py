"""GGUF reading: tiny Llama GGUFs written here the way llama.cpp's converter writes them.

q/k weights are permuted as llama.cpp does, so a wrong un-permute shows in the logits; some
variants store a few tensors as Q8_0, so dequantisation is exercised as well.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ondevice_lora.base import convert_gguf_to_dir, load_base
from ondevice_lora.gguf_checkpoint import read_gguf_tokenizer

ATOL = 1e-4
Q8_0_TENSORS = ("blk.0.ffn_up.weight", "blk.1.attn_q.weight", "blk.1.attn_k.weight", "token_embd.weight")

# name -> (tiny HF variant, tensors stored as Q8_0); all-F32 cases must also match the original model.
CASES = {
    "f32": ("llama", ()),
    "f32-tied": ("llama-tied", ()),
    "q8_0": ("llama", Q8_0_TENSORS),
}


F32_CASES = [name for name, (_, quantized) in CASES.items() if not quantized]


@pytest.fixture
def open_case(tiny_gguf_factory, tiny_model_factory):
    """`open_case(name) -> (gguf path, original HF dir)`."""

    def open_(name):
        variant, quantized = CASES[name]
        return tiny_gguf_factory(variant, quantized), tiny_model_factory(variant)

    return open_


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_logits_match_transformers_reading_the_same_gguf(open_case, name):
    from transformers import AutoModelForCausalLM

    gguf_path, _ = open_case(name)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    x = tokens()
    assert max_diff(load_base(str(gguf_path)).model(x), reference(x).logits) <= ATOL


@pytest.mark.parametrize("name", F32_CASES)  # Q8_0 is lossy: those are checked against transformers above
@torch.no_grad()
def test_f32_gguf_reproduces_the_original_model(open_case, name):
    from transformers import AutoModelForCausalLM

    gguf_path, hf_dir = open_case(name)
    original = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    x = tokens()
    assert max_diff(load_base(str(gguf_path)).model(x), original(x).logits) <= ATOL


@pytest.mark.parametrize("name", list(CASES))
def test_config_read_from_gguf(open_case, name):
    gguf_path, hf_dir = open_case(name)
    ours = vars(load_base(str(gguf_path)).model.args)
    original = vars(load_base(str(hf_dir)).model.args)
    # GGUF stores the epsilon as float32: 1e-6 comes back as 9.99999997e-07.
    assert ours.pop("norm_eps") == pytest.approx(original.pop("norm_eps"), rel=1e-6)
    assert ours == original


@pytest.mark.parametrize("name", list(CASES))
def test_fingerprint_survives_conversion(open_case, name, tmp_path):
    gguf_path, _ = open_case(name)
    from_gguf = load_base(str(gguf_path))
    convert_gguf_to_dir(gguf_path, tmp_path / "converted")
    converted = load_base(str(tmp_path / "converted"))
    assert from_gguf.fingerprint == converted.fingerprint
    assert from_gguf.fingerprint.startswith("sha256:")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(from_gguf.model(x), converted.model(x))


SAMPLES = [
    "The capital of France is Paris.",
    "  two leading spaces, digits 12345 and punctuation?!",
    "<|im_start|>user\nWhat is the capital?<|im_end|>\n<|im_start|>assistant\n",
    "naïve café ✓",  # bytes outside the trained merges
]


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_rebuilt_from_gguf_encodes_like_the_original(tiny_gguf_factory, tiny_tokenizer, text):
    rebuilt = read_gguf_tokenizer(tiny_gguf_factory("llama"))
    assert rebuilt.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text, add_special_tokens=False)


def test_tokenizer_rebuilt_from_gguf_keeps_chat_template_and_eos(tiny_gguf_factory, tiny_tokenizer):
    rebuilt = read_gguf_tokenizer(tiny_gguf_factory("llama"))
    messages = [{"role": "user", "content": "hi"}]
    render = lambda tok: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # noqa: E731
    assert render(rebuilt) == render(tiny_tokenizer)
    assert rebuilt.eos_token_id == tiny_tokenizer.eos_token_id


def test_weights_loaded_from_gguf_can_be_updated_in_place(tiny_gguf_factory):
    # F32 tensors must be copied out of the read-only memory map: a LoRA merge writes into W.
    # In a child process, because the regression is a segfault, not an exception.
    code = (
        "import sys, torch\n"
        "from ondevice_lora.base import load_base\n"
        "model = load_base(sys.argv[1]).model\n"
        "with torch.no_grad():\n"
        "    for p in model.parameters(): p.add_(1.0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tiny_gguf_factory("llama"))], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_quantised_case_stores_q8_0(tiny_gguf_factory):
    import gguf

    variant, quantized = CASES["q8_0"]
    reader = gguf.GGUFReader(str(tiny_gguf_factory(variant, quantized)))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {name: types[name] for name in quantized} == {name: "Q8_0" for name in quantized}
    assert types["blk.0.ffn_down.weight"] == "F32"
