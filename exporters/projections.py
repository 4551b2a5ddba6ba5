"""The decoder's linears and adapter slots as every exporter writes them: each group of projections
that reads one input is one linear with one slot path.

    y = x Wᵀ (+ b) + (x @ AT) @ BT          W: the members' weights side by side (q|k|v, gate|up, o, down)

AT `(in, m·r)` and BT `(m·r, width)` are graph inputs per layer and group (`lora_AT_<group>.<layer>`,
`lora_BT_<group>.<layer>`), fed by the runtime already transposed (`runtime/adapters.py`): member j of
the group's slotted members owns AT's columns j·r .. j·r + r (its Aᵀ) and BT's rows j·r .. j·r + r,
non-zero only in its own output columns (its Bᵀ, scale folded in; `slot_feed` in the manifest gives
each member's first column). A member without a slot (outside the export's targets) is in W but
never in AT/BT. ONNX takes r as a dynamic dimension, each layer and group at the adapter's own rank
(rank 0 is the base); ExecuTorch's static shapes take r = R, zero-padded, and batches of one
(`example_slot_tensors`). (The factors on the left of the products instead, `(B (A xᵀ))ᵀ`, which
XNNPACK would not repack per call, measured no faster: its f32 GEMM pads the one-column operand.)

Why this shape (the default base, 2 threads, one decode step): in ONNX (int4,
`bench/bench_onnx_decode.py`) a slot path per member with fixed-rank inputs sliced and transposed in
the graph was ~1,200 of the graph's ~2,000 nodes and 3 ms of an 11 ms step; two MatMuls per group on
pre-transposed inputs at the adapter's own rank cost ~1 ms at rank 8. In ExecuTorch (8da4w) the
fused graph lowers 714 XNNPACK ops per six layers where a linear and a slot path per member took
1,008, and exports in 5:30 instead of 8:40. The same projections with no slots are what
`fuse_projections(model, None)` builds.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats.slots import GROUPS, SlotSpec

# Which module of a decoder layer holds each group's members.
GROUP_PARENT = {"qkv": "self_attn", "o": "self_attn", "gate_up": "mlp", "down": "mlp"}


class SlottedProjection(nn.Module):
    """The members of one group as one linear, plus the group's slot path when the export has one.

    `slot` holds this call's (AT, BT) graph inputs, set by the export wrapper before each forward.
    """

    def __init__(self, linears: list[nn.Linear], slotted: bool):
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        biases = [linear.bias for linear in linears]
        has_bias = any(b is not None for b in biases)
        # An nn.Linear (not a bare weight): a quantiser that replaces linears (torchao) finds it.
        self.linear = nn.Linear(linears[0].in_features, sum(self.sizes), bias=has_bias)
        self.linear.weight.data = torch.cat([linear.weight.detach() for linear in linears])
        if has_bias:
            self.linear.bias.data = torch.cat([b.detach() if b is not None else torch.zeros(n)
                                               for b, n in zip(biases, self.sizes)])
        self.linear.requires_grad_(False)
        self.slotted = slotted
        self.slot: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def forward(self, x):
        y = self.linear(x)  # (B, T, width)
        if self.slot is not None:
            AT, BT = self.slot  # (in, m·r), (m·r, width); ExecuTorch: (1, in, m·R), (1, m·R, width)
            y = y + (x @ AT) @ BT
        return y


def fuse_projections(model: nn.Module, spec: Optional[SlotSpec]) -> list[dict[str, SlottedProjection]]:
    """Give every decoder layer `self_attn.qkv`, `self_attn.o`, `mlp.gate_up` and `mlp.down` (the
    fused members, slotted where `spec` has the group; `spec=None`: no slots) and drop the member
    linears. Returns each layer's projections by group name. The attention and MLP forwards that
    use them are the exporter's (`exporters/onnx.py`)."""
    slotted = spec.groups() if spec is not None else {}
    per_layer = []
    for layer in model.model.layers:
        projections = {}
        for group, members in GROUPS.items():
            parent = getattr(layer, GROUP_PARENT[group])
            projections[group] = SlottedProjection([getattr(parent, m) for m in members], group in slotted)
            for m in members:
                delattr(parent, m)
            setattr(parent, group, projections[group])
        per_layer.append(projections)
    return per_layer


def slot_feed(projections: dict[str, SlottedProjection], spec: SlotSpec) -> dict:
    """The manifest's `slot_feed`, from one layer's projections: per slotted group its fused width
    and its slotted members' first output columns, in AT/BT order (what the runtime needs to lay an
    adapter into the graph's inputs)."""
    feed = {}
    for group, members in spec.groups().items():
        sizes = projections[group].sizes
        starts = dict(zip(GROUPS[group], [sum(sizes[:i]) for i in range(len(sizes))]))
        feed[group] = {"width": sum(sizes), "columns": {m: starts[m] for m in members}}
    return feed


def slot_input_names(spec: SlotSpec) -> list[str]:
    """The graph's slot inputs, layer-major: `lora_AT_<group>.<layer>`, `lora_BT_<group>.<layer>`."""
    return [f"lora_{factor}_{group}.{layer}" for layer in range(spec.n_layers) for group in spec.groups()
            for factor in ("AT", "BT")]


def slotted_projections(per_layer: list[dict[str, SlottedProjection]]) -> list[SlottedProjection]:
    """The slotted projections in the graph's slot-input order (`slot_input_names`: layer-major)."""
    return [p for layer in per_layer for p in layer.values() if p.slotted]


def example_slot_tensors(per_layer: list[dict[str, SlottedProjection]], spec: SlotSpec) -> list[torch.Tensor]:
    """Zero AT/BT inputs at the export's rank R, in `slot_input_names` order (no adapter: the base),
    as batches of one, (1, in, m·R) and (1, m·R, width): ExecuTorch's XNNPACK multiplies them as
    they come, where a 2-D input would be reshaped, which XNNPACK runs as a copy per call."""
    return [t for p, members in zip(slotted_projections(per_layer), per_layer_members(spec))
            for t in (torch.zeros(1, p.in_features, members * spec.max_rank),
                      torch.zeros(1, members * spec.max_rank, p.out_features))]


def per_layer_members(spec: SlotSpec) -> list[int]:
    """Each slotted group's member count, in `slot_input_names` order."""
    return [len(members) for _ in range(spec.n_layers) for members in spec.groups().values()]
