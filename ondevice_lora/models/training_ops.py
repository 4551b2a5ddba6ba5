"""RMSNorm, RoPE and SwiGLU as autograd functions that keep less for the backward pass.

PyTorch's autograd saves the inputs of every small op: RMSNorm's fp32 upcast and its square,
RoPE's rotated copies, SiLU's input and output. In a frozen-base LoRA run those saved
activations are most of the memory, and each extra pass over them costs time on a 2-core CPU.
Each function here saves only what its closed-form gradient needs (RMSNorm: the input and one
scale per token; RoPE: nothing but the tables; SwiGLU: its two inputs) and recomputes the rest,
as Unsloth's and Liger's kernels do. Forward results are bit-identical to the plain ops.
`grouped_attention` lays out grouped-query attention so that PyTorch's CPU flash kernel runs
fewer, longer problems.

`use_training_ops(model)` swaps them into a model built by `llama.py` for eager training on
PyTorch; a model that is exported or compiled keeps the plain ops, which all runtimes take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import llama
from .llama import apply_rope, rotate_half


def grouped_attention(q, k, v, mask):
    """Causal attention (under `mask` when given) with grouped-query heads, for training.

    q (B, n_heads, T, hd); k, v (B, n_kv_heads, S, hd); mask broadcastable to (B, 1, T, S), bool,
    or None for plain causal attention (then S == T).
    The query heads that share a KV head are folded into one long query sequence, so SDPA sees
    n_kv_heads problems of n_rep * T queries instead of n_heads problems of T queries, and no KV
    head is copied. Same result, and faster: at these sizes PyTorch's CPU flash attention costs
    about as much per (batch, head) problem as per FLOP (on SmolLM2's shapes, 16 rows of 64
    tokens take as long as 4 rows of 256).
    """
    B, n_heads, T, hd = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    n_rep = n_heads // n_kv
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    mask = mask.reshape(-1, 1, T, S).repeat(1, 1, n_rep, 1)  # (B or 1, 1, n_rep * T, S)
    y = F.scaled_dot_product_attention(q.reshape(B, n_kv, n_rep * T, hd), k, v, attn_mask=mask)
    return y.view(B, n_heads, T, hd)


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS(x) over the last dimension, in fp32 as the reference computes it."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


class RMSNormFunction(torch.autograd.Function):
    """weight * (x / RMS(x)), normalised in fp32 and cast back to x's dtype before the weight."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        scale = rms_scale(x, eps)
        ctx.save_for_backward(x, weight, scale)
        return weight * (x.float() * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        normed = x.float() * scale
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.float() * normed.to(x.dtype).float()).sum(tuple(range(grad.dim() - 1)))
            grad_weight = grad_weight.to(weight.dtype)
        # d/dx of x * r(x): r * (g - n * mean(g * n)), with g the gradient reaching the normed values.
        g = (grad * weight).float()
        grad_x = scale * (g - normed * (g * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RopeFunction(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin. A rotation: its gradient is the inverse rotation."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return apply_rope(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        # rotate_half is R = [[0, -I], [I, 0]], whose transpose is -R.
        return grad * cos - rotate_half(grad * sin), None, None


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, with SiLU recomputed in the backward pass instead of kept."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # The same kernels, in the same dtype, as autograd's own backward of silu(gate) * up.
        grad_up = grad * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


# -- the model's modules with these functions: same parameters, same forward results -------------

class TrainingRMSNorm(llama.RMSNorm):
    def forward(self, x):
        return RMSNormFunction.apply(x, self.weight, self.eps)


class TrainingAttention(llama.Attention):
    def rotate(self, x, cos, sin):
        return RopeFunction.apply(x, cos, sin)

    def attend(self, q, k, v, mask):
        return grouped_attention(q, k, v, mask)


class TrainingMLP(llama.MLP):
    def activate(self, gate, up):
        return SwiGLUFunction.apply(gate, up)


TRAINING_CLASSES = {llama.RMSNorm: TrainingRMSNorm, llama.Attention: TrainingAttention, llama.MLP: TrainingMLP}


def use_training_ops(model: nn.Module) -> nn.Module:
    """Give `model`'s norms, attention and MLPs the lean training functions, in place; returns it.

    Only a module of exactly the plain class is swapped: an exporter's rewrite (a subclass) is left alone.
    """
    for module in model.modules():
        if type(module) in TRAINING_CLASSES:
            module.__class__ = TRAINING_CLASSES[type(module)]
    return model
