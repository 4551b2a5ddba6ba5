"""The staged export pipeline shared by every target, and adapter packing.

    load base -> slot spec -> target.export_program(...) into a temp dir -> tokenizer copied in
    -> manifest.json (fingerprint, architecture, slots, quantisation, sha256 + size per file)
    -> swapped into place (`atomic.py`: a half-written export never appears at the final path)

A target (`formats/targets.py`: its quantisations, blob suffix and options) has an exporter module
`exporters/<target>.py` that provides:

    FAMILIES: tuple[str, ...]
        the model families (`models.family_of`) it can export; any other is refused before export
    export_program(model, spec, out_dir, quant, max_seq_len, config, **export_options) -> dict
        writes its files into out_dir, returns target-specific manifest fields
    pack_slots(slots, manifest, out_file) -> None
        writes one adapter's slot tensors in the target's native blob format
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path
from typing import Optional

from .. import __version__
from ..adapter import check_base, load_adapter
from ..base import load_base, resolve
from ..errors import OdloraError
from ..formats.manifest import MANIFEST, file_table, read_manifest, sha256_file
from ..formats.schemas import ExportManifest, PackedSidecar
from ..formats.slots import DEFAULT_MAX_RANK, PROJECTIONS, SlotSpec
from ..formats.targets import DEFAULT_MAX_SEQ_LEN, TRAINING_TARGET, target as find_target
from ..models import family_of
from ..models.slots import slot_tensors, spec_for_model
from ..outputs import EXPORT, PACKED, check_output, staged_output, staged_packed
from ..progress import Stages
from ..registry import odlora_home

def exporter(target: str):
    """The exporter module of `target` (`exporters/<target>.py`)."""
    return importlib.import_module(find_target(target).exporter)


def check_family(model, exporter_module, target: str) -> None:
    """Refuse a model whose family `exporter_module` (`target`'s) does not know: its rewrites and
    graph code assume that family's modules."""
    name = family_of(model)
    if name not in exporter_module.FAMILIES:
        raise OdloraError(f"the {target} exporter cannot export model family {name!r} "
                          f"(supports: {', '.join(exporter_module.FAMILIES)})")


def export(base_spec: Optional[str], target: str, out: Path, quant: Optional[str] = None,
           max_rank: Optional[int] = None, targets=PROJECTIONS, max_seq_len: Optional[int] = None,
           force: bool = False, say=print, options: Optional[dict] = None) -> dict:
    """Export the base once for `target` with adapter slots; returns the manifest. None picks the
    default: the target's first quantisation, DEFAULT_MAX_RANK, DEFAULT_MAX_SEQ_LEN, the target's
    `export_options` (which `options` overrides: {"backend": "openvino"} for ExecuTorch)."""
    entry = find_target(target)
    options = {**entry.export_options, **{k: v for k, v in (options or {}).items() if v is not None}}
    if unknown := sorted(set(options) - set(entry.export_options)):
        raise OdloraError(f"the {target} target takes no {', '.join(unknown)} option "
                          f"({', '.join(entry.export_options) or 'it has none'})", param=unknown[0])
    max_rank = DEFAULT_MAX_RANK if max_rank is None else max_rank
    max_seq_len = DEFAULT_MAX_SEQ_LEN if max_seq_len is None else max_seq_len
    quant = quant or entry.quants[0]
    if quant not in entry.quants:
        raise OdloraError(f"{quant!r} is not supported for {target} (choose from {', '.join(entry.quants)})", param="quant")
    out = check_out(out, force, resolve(base_spec))
    started = time.perf_counter()
    base = load_base(base_spec)
    module = exporter(target)
    check_family(base.model, module, target)
    if max_seq_len > base.model.args.max_seq_len:
        raise OdloraError(f"{max_seq_len} exceeds the base's {base.model.args.max_seq_len} positions", param="max_seq_len")
    spec = spec_for_model(base.model, targets, max_rank)
    with staged_output(out, EXPORT) as tmp:
        lowered = f", {options['backend']}" if "backend" in options else ""
        say(f"exporting {base.spec} to {target} ({quant}{lowered}, slots r<={max_rank} on {','.join(spec.targets)}) ...")
        stages = Stages(say)
        target_fields = module.export_program(base.model, spec, tmp, quant, max_seq_len, base.config, **options,
                                              stage=stages.start)
        stages.start("writing manifest.json (each file's sha256)")
        manifest = write_manifest(tmp, base, target, quant, started, {"max_seq_len": max_seq_len,
                                                                      "slots": spec.to_dict(), **target_fields})
        stages.done()
        return manifest


def export_trainable(base, out: Path, lora, batch_size: int, seq_len: int, force: bool = False, say=print,
                     base_quant: str = "none") -> dict:
    """Export an ExecuTorch training program (`executorch_train.py`) for `base` (a loaded Base);
    returns its manifest. Its target is `executorch-train`; the runtime does not serve it."""
    from . import executorch_train

    check_family(base.model, executorch_train, TRAINING_TARGET)
    out = check_out(out, force, base.path)
    started = time.perf_counter()
    with staged_output(out, EXPORT) as tmp:
        say(f"exporting {base.spec} as an ExecuTorch training program (LoRA r={lora.rank} on {','.join(lora.targets)}, "
            f"batch {batch_size} x {seq_len} tokens, base {base_quant}) ...")
        fields = executorch_train.export_training_program(base.model, lora, batch_size, seq_len, tmp, base_quant)
        return write_manifest(tmp, base, TRAINING_TARGET, base_quant, started, {"max_seq_len": seq_len, **fields})


def training_program_key(fingerprint: str, lora, batch_size: int, seq_len: int, base_quant: str) -> str:
    what = {"base": fingerprint, "lora": lora.to_dict(), "batch_size": batch_size, "seq_len": seq_len,
            "base_quant": base_quant}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def cached_training_program(base, lora, batch_size: int, seq_len: int, base_quant: str, say=print) -> Path:
    """The training program for this base and shape under $ODLORA_HOME, exported on first use
    (`personalize`'s `program_exporter` for `--engine executorch` without `--program`)."""
    from ..device_train import read_program

    path = odlora_home() / "train-programs" / training_program_key(base.fingerprint, lora, batch_size, seq_len,
                                                                   base_quant)
    try:
        read_program(path)
        return path
    except OdloraError:  # absent or incomplete: (re)export it, atomically
        export_trainable(base, path, lora, batch_size, seq_len, force=True, say=say, base_quant=base_quant)
    return path


def check_out(out: Path, force: bool, base_path: Path) -> Path:
    """An export replaces only an export (with --force), never the base it reads."""
    return check_output(out, EXPORT, force, {"base": [base_path]})


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


def pack(adapter_dir: Path, export_dir: Path, out: Path, force: bool = False) -> dict:
    """Turn a PEFT-format adapter into the export target's native blob; returns its sidecar.

    The blob and its sidecar `<out>.json` replace a previous packed adapter only with `force`,
    and only as a pair (`atomic.staged_pair`); never a directory, another file or a path inside
    the adapter or the export."""
    out = check_output(out, PACKED, force, {"adapter_dir": [adapter_dir], "export_dir": [export_dir]})
    manifest = read_manifest(export_dir, verify=False)
    adapter = load_adapter(adapter_dir)
    check_base(adapter, manifest["base_fingerprint"], str(adapter_dir))
    slots = slot_tensors(adapter, SlotSpec.from_dict(manifest["slots"]))  # checks rank, targets, shapes
    with staged_packed(out) as (blob, sidecar):
        exporter(manifest["target"]).pack_slots(slots, manifest, blob)
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
