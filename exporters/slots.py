"""Adapter slots: the one graph change every exporter shares.

Each slotted linear computes `y = W x + B_slot (A_slot x)` where A_slot and B_slot are
runtime-provided tensors of a fixed maximum rank R, zero-padded for smaller ranks, with the
adapter's scale folded into B. All-zero slots reproduce the base exactly, and one exported
base then accepts any adapter with rank <= R and targets inside the slots.

To keep the number of slot tensors and of dynamic-weight matmuls small, projections that read
the same input form a group and share one A-matmul:

    group    members               A input (L, m·R, in)     B input (L, Σ out, R)
    qkv      q_proj k_proj v_proj  lora_A_qkv               lora_B_qkv
    o        o_proj                lora_A_o                 lora_B_o
    gate_up  gate_proj up_proj     lora_A_gate_up           lora_B_gate_up
    down     down_proj             lora_A_down              lora_B_down

(L = layers.) Per layer that is one A-matmul per group and one B-matmul per member.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from ..adapter import Adapter
from ..errors import OdloraError
from ..lora import TARGET_PRESETS

GROUPS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass
class SlotSpec:
    """Which projections have slots, their maximum rank and the tensor layout (in manifests)."""

    targets: tuple[str, ...]
    max_rank: int
    n_layers: int
    features: dict  # projection -> [in_features, out_features]
    dtype: str = "float32"

    @classmethod
    def for_model(cls, model, targets=TARGET_PRESETS["all-linear"], max_rank: int = 16) -> "SlotSpec":
        if max_rank < 1:
            raise OdloraError(f"--max-rank must be >= 1, got {max_rank}")
        unknown = [t for t in targets if t not in PARENT]
        if unknown:
            raise OdloraError(f"--targets: {unknown[0]!r} is not a linear that takes adapter slots "
                              f"(choose from {', '.join(PARENT)})")
        layer0 = model.model.layers[0]
        features = {}
        for t in targets:
            linear = getattr(getattr(layer0, PARENT[t]), t)
            features[t] = [linear.in_features, linear.out_features]
        return cls(tuple(t for g in GROUPS.values() for t in g if t in targets), max_rank, len(model.model.layers), features)

    @classmethod
    def from_dict(cls, d: dict) -> "SlotSpec":
        """The spec of a manifest's `slots` (types checked by schemas.SlotLayout): every target a
        known projection with its features, in slot order, and the recorded layout the one they give."""
        unknown = [t for t in d["targets"] if t not in PARENT]
        if unknown:
            raise OdloraError(f"slot target {unknown[0]!r} is not one of {', '.join(PARENT)}")
        lacking = [t for t in d["targets"] if t not in d["features"]]
        if lacking:
            raise OdloraError(f"slot target {lacking[0]!r} has no features")
        targets = tuple(t for g in GROUPS.values() for t in g if t in d["targets"])
        spec = cls(targets, d["max_rank"], d["n_layers"], d["features"], d.get("dtype", "float32"))
        if targets != tuple(d["targets"]):
            raise OdloraError(f"targets {d['targets']} are not once each in slot order {list(targets)}")
        if "layout" in d and d["layout"] != spec.layout():
            raise OdloraError("layout does not match targets, features, max_rank and n_layers")
        return spec

    def to_dict(self) -> dict:
        return {**asdict(self), "layout": self.layout()}

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Group name -> its slotted members, in a fixed order."""
        out = {}
        for name, members in GROUPS.items():
            present = tuple(m for m in members if m in self.targets)
            if present:
                out[name] = present
        return out

    def layout(self) -> dict[str, list[int]]:
        """Input name -> shape, in the order the exported graphs take them."""
        shapes = {}
        for name, members in self.groups().items():
            in_features = self.features[members[0]][0]
            out_total = sum(self.features[m][1] for m in members)
            shapes[f"lora_A_{name}"] = [self.n_layers, len(members) * self.max_rank, in_features]
            shapes[f"lora_B_{name}"] = [self.n_layers, out_total, self.max_rank]
        return shapes

    def zeros(self) -> dict[str, torch.Tensor]:
        """Slot tensors of no adapter: the exported graph then computes exactly the base."""
        return {name: torch.zeros(shape) for name, shape in self.layout().items()}


def slot_tensors(adapter: Adapter, spec: SlotSpec) -> dict[str, torch.Tensor]:
    """Lay an adapter's factors into the slot tensors: zero-padded to R, scale folded into B.

    Raises OdloraError when the adapter does not fit: a rank above R, a module outside the
    slots, or a shape that is not the base's.
    """
    if adapter.rank > spec.max_rank:
        raise OdloraError(f"adapter rank {adapter.rank} exceeds the export's maximum slot rank {spec.max_rank}")
    slots = spec.zeros()
    placed = set()
    for group, members in spec.groups().items():
        A, B = slots[f"lora_A_{group}"], slots[f"lora_B_{group}"]
        out_offset = 0
        for m_index, member in enumerate(members):
            in_f, out_f = spec.features[member]
            for layer in range(spec.n_layers):
                name = f"model.layers.{layer}.{PARENT[member]}.{member}"
                if name not in adapter.A:
                    continue
                a, b = adapter.A[name], adapter.B[name]
                if a.shape[1] != in_f or b.shape[0] != out_f:
                    raise OdloraError(f"adapter module {name} is {b.shape[0]}x{a.shape[1]}, the base's is {out_f}x{in_f}")
                r = a.shape[0]
                A[layer, m_index * spec.max_rank: m_index * spec.max_rank + r] = a
                B[layer, out_offset: out_offset + out_f, :r] = b * adapter.scalings[name]
                placed.add(name)
            out_offset += out_f
    outside = sorted(set(adapter.A) - placed)
    if outside:
        raise OdloraError(f"adapter module {outside[0]} is outside the export's slots ({', '.join(spec.targets)})")
    return slots


class SlotGroup:
    """Per-layer state shared by a group's members: the layer's slice of A and B, and the
    cached A-product so that q, k and v (which read the same input) do one A-matmul."""

    def __init__(self):
        self.A: Optional[torch.Tensor] = None  # (m·R, in)
        self.B: Optional[torch.Tensor] = None  # (Σ out, R)
        self._x = self._u = None

    def set(self, A: Optional[torch.Tensor], B: Optional[torch.Tensor]):
        self.A, self.B, self._x, self._u = A, B, None, None

    def down(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x:  # the same tensor object: the group's other members
            self._x, self._u = x, x @ self.A.t()  # (..., m·R)
        return self._u


class SlotLinear(nn.Module):
    """`base_layer(x) + u_m @ B_mᵀ` with u_m this member's rank slice of the group's A-product."""

    def __init__(self, base_layer: nn.Module, group: SlotGroup, member: int, out_offset: int, rank: int):
        super().__init__()
        self.base_layer, self.group = base_layer, group
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank_slice = slice(member * rank, (member + 1) * rank)
        self.out_slice = slice(out_offset, out_offset + base_layer.out_features)

    def forward(self, x):
        u = self.group.down(x)[..., self.rank_slice]  # (..., R)
        return self.base_layer(x) + u @ self.group.B[self.out_slice].t()


def apply_slots(model: nn.Module, spec: SlotSpec) -> list[dict[str, SlotGroup]]:
    """Replace every slotted linear by a SlotLinear; returns per layer its groups by name."""
    per_layer = []
    for layer in model.model.layers:
        groups = {}
        for group_name, members in spec.groups().items():
            group, offset = SlotGroup(), 0
            for index, member in enumerate(members):
                parent = getattr(layer, PARENT[member])
                linear = getattr(parent, member)
                setattr(parent, member, SlotLinear(linear, group, index, offset, spec.max_rank))
                offset += linear.out_features
            groups[group_name] = group
        per_layer.append(groups)
    return per_layer


class SlottedModel(nn.Module):
    """The export wrapper: `forward(tokens, input_pos, *slot_tensors)` in `spec.layout()` order,
    feeding each layer its slice of the slot tensors before running the model."""

    def __init__(self, model: nn.Module, spec: SlotSpec):
        super().__init__()
        self.model, self.spec = model, spec
        self.groups = apply_slots(model, spec)
        self.slot_names = list(spec.layout())

    def set_slots(self, slots) -> None:
        named = dict(zip(self.slot_names, slots))
        for layer, groups in enumerate(self.groups):
            for name, group in groups.items():
                group.set(named[f"lora_A_{name}"][layer], named[f"lora_B_{name}"][layer])

    def forward(self, tokens, input_pos, *slots):
        self.set_slots(slots)
        logits = self.model(tokens, input_pos=input_pos)
        for groups in self.groups:  # drop references to this call's tensors
            for group in groups.values():
                group.set(None, None)
        return logits
