"""The adapter-slot layout: the one contract between exporters, packers and every runtime.

Each slotted linear of an export computes `y = W x + B_slot (A_slot x)` where A_slot and B_slot
are runtime-provided tensors of a fixed maximum rank R, zero-padded for smaller ranks, with the
adapter's scale folded into B. All-zero slots reproduce the base exactly, and one exported base
then accepts any adapter with rank <= R and targets inside the slots.

Projections that read the same input form a group and share one A-matmul:

    group    members               A input (L, m·R, in)     B input (L, Σ out, R)
    qkv      q_proj k_proj v_proj  lora_A_qkv               lora_B_qkv
    o        o_proj                lora_A_o                 lora_B_o
    gate_up  gate_proj up_proj     lora_A_gate_up           lora_B_gate_up
    down     down_proj             lora_A_down              lora_B_down

(L = layers.) Member m of a group owns A's rows m·R .. m·R + R and B's rows at its output offset
(the members' out_features before it). `docs/formats.md` documents the same for C++ and Swift.

This module imports no tensor library: the tensor methods it calls (`abs`, `amax`, `new_zeros`)
are those of the torch tensors the callers pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import OdloraError

GROUPS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
PROJECTIONS = tuple(p for members in GROUPS.values() for p in members)  # every linear that takes slots
DEFAULT_MAX_RANK = 16


@dataclass
class SlotSpec:
    """Which projections have slots, their maximum rank and the tensor layout (in manifests)."""

    targets: tuple[str, ...]
    max_rank: int
    n_layers: int
    features: dict  # projection -> [in_features, out_features]
    dtype: str = "float32"

    @classmethod
    def create(cls, features: dict, n_layers: int, targets=PROJECTIONS, max_rank: int = DEFAULT_MAX_RANK) -> "SlotSpec":
        """The spec for `targets` of a model whose projections have `features` (every projection's)."""
        if max_rank < 1:
            raise OdloraError(f"must be >= 1, got {max_rank}", param="max_rank")
        unknown = [t for t in targets if t not in PROJECTIONS]
        if unknown:
            raise OdloraError(f"{unknown[0]!r} is not a linear that takes adapter slots "
                              f"(choose from {', '.join(PROJECTIONS)})", param="targets")
        ordered = tuple(t for t in PROJECTIONS if t in targets)
        return cls(ordered, max_rank, n_layers, {t: list(features[t]) for t in ordered})

    @classmethod
    def from_dict(cls, d: dict) -> "SlotSpec":
        """The spec of a manifest's `slots` (types checked by schemas.SlotLayout): every target a
        known projection with its features, in slot order, and the recorded layout the one they give."""
        unknown = [t for t in d["targets"] if t not in PROJECTIONS]
        if unknown:
            raise OdloraError(f"slot target {unknown[0]!r} is not one of {', '.join(PROJECTIONS)}")
        lacking = [t for t in d["targets"] if t not in d["features"]]
        if lacking:
            raise OdloraError(f"slot target {lacking[0]!r} has no features")
        targets = tuple(t for t in PROJECTIONS if t in d["targets"])
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
        return {name: self.shape(name) for group in self.groups() for name in (f"lora_A_{group}", f"lora_B_{group}")}

    def shape(self, name: str, rank: int | None = None) -> list[int]:
        """The shape of slot tensor `name` (`lora_A_<group>` or `lora_B_<group>`) laid out for `rank`
        (default R): the stored shape of a packed blob trimmed to its used rank."""
        rank = self.max_rank if rank is None else rank
        factor, _, group = name.partition("_")[2].partition("_")
        members = self.groups()[group]
        if factor == "A":
            return [self.n_layers, len(members) * rank, self.features[members[0]][0]]
        return [self.n_layers, sum(self.features[m][1] for m in members), rank]

    def rows(self, member_index: int, rank: int | None = None, start: int = 0, count: int | None = None) -> slice:
        """Member `member_index`'s rows of its group's A, laid out for `rank` (default R):
        `count` of them from `start` (default: all `rank`)."""
        rank = self.max_rank if rank is None else rank
        first = member_index * rank + start
        return slice(first, first + (rank - start if count is None else count))

    def out_offsets(self, group: str) -> list[int]:
        """Each member's first row of its group's B (the members' out_features before it)."""
        offsets, total = [], 0
        for member in self.groups()[group]:
            offsets.append(total)
            total += self.features[member][1]
        return offsets

    def per_layer_names(self) -> list[str]:
        """Inputs of an export that takes its slots per layer, layer-major: `<slot>.<layer>` is
        layer <layer> of `layout()`'s `<slot>`."""
        return [f"{name}.{layer}" for layer in range(self.n_layers) for name in self.layout()]

    def used_rank(self, slots: dict, groups=None) -> int:
        """The smallest r such that, in `groups` (default all), every member's A rows and B columns
        beyond r are zero: 0 for an all-zero adapter."""
        used = 0
        for group in groups or self.groups():
            members = self.groups()[group]
            A, B = slots[f"lora_A_{group}"], slots[f"lora_B_{group}"]
            columns = (B.abs().amax(dim=(0, 1)) > 0) | (A.abs().amax(dim=(0, 2)).view(len(members), -1).amax(dim=0) > 0)
            nonzero = columns.nonzero()
            used = max(used, int(nonzero.max()) + 1 if len(nonzero) else 0)
        return used

    def stored_mismatch(self, tensors: dict, rank: int):
        """The first slot tensor of a blob stored at `rank` that is missing or not the shape `rank`
        lays it out in, as (name, expected shape); None when all match (and 1 <= rank <= R)."""
        for name in self.layout():
            stored = self.shape(name, rank) if 1 <= rank <= self.max_rank else None
            if stored is None or name not in tensors or list(tensors[name].shape) != stored:
                return name, stored
        return None

    def resize_rank(self, slots: dict, old: int, new: int) -> dict:
        """Slot tensors laid out for rank `old` -> rank `new`: each member's rows cut or zero-padded (fp32)."""
        out, keep = {}, min(old, new)
        for group, members in self.groups().items():
            A, B = slots[f"lora_A_{group}"].float(), slots[f"lora_B_{group}"].float()
            A_new = A.new_zeros(self.shape(f"lora_A_{group}", new))
            for m in range(len(members)):
                A_new[:, self.rows(m, new, count=keep)] = A[:, self.rows(m, old, count=keep)]
            B_new = B.new_zeros(self.shape(f"lora_B_{group}", new))
            B_new[..., :keep] = B[..., :keep]
            out[f"lora_A_{group}"], out[f"lora_B_{group}"] = A_new, B_new
        return out
