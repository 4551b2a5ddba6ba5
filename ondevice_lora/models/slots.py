"""Adapter slots in the model: the one graph change every exporter captures.

The layout (groups, shapes, which rows belong to which member) is `formats.slots.SlotSpec`'s;
this module builds it on our PyTorch model: `SlottedModel` wraps a model so that every slotted
linear computes `y = W x + B_slot (A_slot x)` from runtime-provided slot tensors, and
`slot_tensors` lays an adapter's factors into them. Per layer, members of a group (q, k, v read
the same input) share one A-matmul and do one B-matmul each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..errors import OdloraError
from ..formats.slots import DEFAULT_MAX_RANK, PROJECTIONS, SlotSpec
from .rewrite import replace_linears

if TYPE_CHECKING:
    from ..adapter import Adapter

# Where each projection sits in a Llama-style decoder layer.
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def projection_name(layer: int, projection: str) -> str:
    """The full module name of a slotted projection (`model.layers.3.self_attn.q_proj`)."""
    return f"model.layers.{layer}.{PARENT[projection]}.{projection}"


def spec_for_model(model: nn.Module, targets=PROJECTIONS, max_rank: int = DEFAULT_MAX_RANK) -> SlotSpec:
    """The slots of `targets` on `model`, their features read off its first layer."""
    layer0 = model.model.layers[0]
    linears = {t: getattr(getattr(layer0, PARENT[t]), t) for t in PROJECTIONS}
    features = {t: [linear.in_features, linear.out_features] for t, linear in linears.items()}
    return SlotSpec.create(features, len(model.model.layers), targets, max_rank)


def zero_slots(spec: SlotSpec) -> dict[str, torch.Tensor]:
    """Slot tensors of no adapter: the exported graph then computes exactly the base."""
    return {name: torch.zeros(shape) for name, shape in spec.layout().items()}


def per_layer(slots: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Stacked slot tensors -> an export's per-layer inputs (`SlotSpec.per_layer_names`), as views."""
    stacked = list(slots.values())
    return [t[layer] for layer in range(stacked[0].shape[0]) for t in stacked]


def slot_tensors(adapter: "Adapter", spec: SlotSpec) -> dict[str, torch.Tensor]:
    """Lay an adapter's factors into the slot tensors: zero-padded to R, scale folded into B.

    Raises OdloraError when the adapter does not fit: a rank above R, a module outside the
    slots, or a shape that is not the base's.
    """
    if adapter.rank > spec.max_rank:
        raise OdloraError(f"adapter rank {adapter.rank} exceeds the export's maximum slot rank {spec.max_rank}")
    slots = zero_slots(spec)
    placed = set()
    for group, members in spec.groups().items():
        A, B = slots[f"lora_A_{group}"], slots[f"lora_B_{group}"]
        for m_index, (member, out_offset) in enumerate(zip(members, spec.out_offsets(group))):
            in_f, out_f = spec.features[member]
            for layer in range(spec.n_layers):
                name = projection_name(layer, member)
                if name not in adapter.A:
                    continue
                a, b = adapter.A[name], adapter.B[name]
                if a.shape[1] != in_f or b.shape[0] != out_f:
                    raise OdloraError(f"adapter module {name} is {b.shape[0]}x{a.shape[1]}, the base's is {out_f}x{in_f}")
                r = a.shape[0]
                A[layer, spec.rows(m_index, count=r)] = a
                B[layer, out_offset: out_offset + out_f, :r] = b * adapter.scalings[name]
                placed.add(name)
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

    def __init__(self, base_layer: nn.Module, group: SlotGroup, rank_slice: slice, out_offset: int,
                 only_member: bool = False):
        super().__init__()
        self.base_layer, self.group = base_layer, group
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank_slice = rank_slice
        self.out_slice = slice(out_offset, out_offset + base_layer.out_features)
        # A group's only member uses all of A's product and of B: no slices, which an exported
        # graph would run (a copy of B) on every call.
        self.only_member = only_member

    def forward(self, x):
        if self.only_member:
            return self.base_layer(x) + self.group.down(x) @ self.group.B.t()
        u = self.group.down(x)[..., self.rank_slice]  # (..., R)
        return self.base_layer(x) + u @ self.group.B[self.out_slice].t()


def apply_slots(model: nn.Module, spec: SlotSpec) -> list[dict[str, SlotGroup]]:
    """Replace every slotted linear by a SlotLinear; returns per layer its groups by name."""
    per_layer = []
    for layer in range(spec.n_layers):
        groups = {}
        for group_name, members in spec.groups().items():
            group = groups[group_name] = SlotGroup()
            place = {projection_name(layer, member): (spec.rows(index), offset)
                     for index, (member, offset) in enumerate(zip(members, spec.out_offsets(group_name)))}
            replace_linears(model, place, lambda name, linear: SlotLinear(linear, group, *place[name],
                                                                          only_member=len(members) == 1))
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
