"""An export directory's manifest.json: its file table and the checked read every consumer shares
(the runtime, packing, bundles, the on-device trainer)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import OdloraError
from .schemas import ExportManifest, read_json, to_dict
from .slots import SlotSpec

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(root: Path, manifest: str = MANIFEST) -> dict[str, dict]:
    """Relative path -> {"sha256", "size"} for every file under root but the manifest itself."""
    return {str(f.relative_to(root)): {"sha256": sha256_file(f), "size": f.stat().st_size}
            for f in sorted(root.rglob("*")) if f.is_file() and f != root / manifest}


def read_manifest(export_dir: Path, verify: bool = True) -> dict:
    """Load an export's manifest (schema-checked, slots consistent); with `verify`, check every
    file's size and sha256."""
    path = Path(export_dir) / MANIFEST
    try:
        manifest = to_dict(read_json(path, ExportManifest))
    except FileNotFoundError:
        raise OdloraError(f"{export_dir}: not an odlora export (no {MANIFEST})") from None
    if "slots" in manifest:
        try:
            SlotSpec.from_dict(manifest["slots"])
        except OdloraError as e:
            raise OdloraError(f"{path}: slots: {e}") from None
    if verify:
        for name, entry in manifest["files"].items():
            f = Path(export_dir) / name
            if not f.is_file():
                raise OdloraError(f"{export_dir}: file {name} listed in the manifest is missing")
            if f.stat().st_size != entry["size"] or sha256_file(f) != entry["sha256"]:
                raise OdloraError(f"{export_dir}: file {name} does not match its manifest checksum")
    return manifest
