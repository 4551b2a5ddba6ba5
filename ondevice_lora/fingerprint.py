"""The base fingerprint: sha256 over the base's tensor names, dtypes, shapes and bytes.

Adapters, exports and packed blobs all carry it, and every join checks it, so an adapter is
never applied to a base it was not trained for. The order is canonical (sorted names), so the
same weights give the same fingerprint whether they came from a GGUF file or a converted
directory. Hashing ~0.5 GB takes about a second, so results are cached by file size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch

from .errors import OdloraError
from .formats.schemas import FingerprintCacheEntry, read_json


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _stamp(files: list[Path]) -> list:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(files)]


def cached_fingerprint(cache_dir: Path, files: list[Path], compute) -> str:
    """Return the fingerprint stored for exactly these files, else `compute()` and store it."""
    stamp = _stamp(files)
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32]
    entry = cache_dir / f"{key}.json"
    if entry.is_file():
        try:
            stored = read_json(entry, FingerprintCacheEntry)
            if stored.files == stamp:
                return stored.fingerprint
        except (OSError, OdloraError):
            pass  # a damaged cache entry is recomputed, never trusted
    fingerprint = compute()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"files": stamp, "fingerprint": fingerprint}))
        os.replace(tmp, entry)
    except OSError:
        pass  # a read-only cache only costs time
    return fingerprint
