"""Backends: one exported base loaded once, run with any adapter's slot tensors, per sequence.

    backend = open_backend(export_dir, manifest, "onnx")       # or "executorch", "torch"
    adapter = backend.load_packed(blob)                        # native, checked against the export
    with backend.sequence(adapter) as seq:                     # one request's KV-cache state
        logits = seq.forward(prompt_ids, 0)                    # (vocab,) after the last token
        logits = seq.forward([token], len(prompt_ids))

Every backend takes the same three kinds of adapter: `None` (the slots' zeros: exactly the base),
a packed blob in the export's native format (`load_packed`), and slot tensors built in memory
(`from_slots`: blends and strengths, see `adapters.combine_slots`).

Where the KV cache lives decides concurrency:

    onnx        caches are graph inputs/outputs: each sequence owns its state, requests run in
                parallel on one InferenceSession (ORT's Run is thread-safe)
    executorch  the cache is a mutable buffer inside the loaded program, shared by its methods:
                sequences take the backend's lock and run one at a time
    torch       the reference (our model + SlottedModel, the graph every exporter captures); its
                cache is a module buffer: one sequence at a time too

An ONNX packed adapter is an `onnxruntime.LoraAdapter` (the file memory-mapped) made active by a
per-sequence `RunOptions.add_active_adapter`. ORT's Python API loads a LoraAdapter only from a
file, so in-memory adapters (blends, strengths) are fed as plain graph inputs instead: the slot
inputs have overridable zero initializers, and an input in the feed dict replaces them.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import OdloraError
from ..exporters.slots import SlotSpec

BACKENDS = ("onnx", "executorch", "coreml", "torch")


@dataclass
class Loaded:
    """An adapter ready for one backend: its native form and the bytes it holds."""

    native: object
    nbytes: int


def tensors_nbytes(tensors) -> int:
    return sum(int(t.nbytes) for t in tensors)


# -- packed blobs as slot tensors (any target; for blends and for the torch reference) -----------

def read_slot_tensors(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """A packed blob of `manifest`'s target as fp32 slot tensors in `SlotSpec.layout()` order."""
    target, layout = manifest["target"], SlotSpec.from_dict(manifest["slots"]).layout()
    path = Path(path)
    if target == "executorch":
        from ..exporters.executorch import read_slots

        return read_slots(path, manifest)  # checks format, base and layout
    try:
        if target == "onnx":
            import onnxruntime as ort

            from ..exporters.onnx import model_version

            fmt = ort.AdapterFormat.read_adapter(str(path))
            if fmt.get_model_version() != model_version(manifest["base_fingerprint"]):
                raise OdloraError(f"{path}: packed for another base (ONNX adapter model version "
                                  f"{fmt.get_model_version()}); pack the adapter against this export")
            params = {name: torch.from_numpy(np.array(v.numpy(), copy=True)) for name, v in fmt.get_parameters().items()}
            expected = onnx_slot_shapes(manifest)
            if {n: list(t.shape) for n, t in params.items()} != expected:
                raise OdloraError(f"{path}: its tensors do not match this export's slots: packed for another export")
            tensors = stack_layers(params, layout)
        elif target == "coreml":
            from ..exporters.coreml import read_slots

            tensors = {name: torch.from_numpy(np.asarray(v)) for name, v in read_slots(path).items()}
        else:
            raise OdloraError(f"unknown export target {target!r}")
    except OdloraError:
        raise
    except Exception as e:  # the readers raise their own types for a damaged file
        raise OdloraError(f"{path}: not a readable {target} adapter ({type(e).__name__}: {e})") from None
    for name, shape in layout.items():
        if name not in tensors or list(tensors[name].shape) != shape:
            raise OdloraError(f"{path}: slot tensor {name} is missing or not {shape}: packed for another export")
    return {name: tensors[name].float().contiguous() for name in layout}


def onnx_slot_shapes(manifest: dict) -> dict[str, list]:
    """The ONNX graph's slot inputs by name: per layer (`lora_A_qkv.0`, ...) or stacked (`lora_A_qkv`)."""
    info = manifest["onnx"]
    return {i["name"]: i["shape"] for i in info["inputs"] if i["name"] in info["slot_inputs"]}


def stack_layers(tensors: dict[str, torch.Tensor], layout: dict) -> dict[str, torch.Tensor]:
    """Graph slot inputs -> stacked (L, ...) slot tensors; per-layer inputs are `<slot>.<layer>`."""
    if all(name in tensors for name in layout):
        return {name: tensors[name] for name in layout}
    return {name: torch.stack([tensors[f"{name}.{i}"] for i in range(shape[0])]) for name, shape in layout.items()}


def graph_inputs(slots: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Stacked slot tensors -> the ONNX graph's slot inputs `names` (per layer or stacked)."""
    out = {}
    for name in names:
        slot, _, layer = name.rpartition(".")
        out[name] = slots[name] if name in slots else slots[slot][int(layer)]
    return out


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


# -- ONNX Runtime ---------------------------------------------------------------------------------

class OnnxAdapter:
    """A packed adapter (`lora`, made active per run) or in-memory slot inputs (`feeds`)."""

    def __init__(self, lora=None, feeds: Optional[dict] = None):
        self.lora, self.feeds = lora, feeds or {}


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, export_dir: Path, manifest: dict, threads: Optional[int] = None):
        super().__init__(export_dir, manifest)
        from ..exporters.onnx import OnnxSession

        self.session = OnnxSession(export_dir, threads=threads, verify=False)  # the runtime verified it

    def load_packed(self, path: Path) -> Loaded:
        lora = self.session.load_adapter(path)  # checks the base (model version) and the slot shapes
        return Loaded(OnnxAdapter(lora=lora), Path(path).stat().st_size)  # memory-mapped: the file's bytes

    def from_slots(self, slots: dict[str, torch.Tensor]) -> Loaded:
        import onnxruntime as ort

        inputs = graph_inputs(slots, self.manifest["onnx"]["slot_inputs"])
        arrays = {name: np.ascontiguousarray(t.float().numpy()) for name, t in inputs.items()}
        feeds = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
        # The OrtValues borrow the arrays' memory: keep the arrays alive with them.
        adapter = OnnxAdapter(feeds=feeds)
        adapter.arrays = arrays
        return Loaded(adapter, tensors_nbytes(arrays.values()))

    def _new_sequence(self, adapter):
        return OnnxSequence(self.session, adapter.native if adapter is not None else None)


class OnnxSequence:
    def __init__(self, session, adapter: Optional[OnnxAdapter]):
        import onnxruntime as ort

        self.session, self.caches = session, session.new_cache()
        self.extra = adapter.feeds if adapter is not None else {}
        self.options = None
        if adapter is not None and adapter.lora is not None:
            # Per sequence, never shared: a request's RunOptions names only its own adapter.
            self.options = ort.RunOptions()
            self.options.add_active_adapter(adapter.lora)
        self._adapter = adapter  # alive while the sequence runs, even if the cache evicts it

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        import onnxruntime as ort

        s = self.session
        tokens = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        feeds = {"tokens": ort.OrtValue.ortvalue_from_numpy(tokens),
                 "input_pos": ort.OrtValue.ortvalue_from_numpy(np.arange(start, start + tokens.shape[1], dtype=np.int64)),
                 **dict(zip(s.cache_layout["past"], self.caches)), **self.extra}
        out = s.session.run_with_ort_values(s.output_names, feeds, self.options)
        self.caches = list(out[1:])  # present -> next call's past
        return torch.from_numpy(out[0].numpy()[0, -1].copy())


# -- ExecuTorch -------------------------------------------------------------------------------------

class ExecutorchBackend(Backend):
    name = "executorch"
    serial = True  # the KV cache is a mutable buffer inside the loaded program

    def __init__(self, export_dir: Path, manifest: dict, threads: Optional[int] = None):
        super().__init__(export_dir, manifest)
        from ..exporters.executorch import ExecutorchSession

        self.session = ExecutorchSession(export_dir, threads=threads)

    def load_packed(self, path: Path) -> Loaded:
        slots = self.session.load_adapter(path)  # checks format, base and layout
        return Loaded(slots, tensors_nbytes(slots.values()))

    def from_slots(self, slots: dict[str, torch.Tensor]) -> Loaded:
        ordered = {name: slots[name].float().contiguous() for name in self.spec.layout()}
        return Loaded(ordered, tensors_nbytes(ordered.values()))

    def _new_sequence(self, adapter):
        return ExecutorchSequence(self.session, adapter.native if adapter is not None else None)


class ExecutorchSequence:
    def __init__(self, session, slots: Optional[dict]):
        self.session, self.slots = session, slots

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        # A new sequence starts at 0 and each call reads only cache slots before its own start,
        # so what earlier requests left in the shared cache is never read.
        return self.session.forward(tokens, start, self.slots)[0, -1]


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
        from ..exporters.slots import SlottedModel

        base = load_base(manifest["base"])
        if base.fingerprint != manifest["base_fingerprint"]:
            raise OdloraError(f"{export_dir}: exported from base {manifest['base_fingerprint'][:19]}..., but "
                              f"{manifest['base']!r} is now {base.fingerprint[:19]}... (a different base)")
        if self.max_seq_len > base.model.args.max_seq_len:
            raise OdloraError(f"{export_dir}: max_seq_len {self.max_seq_len} exceeds the base's {base.model.args.max_seq_len}")
        self.session = SlottedModel(base.model, self.spec).eval()
        base.model.setup_cache(1, self.max_seq_len)
        self._zeros = list(self.spec.zeros().values())

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
    target = manifest["target"]
    name = {"onnxruntime": "onnx"}.get(backend, backend) or target
    if name not in BACKENDS:
        raise OdloraError(f"unknown runtime backend {backend!r} (backends: {', '.join(BACKENDS)})")
    if name != "torch" and name != target:
        raise OdloraError(f"{export_dir} is a {target} export: it runs on the {target} backend or on the "
                          f"torch reference, not on {name}")
    if name == "torch":
        return TorchBackend(export_dir, manifest)  # torch's threads are process-wide: not set here
    if name == "onnx":
        _require("onnxruntime", "onnx")
        return OnnxBackend(export_dir, manifest, threads)
    if name == "executorch":
        _require("executorch", "executorch")
        return ExecutorchBackend(export_dir, manifest, threads)
    if sys.platform != "darwin":
        raise OdloraError(f"{export_dir} is a Core ML export: Core ML runs models only on macOS/iOS "
                          f"(coremltools cannot predict on {sys.platform}); use backend='torch' for the reference here")
    raise OdloraError("the Core ML runtime backend is not implemented yet; use backend='torch' for the reference")


def _require(module: str, target: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise OdloraError(f"running a {target} export needs the `{module}` package: pip install 'ondevice-lora[export]'")
