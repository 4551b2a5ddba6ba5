"""The adapters on this machine: found under the folders a user names (`odlora adapter list`),
and removed one at a time, only when a path really is one (`odlora adapter rm`).

    find_adapters([Path(".")])      # [{"path", "kind": "adapter" | "packed", "base", "rank", ...}]
    remove_adapter(Path("adapters/dates"))

Two kinds (`outputs.py` recognises them by their marker files): an adapter directory (PEFT
tensors + `adapter_config.json` + `odlora.json`) and a packed blob with its `.json` sidecar.
Removal renames first, then deletes: a kill at any instant leaves the adapter whole under its
name, or gone from it (a `.odlora-rm-*` leftover at worst), never half an adapter that still
looks like one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

from .atomic import kill_point, sidecar_of
from .errors import OdloraError
from .outputs import ADAPTER, PACKED

MAX_DEPTH = 4  # how far below each folder `find_adapters` looks
SKIPPED = {".git", ".venv", "node_modules", "__pycache__"}
REMOVING = ".odlora-rm-"  # what a removal renames an adapter to before it deletes it


def find_adapters(roots: Iterable[Path], max_depth: int = MAX_DEPTH) -> list[dict]:
    """Every adapter directory and packed adapter at or below `roots` (not inside an adapter),
    sorted by path, each described from its own JSON."""
    found: dict[Path, dict] = {}
    for root in roots:
        if not root.exists():
            raise OdloraError(f"{root}: no such file or directory")
        for path in _walk(root, max_depth):
            found.setdefault(path.resolve(), describe(path))
    return [found[key] for key in sorted(found)]


def _walk(path: Path, depth: int):
    if path.name.startswith(REMOVING):  # what a killed removal left: no adapter any more
        return
    if ADAPTER.matches(path) or PACKED.matches(path):
        yield path
        return
    if depth == 0 or not path.is_dir() or path.is_symlink() or path.name in SKIPPED:
        return
    try:
        children = sorted(path.iterdir())
    except OSError:  # unreadable: nothing of ours to find there
        return
    for child in children:
        yield from _walk(child, depth - 1)


def describe(path: Path) -> dict:
    """What `adapter list` shows of one adapter: kind, base (a packed blob knows only its
    fingerprint), rank, size, training, prompt format."""
    if ADAPTER.matches(path):
        meta = _json(path / "odlora.json")
        metrics = meta.get("metrics") or {}
        return {"path": str(path), "kind": "adapter", "base": meta.get("base"),
                "base_fingerprint": meta.get("base_fingerprint"), "rank": meta.get("rank"),
                "prompt_format": meta.get("prompt_format"), "steps": metrics.get("steps"),
                "val_loss": metrics.get("val_loss"), "bytes": _size(path)}
    sidecar = _json(sidecar_of(path))
    metrics = sidecar.get("metrics") or {}
    return {"path": str(path), "kind": f"packed {sidecar.get('target')}", "base": None,
            "base_fingerprint": sidecar.get("base_fingerprint"), "rank": sidecar.get("rank"), "prompt_format": sidecar.get("prompt_format"),
            "steps": metrics.get("steps"), "val_loss": metrics.get("val_loss"),
            "bytes": path.stat().st_size + sidecar_of(path).stat().st_size}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink())


def removable(path: Path):
    """The kind of adapter at `path` (outputs.ADAPTER or outputs.PACKED); anything else is refused."""
    if path.is_symlink():
        raise OdloraError(f"{path}: a symbolic link, not an adapter (remove the link with rm)")
    for kind in (ADAPTER, PACKED):
        if kind.matches(path):
            return kind
    if not path.exists():
        raise OdloraError(f"{path}: no such file or directory")
    raise OdloraError(f"{path}: not an adapter ({ADAPTER.marker}) nor a packed adapter ({PACKED.marker}): "
                      f"left as it is")


def remove_adapter(path: Path) -> str:
    """Delete the adapter directory or packed adapter (blob and sidecar) at `path`; returns what
    was removed, for the command's line."""
    if removable(path) is ADAPTER:
        away = _renamed_away(path)
        kill_point("removing")
        shutil.rmtree(away)
        return f"removed the adapter directory {path}"
    sidecar = sidecar_of(path)
    gone_sidecar = _renamed_away(sidecar)  # first: a blob without its sidecar is no packed adapter any more
    away = _renamed_away(path)
    kill_point("removing")
    os.remove(away)
    os.remove(gone_sidecar)
    return f"removed the packed adapter {path} and {sidecar.name}"


def _renamed_away(path: Path) -> Path:
    """`path` moved, in one rename, to a hidden name beside it."""
    away = path.with_name(f"{REMOVING}{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, away)
    return away
