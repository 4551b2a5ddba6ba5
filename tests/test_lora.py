"""LoRA layers, target matching, quantised frozen bases: table-driven on tiny models."""

import math

import pytest
import torch
from torch import nn

from ondevice_lora.base import load_base
from ondevice_lora.errors import OdloraError
from ondevice_lora.config import TARGET_PRESETS, LoraConfig, parse_layers, parse_targets
from ondevice_lora.lora import LoRALinear, apply_lora, lora_layers, match_targets
from ondevice_lora.quant import Int4Linear, Int8Linear, quantize_base


@pytest.mark.parametrize("spec, n_layers, expected", [
    ("all", 30, None),
    ("middle", 30, tuple(range(10, 20))),
    ("3-5", 30, (3, 4, 5)),
    ("0,7", 30, (0, 7)),
])
def test_parse_layers(spec, n_layers, expected):
    assert parse_layers(spec, n_layers) == expected


@pytest.mark.parametrize("spec", ["31", "4-40", "x"])
def test_parse_layers_rejects(spec):
    with pytest.raises(OdloraError, match="^layers: "):
        parse_layers(spec, 30)


@pytest.mark.parametrize("spec, expected", [
    ("qv", ("q_proj", "v_proj")),
    ("all-linear", TARGET_PRESETS["all-linear"]),
    ("q_proj, down_proj", ("q_proj", "down_proj")),
])
def test_parse_targets(spec, expected):
    assert parse_targets(spec) == expected


@pytest.mark.parametrize("targets, layers, count", [
    (TARGET_PRESETS["qv"], None, 4),
    (TARGET_PRESETS["attn"], None, 8),
    (TARGET_PRESETS["all-linear"], None, 14),
    (TARGET_PRESETS["all-linear"], (1,), 7),
])
def test_match_targets(tiny_llama_dir, targets, layers, count):
    model = load_base(str(tiny_llama_dir)).model
    names = match_targets(model, targets, layers)
    assert len(names) == count
    assert all(name.rsplit(".", 1)[1] in targets for name in names)


def test_targets_matching_nothing_is_an_error(tiny_llama_dir):
    with pytest.raises(OdloraError, match="match no linear"):
        match_targets(load_base(str(tiny_llama_dir)).model, ("c_attn",))


@pytest.mark.parametrize("rank", [0, -2])
def test_rank_must_be_positive(rank):
    with pytest.raises(OdloraError, match="^rank: "):
        LoraConfig(rank=rank)


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling(use_rslora, expected):
    assert LoraConfig(rank=4, alpha=16, use_rslora=use_rslora).scaling == expected


def test_lora_starts_as_the_base_and_only_a_b_train(tiny_model_dir):
    model = load_base(str(tiny_model_dir)).model
    tokens = torch.randint(0, 300, (2, 12))
    before = model(tokens)
    apply_lora(model, LoraConfig(rank=4))
    assert torch.equal(model(tokens), before)  # B = 0: step zero is exactly the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_lora_forward_is_the_low_rank_update():
    base = nn.Linear(16, 24)
    layer = LoRALinear(base, rank=3, scaling=2.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)
    expected = base(x) + 2.0 * x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B.weight @ layer.lora_A.weight)


@pytest.mark.parametrize("quantiser, tolerance", [(Int8Linear, 0.02), (Int4Linear, 0.15)])
def test_quantised_linear_forward_and_input_gradient(quantiser, tolerance):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = quantiser(linear)
    x = torch.randn(40, 64, requires_grad=True)
    y = q(x)
    assert (y - linear(x)).abs().max() / linear(x).abs().max() < tolerance
    # Backward must be exactly dy @ W for the weights the layer really holds.
    grad = torch.randn_like(y)
    y.backward(grad)
    reference = grad.bfloat16().float() @ q.dequantize().float()
    assert (x.grad - reference).abs().max() / reference.abs().max() < 0.02


@pytest.mark.parametrize("quantiser", [Int8Linear, Int4Linear])
def test_decode_kernel_matches_dequantised_matmul(quantiser):
    torch.manual_seed(0)
    q = quantiser(nn.Linear(64, 48, bias=False))
    x = torch.randn(1, 64)
    with torch.no_grad():
        packed = q(x)  # few rows, no grad: the packed CPU kernel
    reference = x.bfloat16().float() @ q.dequantize().float().t()
    assert (packed - reference).abs().max() / reference.abs().max() < 0.02


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_lora_trains_on_a_quantised_base(tiny_llama_dir, quant):
    torch.manual_seed(0)
    model = quantize_base(load_base(str(tiny_llama_dir)).model, quant)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    frozen = {n: b.clone() for n, b in model.named_buffers() if "weight" in n}
    tokens = torch.randint(0, 300, (2, 16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(tokens[:, :-1]).float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)
    assert len(lora_layers(model)) == 14


@pytest.mark.parametrize("quantiser", [Int8Linear, Int4Linear])
def test_quantised_linear_trains_in_the_compute_dtype(quantiser):
    """In fp32 (devices.py's choice on CPUs without native bf16) the training matmul is fp32 on the
    dequantised grid, not bf16."""
    torch.manual_seed(0)
    q = quantiser(torch.nn.Linear(64, 32), torch.float32)
    x = torch.randn(40, 64, requires_grad=True)  # more rows than decoding's packed kernels take
    y = q(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ q.dequantize(torch.float32).t() + q.bias, rtol=0, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(40, 32) @ q.dequantize(torch.float32), rtol=0, atol=1e-5)


@pytest.mark.parametrize("avx512_bf16, amx, machine, expected", [
    (False, False, "x86_64", "fp32"), (True, False, "x86_64", "bf16"), (False, True, "x86_64", "bf16"),
    (False, False, "aarch64", "bf16"),
])
def test_auto_compute_dtype_follows_the_cpu(monkeypatch, avx512_bf16, amx, machine, expected):
    from ondevice_lora import devices

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(devices.platform, "machine", lambda: machine)
    assert devices.resolve_compute_dtype("auto") == expected
    assert devices.resolve_compute_dtype("fp32") == "fp32" and devices.resolve_compute_dtype("bf16") == "bf16"
