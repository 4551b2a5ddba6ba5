"""LoRA layers and their injection into a model (Hu et al., 2021).

A frozen linear `W` (out x in) gains a low-rank update:

    y = W x + s * B (A dropout(x)),   A: (r, in) random,  B: (out, r) zero,  s = alpha / r

(rsLoRA: s = alpha / sqrt(r)). B starts at zero, so step zero is exactly the base. Only A and B
train. Model files know nothing of LoRA: `apply_lora` walks the model afterwards and wraps the
matching linears in `LoRALinear`, whose submodule names (`base_layer`, `lora_A`, `lora_B`) are
PEFT's, so adapter keys match PEFT's on disk.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bounds import ALPHA, DROPOUT, POSITIVE_INT, check_fields
from .errors import OdloraError
from .models.rewrite import replace_linears

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_PRESETS = {
    "qv": ("q_proj", "v_proj"),  # the paper's choice
    "attn": ATTENTION,
    "all-linear": ATTENTION + MLP,  # the default, as QLoRA found best
}


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: Optional[float] = None  # None: 2 x rank, the usual choice (16 at the default rank)
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGET_PRESETS["all-linear"]  # module name suffixes
    layers: Optional[tuple[int, ...]] = None  # None: every layer
    use_rslora: bool = False

    def __post_init__(self):
        # The rank has no upper bound here: blends stack ranks and PEFT adapters come from elsewhere.
        # What a user may ask to train is bounds.RANK, and capacity.check_rank holds it to the base.
        if self.alpha is None and isinstance(self.rank, int):
            self.alpha = 2.0 * self.rank
        check_fields(self, {"rank": POSITIVE_INT, "alpha": ALPHA, "dropout": DROPOUT})
        self.targets = tuple(self.targets)
        self.layers = tuple(self.layers) if self.layers is not None else None

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def to_dict(self) -> dict:
        return asdict(self)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def factor_of(parameter: str) -> tuple[str, str]:
    """A LoRA parameter's module and factor:
    `model.model.layers.0.self_attn.q_proj.lora_A.weight` -> (`model.layers.0.self_attn.q_proj`, `A`)."""
    stem = parameter.removeprefix("model.").removesuffix(".weight")
    module, _, factor = stem.rpartition(".lora_")
    return module, factor


def parse_targets(spec: str) -> tuple[str, ...]:
    """`qv`, `attn`, `all-linear`, or a comma-separated list of module names (`q_proj,v_proj`).
    Which names the base has is checked by `match_targets` once it is loaded."""
    if spec in TARGET_PRESETS:
        return TARGET_PRESETS[spec]
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    if not names:
        raise OdloraError(f"--targets: {spec!r} names no module (presets: {', '.join(TARGET_PRESETS)}, "
                          f"or module names such as q_proj,v_proj)")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
    if bad:
        raise OdloraError(f"--targets: {bad[0]!r} is not a module name (presets: {', '.join(TARGET_PRESETS)}, "
                          f"or module names such as q_proj,v_proj)")
    return names


LAYER_PRESETS = ("all", "middle")


def check_layers_spec(spec: Optional[str]) -> None:
    """The syntax of a --layers spec, before the base (and so its layer count) is known."""
    if spec not in (None, "", *LAYER_PRESETS):
        _listed_layers(spec)


def parse_layers(spec: Optional[str], n_layers: int) -> Optional[tuple[int, ...]]:
    """`None`/`all`, `middle` (the middle third), `A-B` (inclusive) or `i,j,k`."""
    if spec in (None, "", "all"):
        return None
    if spec == "middle":
        third = n_layers // 3
        return tuple(range(third, n_layers - third))
    layers = _listed_layers(spec)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise OdloraError(f"--layers: {spec!r}: layer {bad[0]} is outside 0-{n_layers - 1}")
    return layers


def _listed_layers(spec: str) -> tuple[int, ...]:
    """`A-B` (A <= B) or `i,j,k` as layer numbers."""
    if m := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", spec):
        if int(m[1]) > int(m[2]):
            raise OdloraError(f"--layers: {spec!r}: a range A-B needs A <= B")
        return tuple(range(int(m[1]), int(m[2]) + 1))
    if re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", spec):
        return tuple(int(i) for i in spec.split(","))
    raise OdloraError(f"--layers: {spec!r}: expected 'all', 'middle', 'A-B' or 'i,j,k' (layer numbers from 0)")


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
        raise OdloraError(f"--targets: {','.join(targets)} match no linear layer of this model "
                          f"(its layers' linears: {', '.join(linears)})")
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
