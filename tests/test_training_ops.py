"""The lean training autograd functions: same forward, same gradients, fewer saved bytes."""

import pytest
import torch
import torch.nn.functional as F

from ondevice_lora.base import load_base
from ondevice_lora.config import LoraConfig
from ondevice_lora.lora import apply_lora, lora_layers
from ondevice_lora.models import llama
from ondevice_lora.models.llama import rotate_half
from ondevice_lora.models.training_ops import (RMSNormFunction, RopeFunction, SwiGLUFunction, TrainingAttention,
                                               TrainingMLP, TrainingRMSNorm, use_training_ops)
from ondevice_lora.train import TorchEngine


def plain_rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(T, hd):
    angles = torch.randn(1, 1, T, hd // 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def cases():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16) * 3
    cos, sin = rope_tables(5, 16)
    return {
        "rms_norm": (lambda x, w: RMSNormFunction.apply(x, w, 1e-5), lambda x, w: plain_rms_norm(x, w, 1e-5),
                     (x, torch.rand(16) + 0.5)),
        "rope": (lambda x: RopeFunction.apply(x, cos, sin), lambda x: x * cos + rotate_half(x) * sin, (x,)),
        "swiglu": (SwiGLUFunction.apply, lambda g, u: F.silu(g) * u, (x, torch.randn_like(x))),
    }


@pytest.mark.parametrize("name", ["rms_norm", "rope", "swiglu"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_forward_is_identical_and_gradients_match_autograd(name, dtype, tolerance):
    lean, plain, inputs = cases()[name]
    ours = [t.to(dtype).requires_grad_() for t in inputs]
    theirs = [t.to(dtype).requires_grad_() for t in inputs]
    out, ref = lean(*ours), plain(*theirs)
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(ours, theirs):
        scale = b.grad.float().abs().max()
        assert (a.grad.float() - b.grad.float()).abs().max() <= tolerance * scale


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward pass while running fn()."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def lora_model(tiny_llama_dir):
    torch.manual_seed(0)
    model = load_base(str(tiny_llama_dir)).model.to(torch.bfloat16)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    for layer in lora_layers(model).values():  # B = 0 at init; make the update non-trivial
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    return model.train()


@pytest.mark.parametrize("packed", [True, False])
def test_a_training_step_keeps_less_and_gives_the_same_loss_and_lora_gradients(tiny_llama_dir, packed):
    lean, plain = use_training_ops(lora_model(tiny_llama_dir)), lora_model(tiny_llama_dir)
    tokens = torch.randint(0, 64, (2, 24))
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 24]) if packed else None

    def step(model):
        model.zero_grad(set_to_none=True)
        loss = model.hidden_states(tokens, segment_ids=segments).float().pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    lean_bytes = saved_bytes(lambda: step(lean))
    lean_loss, lean_grads = step(lean)
    plain_bytes = saved_bytes(lambda: step(plain))
    plain_loss, plain_grads = step(plain)

    assert torch.equal(lean_loss, plain_loss)  # forward passes are bit-identical
    for name, grad in plain_grads.items():
        assert (lean_grads[name] - grad).abs().max() <= 0.05 * grad.abs().max(), name
    assert lean_bytes < 0.85 * plain_bytes  # 0.78 on this tiny model


def test_cached_decoding_with_the_training_ops_matches_the_plain_model(tiny_llama_dir):
    """Nothing decodes with a training model today, but if a caller does, the answers hold."""
    lean, plain = use_training_ops(lora_model(tiny_llama_dir).eval()), lora_model(tiny_llama_dir).eval()
    prompt, next_token = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 1))

    def prefill_and_decode(model):
        model.setup_cache(max_batch=1, max_seq_len=16, dtype=torch.bfloat16)
        first = model(prompt, input_pos=torch.arange(6))
        return first, model(next_token, input_pos=torch.tensor([6]))

    recorded = prefill_and_decode(lean)
    with torch.no_grad():
        expected = prefill_and_decode(plain)
    for a, b in zip(recorded, expected):
        assert (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max()


def module_classes(model) -> set:
    return {type(m) for m in model.modules()} & {llama.RMSNorm, llama.Attention, llama.MLP, TrainingRMSNorm,
                                                 TrainingAttention, TrainingMLP}


def test_eager_torch_training_takes_the_training_ops_and_everything_else_the_plain_ones(tiny_llama_dir, monkeypatch):
    """A loaded model (what inference and export take) and a compiled one keep llama.py's classes;
    the eager engine swaps them."""
    model = lora_model(tiny_llama_dir)
    assert module_classes(model) == {llama.RMSNorm, llama.Attention, llama.MLP}
    keys = list(model.state_dict())
    TorchEngine(model)
    assert module_classes(model) == {TrainingRMSNorm, TrainingAttention, TrainingMLP}
    assert list(model.state_dict()) == keys  # same modules and parameters: checkpoints and factors read the same

    monkeypatch.setattr("ondevice_lora.train.find_cxx_compiler", lambda: "c++")  # torch.compile is lazy: nothing runs
    compiled = lora_model(tiny_llama_dir)
    TorchEngine(compiled, compile=True)
    assert module_classes(compiled) == {llama.RMSNorm, llama.Attention, llama.MLP}


def test_a_rewritten_module_is_left_alone(tiny_llama_dir):
    class Rewritten(llama.Attention):  # as an exporter's rewrite subclasses the plain class
        pass

    model = lora_model(tiny_llama_dir)
    model.model.layers[0].self_attn.__class__ = Rewritten
    use_training_ops(model)
    assert type(model.model.layers[0].self_attn) is Rewritten
    assert type(model.model.layers[1].self_attn) is TrainingAttention
