"""Backends: one exported base loaded once, run with any adapter's slot tensors, per sequence.

    backend = open_backend(export_dir, manifest, "onnx")       # or "executorch", "torch"
    adapter = backend.load_packed(blob)                        # native, checked against the export
    with backend.sequence(adapter) as seq:                     # one request's KV-cache state
        logits = seq.forward(prompt_ids, 0)                    # (vocab,) after the last token
        logits = seq.forward([token], len(prompt_ids))

Every backend takes the same three kinds of adapter: `None` (the slots' zeros: exactly the base),
a packed blob in the export's native format (`load_packed`), and slot tensors built in memory
(`from_slots`: blends and strengths, see `adapters.combine_slots`).

Each target's backend lives in `runtime/<target>.py` (as `BACKEND`, with the `read_slots` that
reads its packed blobs), found through the target table `formats/targets.py`. Where the KV cache
lives decides concurrency (`Backend.serial`): ONNX Runtime's caches are graph IO, so requests run
in parallel; ExecuTorch's is a buffer inside the program, and the torch reference below (our model
+ SlottedModel, the graph every exporter captures) keeps it in a module buffer: one at a time.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import OdloraError
from ..formats.slots import SlotSpec
from ..formats.targets import TARGETS, target

BACKENDS = (*TARGETS, "torch")


@dataclass
class Loaded:
    """An adapter ready for one backend: its native form and the bytes it holds."""

    native: object
    nbytes: int


def tensors_nbytes(tensors) -> int:
    return sum(int(t.nbytes) for t in tensors)


# -- packed blobs as slot tensors (any target; for blends and for the torch reference) -----------

def read_slot_tensors(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """A packed blob of `manifest`'s target as fp32 slot tensors in `SlotSpec.layout()` order,
    checked against the export (its target's `read_slots` checks the base)."""
    path, layout = Path(path), SlotSpec.from_dict(manifest["slots"]).layout()
    entry = target(manifest["target"])
    name = entry.name
    try:
        tensors = importlib.import_module(entry.runtime).read_slots(path, manifest)
    except OdloraError:
        raise
    except Exception as e:  # the readers raise their own types for a damaged file
        raise OdloraError(f"{path}: not a readable {name} adapter ({type(e).__name__}: {e})") from None
    for slot, shape in layout.items():
        if slot not in tensors or list(tensors[slot].shape) != shape:
            raise OdloraError(f"{path}: slot tensor {slot} is missing or not {shape}: packed for another export")
    return {slot: tensors[slot].float().contiguous() for slot in layout}


# -- the interface -------------------------------------------------------------------------------

class Backend:
    """One loaded base. Subclasses set `session` (the loaded program, never reloaded) and
    `serial` (True when sequences share state inside it and must run one at a time)."""

    name = ""
    serial = False

    def __init__(self, export_dir: Path, manifest: dict):
        self.dir, self.manifest = Path(export_dir), manifest
        self.spec = SlotSpec.from_dict(manifest["slots"])
        self.max_seq_len = int(manifest["max_seq_len"])
        self._lock = threading.Lock()

    def load_packed(self, path: Path) -> Loaded:
        """A packed blob in the export's native format, checked against the export."""
        slots = read_slot_tensors(path, self.manifest)
        return Loaded(list(slots.values()), tensors_nbytes(slots.values()))

    def read_slots(self, path: Path) -> dict[str, torch.Tensor]:
        return read_slot_tensors(path, self.manifest)

    def from_slots(self, slots: dict[str, torch.Tensor]) -> Loaded:
        """Slot tensors built in memory (in layout order)."""
        tensors = [slots[name].contiguous() for name in self.spec.layout()]
        return Loaded(tensors, tensors_nbytes(tensors))

    @contextlib.contextmanager
    def sequence(self, adapter: Optional[Loaded]):
        """One request's state from position 0; serial backends hold their lock throughout."""
        with (self._lock if self.serial else contextlib.nullcontext()):
            yield self._new_sequence(adapter)

    def _new_sequence(self, adapter: Optional[Loaded]):
        raise NotImplementedError


# -- the PyTorch reference --------------------------------------------------------------------------

class TorchBackend(Backend):
    """Our model from the export's base, wrapped in `SlottedModel`: the graph every exporter
    captures, in eager PyTorch (fp32). It reads the export's packed blobs whatever the target
    (a Core ML export included, which cannot run on Linux). It does not quantise: against an
    int4/int8 export it is the fp32 reference, and the texts may differ by the quantisation."""

    name = "torch"
    serial = True  # the KV cache is a buffer of the model

    def __init__(self, export_dir: Path, manifest: dict):
        super().__init__(export_dir, manifest)
        from ..base import load_base
        from ..models.slots import SlottedModel, zero_slots

        base = load_base(manifest["base"])
        if base.fingerprint != manifest["base_fingerprint"]:
            raise OdloraError(f"{export_dir}: exported from base {manifest['base_fingerprint'][:19]}..., but "
                              f"{manifest['base']!r} is now {base.fingerprint[:19]}... (a different base)")
        if self.max_seq_len > base.model.args.max_seq_len:
            raise OdloraError(f"{export_dir}: max_seq_len {self.max_seq_len} exceeds the base's {base.model.args.max_seq_len}")
        self.session = SlottedModel(base.model, self.spec).eval()
        base.model.setup_cache(1, self.max_seq_len)
        self._zeros = list(zero_slots(self.spec).values())

    def _new_sequence(self, adapter):
        return TorchSequence(self.session, adapter.native if adapter is not None else self._zeros)


class TorchSequence:
    def __init__(self, model, slots: list[torch.Tensor]):
        self.model, self.slots = model, slots

    @torch.no_grad()
    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        tokens = torch.tensor([list(tokens)], dtype=torch.long)
        positions = torch.arange(start, start + tokens.shape[1])
        return self.model(tokens, positions, *self.slots)[0, -1]


# -- choosing one ---------------------------------------------------------------------------------

def open_backend(export_dir: Path, manifest: dict, backend: Optional[str] = None, threads: Optional[int] = None) -> Backend:
    """The backend for `manifest`'s target, or `backend` ("torch": the reference, for any target)."""
    exported = manifest["target"]
    name = {"onnxruntime": "onnx"}.get(backend, backend) or exported
    if name not in BACKENDS:
        raise OdloraError(f"unknown runtime backend {backend!r} (backends: {', '.join(BACKENDS)})")
    if name != "torch" and name != exported:
        raise OdloraError(f"{export_dir} is a {exported} export: it runs on the {exported} backend or on the "
                          f"torch reference, not on {name}")
    if name == "torch":
        return TorchBackend(export_dir, manifest)  # torch's threads are process-wide: not set here
    spec = target(name)
    if spec.runs_on and sys.platform not in spec.runs_on:
        raise OdloraError(f"{export_dir} is a {name} export: {spec.runs_on_why}, not on {sys.platform}; "
                          f"use backend='torch' for the reference here")
    if importlib.util.find_spec(spec.requires) is None:
        raise OdloraError(f"running a {name} export needs the `{spec.requires}` package: "
                          f"pip install 'ondevice-lora[export]'")
    backend_class = importlib.import_module(spec.runtime).BACKEND
    if backend_class is None:
        raise OdloraError(f"the {name} runtime backend is not implemented yet; use backend='torch' for the reference")
    return backend_class(export_dir, manifest, threads)
