"""What each target's packed adapter blob carries to say what it is (written by `exporters/<target>.py`'s
`pack_slots`, checked by `runtime/<target>.py`'s `read_slots`; `docs/formats.md` has the details)."""

from __future__ import annotations

from typing import Optional

EXECUTORCH_SLOTS_FORMAT = "odlora-executorch-slots"  # safetensors metadata "format" of a .slots blob
COREML_SLOTS_FORMAT = "odlora-coreml-slots"  # the same for a Core ML blob
# Of a Core ML blob: 1 = every slot input as the package takes it (fp16, full rank R); 2 = fp16 at the
# adapter's own rank (metadata "rank"), padded to R by the reader.
COREML_SLOTS_VERSION = 2
# Of our .onnx_adapter content: 1 = the graph's slot inputs as they are (fp32, full rank R);
# 2 = the same names in fp16 at the adapter's own rank (the runtime pads and widens on load).
ONNX_ADAPTER_VERSION = 2
ONNX_ADAPTER_VERSIONS = (1, 2)  # what the runtime reads


def onnx_model_version(fingerprint: Optional[str]) -> int:
    """The `.onnx_adapter` model version: 28 bits of the base fingerprint (0 when unknown)."""
    if not fingerprint:
        return 0
    return int(fingerprint.removeprefix("sha256:")[:7], 16)
