"""Registered adapters, the LRU cache that keeps them loaded, and blends of packed slot tensors.

A packed blob (`odlora adapter pack`) comes with a sidecar `<blob>.json`: the export target, the
base fingerprint and the blob's sha256. Registering checks all three against the open export.

A request names no adapter, one, or a weighted blend, with a strength. In slot form an adapter is
A (L, m·R, in) and B (L, Σout, R) per group, its scale already folded into B (`formats/slots.py`),
so ΔW = B·A per member, and

    strength s, weight w       B ← s·w·B                      (A unchanged)
    blend Σ wᵢ ΔWᵢ             stack the adapters' used rank columns side by side:
                               A = [A₁; A₂; ...] per member, B = [w₁B₁, w₂B₂, ...]

which fits the export's slots only while the used ranks add up to at most R (per group).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..atomic import pair_sidecar
from ..errors import OdloraError, named
from ..formats.manifest import sha256_file
from ..formats.schemas import PackedSidecar, read_json, to_dict
from ..formats.slots import SlotSpec
from ..models.slots import zero_slots
from ..prompts import DEFAULT_PROMPT_FORMAT


@dataclass
class RegisteredAdapter:
    id: str
    path: Path
    info: dict  # the sidecar
    sha256: str
    stamp: tuple[int, int]  # (size, mtime_ns) when registered: a changed file is checked again

    @property
    def key(self) -> tuple:
        return ("packed", self.sha256)


def read_sidecar(blob: Path, manifest: dict) -> dict:
    """The sidecar of `blob`, checked against the export: target, base fingerprint, checksum."""
    blob = Path(blob)
    if not blob.is_file():
        raise OdloraError(f"{blob}: no such packed adapter")
    sidecar = pair_sidecar(blob)  # `<blob>.json`, or the pending one of a pack killed mid-commit (atomic.py)
    try:
        info = to_dict(read_json(sidecar, PackedSidecar))
    except FileNotFoundError:
        raise OdloraError(f"{blob}: no sidecar {sidecar.name} (written by `odlora adapter pack`), so its base "
                          f"and target cannot be checked; pack the adapter against this export") from None
    if info["target"] != manifest["target"]:
        raise OdloraError(f"{blob}: packed for a {info['target']} export, this export is {manifest['target']}; "
                          f"pack the adapter against this export")
    if info["base_fingerprint"] != manifest["base_fingerprint"]:
        raise OdloraError(f"{blob}: packed for base {info['base_fingerprint'][:19]}..., this export's base is "
                          f"{manifest['base_fingerprint'][:19]}... (a different base); pack the adapter against this export")
    check_checksum(blob, info)
    return info


def check_checksum(blob: Path, info: dict) -> None:
    if blob.stat().st_size != info.get("size") or sha256_file(blob) != info.get("sha256"):
        raise OdloraError(f"{blob}: corrupt: its size or sha256 does not match its sidecar {blob.name}.json")


def file_stamp(path: Path) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


# -- the request's adapter argument ------------------------------------------------------------------

def normalise(adapter, strength: float, registered: dict[str, RegisteredAdapter]) -> list[tuple[str, float]]:
    """`None | "id" | [("id", weight) | "id", ...]` and a strength -> [(id, weight)] sorted by id,
    duplicates summed, strength folded in, zero weights dropped ([] is the base)."""
    if not _finite(strength):
        raise OdloraError(f"adapter strength must be a finite number, got {strength!r}")
    if adapter is None:
        return []
    items = [adapter] if isinstance(adapter, str) else adapter
    try:
        items = list(items)
    except TypeError:
        raise OdloraError(f"adapter must be None, an id or a list of (id, weight), got {adapter!r}") from None
    weights: dict[str, float] = {}
    for item in items:
        if isinstance(item, str):
            name, weight = item, 1.0
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and _finite(item[1]):
            name, weight = item[0], float(item[1])
        else:
            raise OdloraError(f"adapter blend entries are ids or (id, weight) pairs with a finite weight, got {item!r}")
        if name not in registered:
            known = ", ".join(sorted(registered)) or "none"
            raise OdloraError(f"unknown adapter {name!r} (registered: {known})")
        weights[name] = weights.get(name, 0.0) + weight
    return [(name, w * strength) for name, w in sorted(weights.items()) if w * strength != 0.0]


def blend_prompt_format(parts: list[tuple[str, float]], registered: dict[str, RegisteredAdapter]) -> str:
    """How a request with these adapters is asked: their trained prompt format ("chat" for the base
    and for blobs packed before formats were recorded). A blend must agree on one."""
    formats = {name: registered[name].info.get("prompt_format", DEFAULT_PROMPT_FORMAT) for name, _ in parts}
    if len(set(formats.values())) > 1:
        written = ", ".join(f"{name} {fmt}" for name, fmt in formats.items())
        raise OdloraError(f"cannot blend adapters trained with different prompt formats ({written})")
    return next(iter(formats.values()), DEFAULT_PROMPT_FORMAT)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def label(parts: list[tuple[str, float]]) -> Optional[str]:
    """How results name the adapter: None (base), "id", or "a:0.5+b:1" (the CLI's FILE:WEIGHT form)."""
    if not parts:
        return None
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return "+".join(f"{name}:{w:g}" for name, w in parts)


def parse_label(text: str):
    """The inverse of `label`, so that clients name adapters as results print them: "base" -> None,
    "id" -> "id", "a:0.7+b:0.3" -> [("a", 0.7), ("b", 0.3)] (a part without a weight weighs 1)."""
    text = text.strip()
    if text == "base":
        return None
    if ":" not in text and "+" not in text:
        return text
    parts = []
    for part in text.split("+"):
        name, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
        try:
            parts.append((name.strip(), float(weight)))
        except ValueError:
            raise OdloraError(f"adapter {text!r}: bad weight {weight!r} (write a blend as a:0.7+b:0.3)") from None
    return parts


# -- slot arithmetic -------------------------------------------------------------------------------------

def combine_slots(parts: list[tuple[str, dict[str, torch.Tensor], float]], spec: SlotSpec) -> dict[str, torch.Tensor]:
    """Σ wᵢ ΔWᵢ as one set of slot tensors; `parts` are (name, slot tensors, weight): each
    adapter's used rank columns stacked after the previous one's, its weight folded into B.

    Raises OdloraError when, in some group, the adapters' used ranks add up to more than R.
    """
    R, out = spec.max_rank, zero_slots(spec)
    for group, members in spec.groups().items():
        a_name, b_name = f"lora_A_{group}", f"lora_B_{group}"
        ranks = [spec.used_rank(slots, [group]) for _, slots, _ in parts]
        if sum(ranks) > R:
            stacked = " + ".join(f"{name} (rank {r})" for (name, _, _), r in zip(parts, ranks))
            raise OdloraError(f"blend {stacked} needs rank {sum(ranks)} in the {group} slots; this export's slots "
                              f"hold rank <= {R} (blend fewer adapters or re-export with a larger {named('max_rank')})")
        offset = 0
        for (_, slots, weight), r in zip(parts, ranks):
            for m in range(len(members)):
                out[a_name][:, spec.rows(m, start=offset, count=r)] = slots[a_name][:, spec.rows(m, count=r)]
            out[b_name][:, :, offset: offset + r] = slots[b_name][:, :, :r] * weight
            offset += r
    return out


# -- the cache ----------------------------------------------------------------------------------------------

def transposed_slot_inputs(slots: dict[str, torch.Tensor], spec: SlotSpec, feed: dict,
                           rank: Optional[int] = None) -> dict[str, np.ndarray]:
    """Stacked slot tensors -> the graph's `lora_AT_<group>.<layer>` (in, m·r) and `lora_BT_<group>.<layer>`
    (m·r, width) inputs (`exporters/projections.py`; `feed` is the manifest's `slot_feed`).

    rank None (ONNX, whose graph takes any r): each pair at the used rank r of its own layer and
    group, and a pair with nothing to add (r = 0) left out, so that the graph's empty default applies.
    A fixed `rank` (ExecuTorch's static shapes: R): every pair, at that rank, zero-padded.
    """
    out = {}
    for group, members in spec.groups().items():
        A, B = slots[f"lora_A_{group}"].float(), slots[f"lora_B_{group}"].float()  # (L, m·R, in), (L, Σout, R)
        R = B.shape[-1]
        width, columns = feed[group]["width"], feed[group]["columns"]
        for layer in range(spec.n_layers):
            r = rank or spec.used_rank({f"lora_A_{group}": A[layer:layer + 1], f"lora_B_{group}": B[layer:layer + 1]},
                                       [group])
            if r == 0:
                continue
            AT = np.zeros((A.shape[-1], len(members) * r), np.float32)
            BT = np.zeros((len(members) * r, width), np.float32)
            for j, (member, row) in enumerate(zip(members, spec.out_offsets(group))):
                out_features = spec.features[member][1]
                AT[:, j * r:(j + 1) * r] = A[layer, spec.rows(j, R, count=r)].T.numpy()
                BT[j * r:(j + 1) * r, columns[member]:columns[member] + out_features] = \
                    B[layer, row:row + out_features, :r].T.numpy()
            out[f"lora_AT_{group}.{layer}"], out[f"lora_BT_{group}.{layer}"] = AT, BT
    return out


class AdapterCache:
    """Loaded adapters by key, least recently used first out once their bytes exceed `budget`.

    An entry larger than the whole budget is handed to its request but not kept. Evicting drops
    only the cache's reference: a request still running with the adapter keeps it alive.
    """

    def __init__(self, budget: int):
        if budget < 0:
            raise OdloraError(f"adapter cache budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self._entries: OrderedDict = OrderedDict()  # key -> Loaded
        self._lock = threading.Lock()
        self.hits = self.loads = self.evictions = 0

    def get_or_load(self, key, load: Callable[[], object]):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
        loaded = load()  # outside the lock: other requests' hits do not wait for the disk
        with self._lock:
            self.loads += 1
            if key in self._entries:  # another thread loaded it meanwhile: keep one copy
                self._entries.move_to_end(key)
                return self._entries[key]
            self._entries[key] = loaded
            self._evict()
            return loaded

    def _evict(self) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        while self._entries and total > self.budget:
            _, dropped = self._entries.popitem(last=False)
            total -= dropped.nbytes
            self.evictions += 1

    def drop(self, predicate: Callable[[tuple], bool]) -> None:
        with self._lock:
            for key in [k for k in self._entries if predicate(k)]:
                del self._entries[key]

    def keys(self) -> list:
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())
