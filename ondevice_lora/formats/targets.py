"""The export targets, in one table that export, pack, the runtime, the CLI, the demo and the web app read.

A target is a device runtime we export the base for. Its two sides are modules of their own:

    exporters/<name>.py   export_program(model, spec, out_dir, quant, max_seq_len, config, **options) -> dict
                          (the manifest's target fields), pack_slots(slots, manifest, out_file) and
                          FAMILIES, the model families it exports (`models.family_of`)
    runtime/<name>.py     read_slots(path, manifest) -> slot tensors (any target's blobs feed blends and
                          the torch reference) and, where it runs here, a `Backend` subclass `BACKEND`

Adding a target is those two modules and one `Target` entry below. Names are module paths, not
imports, so that reading the table imports neither exporters nor runtimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import OdloraError


@dataclass(frozen=True)
class Target:
    name: str
    quants: tuple[str, ...]  # base quantisations it accepts; the first is the default
    blob_suffix: str  # the file suffix of an adapter packed for it
    requires: str  # the Python package its runtime side needs (`pip install 'ondevice-lora[export]'`)
    export_options: dict = field(default_factory=dict)  # passed to export_program and recorded in the manifest
    runs_on: tuple[str, ...] = ()  # sys.platform values where its runtime runs; () = everywhere
    runs_on_why: str = ""  # what to tell a user elsewhere

    @property
    def exporter(self) -> str:
        return f"ondevice_lora.exporters.{self.name}"

    @property
    def runtime(self) -> str:
        return f"ondevice_lora.runtime.{self.name}"


TARGETS = {t.name: t for t in (
    Target("onnx", ("fp32", "int8", "int4"), ".onnx_adapter", "onnxruntime"),
    # The delegate is a parameter of the ExecuTorch exporter (exporters/executorch_delegates.DELEGATES).
    Target("executorch", ("fp32", "8da4w", "8da8w"), ".slots", "executorch", {"backend": "xnnpack"}),
    Target("coreml", ("fp16", "int8", "int4"), ".safetensors", "coremltools", runs_on=("darwin",),
           runs_on_why="Core ML runs models only on macOS/iOS (coremltools cannot predict elsewhere)"),
)}
DEFAULT_MAX_SEQ_LEN = 512  # an export's KV-cache length unless asked
TRAINING_TARGET = "executorch-train"  # a training program (exporters/executorch_train.py); not served


def target(name: str) -> Target:
    if name not in TARGETS:
        raise OdloraError(f"unknown export target {name!r} (targets: {', '.join(TARGETS)})")
    return TARGETS[name]
