"""Our model against transformers (the oracle) on every tiny configuration, fp32.

Each test runs over every entry of `TINY_VARIANTS` (conftest) through the `tiny_model_dir`
fixture: Llama (untied, tied, Llama 3 RoPE scaling, attention bias), Qwen2, Qwen3.
"""

from __future__ import annotations

import pytest
import torch

from ondevice_lora.base import load_base
from ondevice_lora.models.llama import ModelArgs

ATOL = 1e-4
B, T = 2, 16


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def random_tokens(vocab_size: int, shape=(B, T), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ours(tiny_model_dir):
    return load_base(str(tiny_model_dir)).model


@torch.no_grad()
def test_logits_match_transformers(tiny_model_dir, ours):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    tokens = random_tokens(ours.args.vocab_size)
    expected = reference(tokens).logits
    assert expected.abs().max() > 0.5  # the weights are large enough for a mismatch to show
    assert max_diff(ours(tokens), expected) <= ATOL


@torch.no_grad()
def test_kv_cache_prefill_then_decode_equals_full_recompute(ours):
    tokens = random_tokens(ours.args.vocab_size)
    full = ours(tokens)
    prefill = 10
    ours.setup_cache(max_batch=B, max_seq_len=T)
    try:
        steps = [ours(tokens[:, :prefill], input_pos=torch.arange(prefill))]
        for pos in range(prefill, T):
            steps.append(ours(tokens[:, pos : pos + 1], input_pos=torch.tensor([pos])))
    finally:
        ours.drop_cache()
    assert max_diff(torch.cat(steps, dim=1), full) <= ATOL


@torch.no_grad()
def test_packed_segments_equal_separate_runs(ours):
    tokens = random_tokens(ours.args.vocab_size)
    split = [7, 11]  # where the second segment starts, per row
    segment_ids = torch.stack([(torch.arange(T) >= s).long() for s in split])
    packed = ours(tokens, segment_ids=segment_ids)
    for row, s in enumerate(split):
        first, second = tokens[row : row + 1, :s], tokens[row : row + 1, s:]
        assert max_diff(packed[row, :s], ours(first)[0]) <= ATOL
        assert max_diff(packed[row, s:], ours(second)[0]) <= ATOL


@torch.no_grad()
def test_torch_export_captures_cached_decode(ours):
    tokens = random_tokens(ours.args.vocab_size, shape=(1, 8))
    full = ours(tokens)
    ours.setup_cache(max_batch=1, max_seq_len=8)
    try:
        program = torch.export.export(ours, (tokens[:, :1],), {"input_pos": torch.tensor([0])})
    finally:
        ours.drop_cache()
    exported = program.module()
    steps = [exported(tokens[:, p : p + 1], input_pos=torch.tensor([p])) for p in range(tokens.shape[1])]
    assert max_diff(torch.cat(steps, dim=1), full) <= ATOL


HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 10,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
}


@pytest.mark.parametrize(
    "change,named",
    [
        ({"model_type": "gpt2"}, "gpt2"),
        ({"model_type": None}, "None"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
        ({"rope_scaling": {"type": "longrope"}}, "longrope"),  # transformers v4 spelling
    ],
)
def test_from_hf_config_rejects_unsupported(change, named):
    with pytest.raises(ValueError, match=named):
        ModelArgs.from_hf_config({**HF_CONFIG, **change})


@pytest.mark.parametrize(
    "change,field,value",
    [
        ({}, "n_kv_heads", 2),  # no num_key_value_heads: plain multi-head attention
        ({}, "head_dim", 4),
        ({"rope_theta": 5e5}, "rope_theta", 5e5),  # v4 spelling
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "rope_theta", 5e5),  # v5
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ({"attention_bias": True}, "o_bias", True),
        ({"model_type": "qwen2"}, "qkv_bias", True),
        ({"model_type": "qwen3"}, "qk_norm", True),
    ],
)
def test_from_hf_config_maps_fields(change, field, value):
    assert getattr(ModelArgs.from_hf_config({**HF_CONFIG, **change}), field) == value


def test_sharded_checkpoint_loads_like_the_single_file(tiny_llama_dir, tmp_path):
    """A checkpoint split over several safetensors files with an index loads the same weights."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).save_pretrained(str(tmp_path), max_shard_size="100KB")
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    single, sharded = load_base(str(tiny_llama_dir)), load_base(str(tmp_path))
    assert sharded.fingerprint == single.fingerprint
    tokens = torch.randint(0, 300, (1, 8))
    assert torch.equal(sharded.model(tokens), single.model(tokens))
