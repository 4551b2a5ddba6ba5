"""Core ML: the packed adapters of a Core ML export (`exporters/coreml.py`).

Core ML runs models only on macOS and iOS, so this module has no backend here: a Core ML export
runs on Linux only as the torch reference (`backends.TorchBackend`), which reads its blobs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import OdloraError
from ..formats.blobs import COREML_SLOTS_FORMAT
from ..formats.slots import SlotSpec

BACKEND = None  # not implemented yet: apps run the package through Core ML itself (apps/ios)


def read_slots(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """A packed adapter's tensors by slot input name, in the inputs' dtype (fp16), at the export's
    rank R (a version 2 blob stores its own rank r <= R: each member's rows and B's columns are
    padded back with zeros)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != COREML_SLOTS_FORMAT:
            raise OdloraError(f"{path}: not a packed Core ML adapter ({COREML_SLOTS_FORMAT})")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    spec = SlotSpec.from_dict(manifest["slots"])
    rank = int(meta.get("rank", spec.max_rank))  # version 1 blobs are at full rank
    mismatch = spec.stored_mismatch(tensors, rank)
    if mismatch:
        raise OdloraError(f"{path}: slot tensor {mismatch[0]} is missing or not {mismatch[1]}: packed for another export")
    dtype = next(iter(tensors.values())).dtype
    return {name: t.to(dtype) for name, t in spec.resize_rank(tensors, rank, spec.max_rank).items()}
