"""LoRA layers and their injection into a model (Hu et al., 2021).

A frozen linear `W` (out x in) gains a low-rank update:

    y = W x + s * B (A dropout(x)),   A: (r, in) random,  B: (out, r) zero,  s = alpha / r

(rsLoRA: s = alpha / sqrt(r)). B starts at zero, so step zero is exactly the base. Only A and B
train (the settings, LoraConfig, are in `config.py`). Model files know nothing of LoRA: `apply_lora` walks the model afterwards and wraps the
matching linears in `LoRALinear`, whose submodule names (`base_layer`, `lora_A`, `lora_B`) are
PEFT's, so adapter keys match PEFT's on disk.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoraConfig
from .errors import OdloraError
from .models.rewrite import replace_linears


def factor_of(parameter: str) -> tuple[str, str]:
    """A LoRA parameter's module and factor:
    `model.model.layers.0.self_attn.q_proj.lora_A.weight` -> (`model.layers.0.self_attn.q_proj`, `A`)."""
    stem = parameter.removeprefix("model.").removesuffix(".weight")
    module, _, factor = stem.rpartition(".lora_")
    return module, factor


def match_targets(model: nn.Module, targets, layers=None) -> list[str]:
    """The full names of the modules LoRA will wrap: every linear inside `model.layers.N.` whose
    last name component is in `targets`, and whose layer N is in `layers` (all when None).
    This is the one place that decides what is adapted; `odlora personalize --dry-run` prints it.
    """
    names = []
    for name, module in model.named_modules():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if not layer or name.rsplit(".", 1)[-1] not in targets:
            continue
        if layers is not None and int(layer[1]) not in layers:
            continue
        if hasattr(module, "in_features") and not isinstance(module, LoRALinear):
            names.append(name)
    if not names:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if n.startswith("model.layers.") and hasattr(m, "in_features")})
        raise OdloraError(f"{','.join(targets)} match no linear layer of this model "
                          f"(its layers' linears: {', '.join(linears)})", param="targets")
    return names


class LoRALinear(nn.Module):
    """A frozen `base_layer` (nn.Linear or a quantised linear) plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Module, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False)
        # As the paper and PEFT: A ~ Kaiming-uniform, B = 0, so the update starts at zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Mixed precision as autocast does it: the small factors are cast to the activations'
        # dtype (bf16 while training fast), never the large activations to the factors' fp32;
        # A and B themselves, their gradients and the optimiser state stay fp32.
        # The scale goes on B (out x r), not on the update (tokens x out): one large multiply less
        # per layer each way, and for the usual alpha = 2r (a power of two) exactly the same numbers.
        a, b = self.lora_A.weight.to(x.dtype), (self.lora_B.weight * self.scaling).to(x.dtype)
        y = self.base_layer(x)
        xa = F.linear(self.lora_dropout(x), a)
        # y + xa Bᵀ as one addmm: the GEMM adds into y while it accumulates, instead of writing
        # a (tokens x out) update and reading it back for the add.
        return torch.addmm(y.reshape(-1, self.out_features), xa.reshape(-1, self.rank), b.t()).view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A in fp32 (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze `model` and wrap each target linear in a `LoRALinear`; returns the wrapped names."""
    model.requires_grad_(False)
    return replace_linears(model, match_targets(model, config.targets, config.layers),
                           lambda _, linear: LoRALinear(linear, config.rank, config.scaling, config.dropout))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the plain base layers back (the LoRA update is dropped, not merged)."""
    replace_linears(model, lora_layers(model), lambda _, lora: lora.base_layer)
    return model
