"""Weight-only quantisation of the frozen base for training (QLoRA-style) and CPU inference.

The base never trains, so its linears only need `y = x Wᵀ` forward and `dx = dy W` backward.

- `int8`: symmetric, one scale per output channel.
- `int4`: asymmetric, one scale and zero per group of 32 inputs (like GGUF's Q4_1).

Decoding (a few rows, no gradients) runs PyTorch's packed CPU kernels (bf16); training dequantises
each layer to the compute dtype (bf16 or fp32, see devices.py) just for its matmul
(`_DequantizedMatMul`).

Embeddings, norms and the LM head stay in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import BASE_QUANTS
from .errors import OdloraError
from .models.rewrite import replace_linears

INT4_GROUP = 32
DECODE_ROWS = 16  # up to this many rows (tokens) the packed kernels beat dequantise + GEMM


class _DequantizedMatMul(torch.autograd.Function):
    """y = x Wᵀ with W dequantised to x's dtype for this call only, and dx = dy W likewise.

    QLoRA's recipe: at training batch sizes (hundreds of rows) dequantising a layer costs a
    few percent of its matmul, and the bf16 GEMM beats the packed kernels, which are built for
    the few rows of decoding. Only the packed weight stays resident.
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize(grad.dtype), None


class QuantLinear(nn.Module):
    """Common shape handling: flatten to 2-D in the compute dtype, run the kernel, restore shape
    and dtype. Decoding's packed kernels take bf16; training's matmuls run in `dtype`."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        decoding = x2.shape[0] <= DECODE_ROWS and not torch.is_grad_enabled()
        if decoding:
            y = self.packed_matmul(x2.to(torch.bfloat16)).to(self.dtype)
        else:
            y = _DequantizedMatMul.apply(x2, self)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8Linear(QuantLinear):
    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__(linear, dtype)
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(torch.bfloat16))

    def packed_matmul(self, x):
        return torch._weight_int8pack_mm(x, self.qweight, self.scales)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        # Straight to the compute dtype: |q| <= 127 is exact in bf16, and a bf16 multiply is computed
        # in fp32 and rounded once, so this is bit-identical to dequantising in fp32 with one pass less.
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]


class Int4Linear(QuantLinear):
    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__(linear, dtype)
        w = linear.weight.detach().float()
        n, k = w.shape
        if k % INT4_GROUP:
            raise OdloraError(f"int4 needs in_features divisible by {INT4_GROUP}, got {k}")
        groups = w.view(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scales = ((high - low) / 15).clamp(min=1e-8)  # (n, k/g)
        q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
        self.register_buffer("nibbles", q[:, 0::2] | (q[:, 1::2] << 4))  # our own (n, k/2) copy
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("zeros", low.to(torch.bfloat16))
        # PyTorch's CPU kernel computes (q - 8) * scale + zero', so zero' = low + 8 * scale.
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 8))
        sz = torch.stack([scales.t(), (low + 8 * scales).t()], dim=-1)  # (k/g, n, 2)
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16).contiguous())

    def packed_matmul(self, x):
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.scales_and_zeros)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        n = self.out_features
        q = torch.stack([self.nibbles & 0xF, self.nibbles >> 4], dim=-1).view(n, -1, INT4_GROUP).float()
        w = q * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.view(n, -1).to(dtype)


QUANTISERS = {"int8": Int8Linear, "int4": Int4Linear}


def quantize_base(model: nn.Module, quant: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast the frozen base to `dtype` and replace its decoder linears by `quant` versions."""
    if quant not in BASE_QUANTS:
        raise OdloraError(f"{quant!r} is not one of {', '.join(BASE_QUANTS)}", param="base_quant")
    model.to(dtype)
    if quant == "none":
        return model
    linears = [name for name, module in model.named_modules() if name.startswith("model.layers.") and type(module) is nn.Linear]
    replace_linears(model, linears, lambda _, linear: QUANTISERS[quant](linear, dtype))
    return model
