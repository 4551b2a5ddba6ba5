"""The staged export pipeline shared by every target, and adapter packing.

    load base -> slot spec -> target.export_program(...) into a temp dir -> tokenizer copied in
    -> manifest.json (fingerprint, architecture, slots, quantisation, sha256 + size per file)
    -> swapped into place (`atomic.py`: a half-written export never appears at the final path)

A target module (`exporters/onnx.py`, ...) provides:

    QUANTS: tuple[str, ...]                       quantisations it accepts (first is the default)
    export_program(model, spec, out_dir, quant, max_seq_len) -> dict
        writes its files into out_dir, returns target-specific manifest fields
    pack_slots(slots, manifest, out_file) -> None
        writes one adapter's slot tensors in the target's native blob format
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Optional

from .. import __version__
from ..adapter import check_base, load_adapter
from ..base import load_base, resolve
from ..errors import OdloraError
from ..lora import TARGET_PRESETS
from ..outputs import EXPORT, PACKED, check_output, staged_output, staged_packed
from ..registry import sha256_file
from ..schemas import ExportManifest, PackedSidecar, read_json, to_dict
from .slots import SlotSpec, slot_tensors

TARGETS = ("onnx", "executorch", "coreml")
MANIFEST = "manifest.json"


def target_module(target: str):
    if target not in TARGETS:
        raise OdloraError(f"unknown export target {target!r} (targets: {', '.join(TARGETS)})")
    return importlib.import_module(f"{__package__}.{target}")


def export(base_spec: Optional[str], target: str, out: Path, quant: Optional[str] = None,
           max_rank: int = 16, targets=TARGET_PRESETS["all-linear"], max_seq_len: int = 512,
           force: bool = False, say=print) -> dict:
    """Export the base once for `target` with adapter slots; returns the manifest."""
    module = target_module(target)
    quant = quant or module.QUANTS[0]
    if quant not in module.QUANTS:
        raise OdloraError(f"--quant {quant!r} is not supported for {target} (choose from {', '.join(module.QUANTS)})")
    out = check_out(out, force, resolve(base_spec))
    started = time.perf_counter()
    base = load_base(base_spec)
    if max_seq_len > base.model.args.max_seq_len:
        raise OdloraError(f"--max-seq-len {max_seq_len} exceeds the base's {base.model.args.max_seq_len} positions")
    spec = SlotSpec.for_model(base.model, targets, max_rank)
    with staged_output(out, EXPORT) as tmp:
        say(f"exporting {base.spec} to {target} ({quant}, slots r<={max_rank} on {','.join(spec.targets)}) ...")
        target_fields = module.export_program(base.model, spec, tmp, quant, max_seq_len)
        return write_manifest(tmp, base, target, quant, started, {"max_seq_len": max_seq_len, "slots": spec.to_dict(),
                                                                   **target_fields})


def export_trainable(base, out: Path, lora, batch_size: int, seq_len: int, force: bool = False, say=print,
                     base_quant: str = "none") -> dict:
    """Export an ExecuTorch training program (`executorch_train.py`) for `base` (a loaded Base);
    returns its manifest. Its target is `executorch-train`; the runtime does not serve it."""
    from .executorch_train import export_training_program

    out = check_out(out, force, base.path)
    started = time.perf_counter()
    with staged_output(out, EXPORT) as tmp:
        say(f"exporting {base.spec} as an ExecuTorch training program (LoRA r={lora.rank} on {','.join(lora.targets)}, "
            f"batch {batch_size} x {seq_len} tokens, base {base_quant}) ...")
        fields = export_training_program(base.model, lora, batch_size, seq_len, tmp, base_quant)
        return write_manifest(tmp, base, "executorch-train", base_quant, started, {"max_seq_len": seq_len, **fields})


def check_out(out: Path, force: bool, base_path: Path) -> Path:
    """An export replaces only an export (with --force), never the base it reads."""
    return check_output(out, EXPORT, force, {"--base": [base_path]})


def write_manifest(tmp: Path, base, target: str, quant: str, started: float, fields: dict) -> dict:
    """Copy the tokenizer into an export being staged in `tmp` and write its manifest.json last."""
    base.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    manifest = {
        "format": ExportManifest.FORMAT, "format_version": ExportManifest.VERSION, "tool_version": __version__,
        "target": target, "quant": quant, "base": base.spec, "base_fingerprint": base.fingerprint,
        "config": base.config, **fields, "export_seconds": round(time.perf_counter() - started, 1),
    }
    manifest["files"] = file_table(tmp)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


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


def pack(adapter_dir: Path, export_dir: Path, out: Path, force: bool = False) -> dict:
    """Turn a PEFT-format adapter into the export target's native blob; returns its sidecar.

    The blob and its sidecar `<out>.json` replace a previous packed adapter only with `force`,
    and only as a pair (`atomic.staged_pair`); never a directory, another file or a path inside
    the adapter or the export."""
    out = check_output(out, PACKED, force, {"adapter": [adapter_dir], "--export": [export_dir]})
    manifest = read_manifest(export_dir, verify=False)
    adapter = load_adapter(adapter_dir)
    check_base(adapter, manifest["base_fingerprint"], str(adapter_dir))
    slots = slot_tensors(adapter, SlotSpec.from_dict(manifest["slots"]))  # checks rank, targets, shapes
    with staged_packed(out) as (blob, sidecar):
        target_module(manifest["target"]).pack_slots(slots, manifest, blob)
        info = {
            "format": PackedSidecar.FORMAT, "format_version": PackedSidecar.VERSION, "target": manifest["target"],
            "base_fingerprint": manifest["base_fingerprint"], "fingerprint_verified": adapter.fingerprint is not None,
            "adapter": str(adapter_dir), "rank": adapter.rank, "modules": len(adapter.A),
            "prompt_format": adapter.prompt_format,
            "sha256": sha256_file(blob), "size": blob.stat().st_size,
            "metrics": adapter.meta.get("metrics", {}) and {k: v for k, v in adapter.meta["metrics"].items() if k != "val_history"},
        }
        sidecar.write_text(json.dumps(info, indent=2) + "\n")
    return info
