"""Core ML: the packed adapters of a Core ML export (`exporters/coreml.py`).

Core ML runs models only on macOS and iOS, so this module has no backend here: a Core ML export
runs on Linux only as the torch reference (`backends.TorchBackend`), which reads its blobs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import OdloraError
from ..formats.blobs import COREML_SLOTS_FORMAT

BACKEND = None  # not implemented yet: apps run the package through Core ML itself (apps/ios)


def read_slots(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """A packed adapter's tensors by slot input name, in the inputs' dtype (fp16)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("format") != COREML_SLOTS_FORMAT:
            raise OdloraError(f"{path}: not a packed Core ML adapter ({COREML_SLOTS_FORMAT})")
        return {name: f.get_tensor(name) for name in f.keys()}
