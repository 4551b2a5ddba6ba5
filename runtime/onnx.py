"""ONNX Runtime: an ONNX export (`exporters/onnx.py`) opened once, adapters swapped per sequence.

The KV caches are graph inputs and outputs, so each sequence owns its state and requests run in
parallel on one InferenceSession (ORT's Run is thread-safe). A packed adapter is an
`onnxruntime.LoraAdapter` (the file memory-mapped) made active by a per-sequence
`RunOptions.add_active_adapter`. ORT's Python API loads a LoraAdapter only from a file, so
in-memory adapters (blends, strengths) are fed as plain graph inputs instead: the slot inputs
have overridable zero initializers, and an input in the feed dict replaces them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import OdloraError
from ..formats.blobs import onnx_model_version, onnx_slot_shapes
from ..formats.manifest import read_manifest
from ..formats.slots import SlotSpec
from .backends import Backend, Loaded, tensors_nbytes

class OnnxSession:
    """An ONNX Runtime export opened once; adapters swap per call.

        s = OnnxSession("out/")
        ad = s.load_adapter("my.onnx_adapter")
        logits, caches = s.forward([prompt_ids], range(len(prompt_ids)), s.new_cache(), ad)   # or ad=None: the base
    """

    def __init__(self, export_dir: Path, threads: Optional[int] = None, verify: bool = True):
        import onnxruntime as ort

        self.dir = Path(export_dir)
        self.manifest = read_manifest(self.dir, verify=verify)
        if self.manifest["target"] != "onnx":
            raise OdloraError(f"{export_dir}: a {self.manifest['target']} export, not an onnx one")
        info = self.manifest["onnx"]
        self.cache_layout = info["cache_layout"]
        self.slot_shapes = onnx_slot_shapes(self.manifest)
        self.model_version = onnx_model_version(self.manifest["base_fingerprint"])
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT warns once per overridable initializer: by design here
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.dir / info["model"]), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def max_seq_len(self) -> int:
        return self.cache_layout["shape"][2]

    @property
    def in_place(self) -> bool:
        """Whether present may share past's buffer (the graph updates the cache in place)."""
        return self.cache_layout.get("in_place", False)

    def load_adapter(self, path: Path):
        """Check an `.onnx_adapter` file against this export and memory-map it (a LoraAdapter)."""
        import onnxruntime as ort

        self.read_adapter(path)  # checked; ORT maps the file itself
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        return adapter

    def read_adapter(self, path: Path):
        """Check an `.onnx_adapter` file against this export; returns its AdapterFormat (in memory)."""
        return read_adapter_format(path, self.model_version, self.slot_shapes)

    def new_cache(self) -> list:
        """A request's KV caches. An in-place graph reads only the rows it has written, so its
        caches are left unset (zeroing 24 MB took 2.9 ms of every request at max_seq_len 512); the
        older graph attends over every row under a mask, and a NaN there would survive it."""
        import onnxruntime as ort

        shape = self.cache_layout["shape"]
        if self.in_place:
            return [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32) for _ in self.cache_layout["past"]]
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in self.cache_layout["past"]]

    @staticmethod
    def _options(adapter):
        """Per call, so concurrent calls may each run their own adapter (or none) on one session."""
        import onnxruntime as ort

        if adapter is None:
            return None
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        return options

    def forward(self, tokens, input_pos, caches: Sequence, adapter=None):
        """tokens (1, T) and input_pos (T,) ints; caches from `new_cache()` or a previous call.
        Returns (logits (1, T, vocab) numpy, the updated caches)."""
        import onnxruntime as ort

        tokens = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        input_pos = np.asarray(input_pos, dtype=np.int64).reshape(-1)
        feeds = {"tokens": ort.OrtValue.ortvalue_from_numpy(tokens),
                 "input_pos": ort.OrtValue.ortvalue_from_numpy(input_pos)}
        for name, cache in zip(self.cache_layout["past"], caches):
            if not isinstance(cache, ort.OrtValue):
                cache = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(cache, np.float32))
            feeds[name] = cache
        out = self.session.run_with_ort_values(self.output_names, feeds, self._options(adapter))
        return out[0].numpy(), list(out[1:])


def read_adapter_format(path: Path, model_version: int, slot_shapes: dict):
    """An `.onnx_adapter` file read into memory, checked against an export's model version (its
    base) and slot input shapes (`formats.blobs`)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise OdloraError(f"{path}: no such adapter file")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = fmt.get_parameters()
    except Exception as e:  # ORT raises its own types for a damaged flatbuffer
        raise OdloraError(f"{path}: not a readable ONNX Runtime adapter ({type(e).__name__}: {e})") from None
    if fmt.get_model_version() != model_version:
        raise OdloraError(f"{path}: packed for another base (model version {fmt.get_model_version()}, "
                          f"this export's is {model_version}); pack the adapter against this export")
    shapes = {name: list(v.shape()) for name, v in params.items()}
    if shapes != slot_shapes:
        name = sorted(set(shapes) ^ set(slot_shapes)) or [n for n in shapes if shapes[n] != slot_shapes[n]]
        raise OdloraError(f"{path}: its tensors do not match this export's slots (first difference: {name[0]}, "
                          f"{shapes.get(name[0])} vs {slot_shapes.get(name[0])}); pack it against this export")
    return fmt


def read_slots(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """An `.onnx_adapter` blob as stacked (L, ...) slot tensors, checked against `manifest`'s base."""
    fmt = read_adapter_format(path, onnx_model_version(manifest["base_fingerprint"]), onnx_slot_shapes(manifest))
    params = {name: torch.from_numpy(np.array(v.numpy(), copy=True)) for name, v in fmt.get_parameters().items()}
    return stack_layers(params, SlotSpec.from_dict(manifest["slots"]).layout())


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


# -- the backend the runtime opens ---------------------------------------------------------------

class OnnxAdapter:
    """A packed adapter (`lora`, made active per run) or in-memory slot inputs (`feeds`)."""

    def __init__(self, lora=None, feeds: Optional[dict] = None):
        self.lora, self.feeds = lora, feeds or {}


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, export_dir: Path, manifest: dict, threads: Optional[int] = None):
        super().__init__(export_dir, manifest)
        self.session = OnnxSession(export_dir, threads=threads, verify=False)  # the runtime verified it

    def load_packed(self, path: Path) -> Loaded:
        size = Path(path).stat().st_size
        if self.session.in_place:
            # ONNX Runtime's IO binding, which the in-place cache needs, ignores a RunOptions' active
            # LoraAdapter (measured on ORT 1.32): its tensors are bound as plain inputs instead.
            fmt = self.session.read_adapter(path)  # checks the base (model version) and the slot shapes
            adapter = OnnxAdapter(feeds=fmt.get_parameters())
            adapter.arrays = fmt  # the parameters' memory
            return Loaded(adapter, size)
        lora = self.session.load_adapter(path)
        return Loaded(OnnxAdapter(lora=lora), size)  # memory-mapped: the file's bytes

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
    """One request's state on the shared session: its KV caches and its adapter's run options.

    On an export whose caches update in place (`cache_layout.in_place`) the sequence holds one IO
    binding with every past input and its present output bound to the same buffer, and the
    adapter's inputs bound, all once: a decode step rebinds only its tokens, positions and logits,
    and writes its new cache rows where they are instead of returning a copy of every layer's cache.
    """

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
        self.binding = self._bind_state() if session.in_place else None

    def _bind_state(self):
        """The IO binding of what stays for the whole sequence: caches (past = present) and slot inputs."""
        s = self.session
        binding = s.session.io_binding()
        binding.bind_output("logits")  # first: get_outputs() lists the outputs in the order they were bound
        for past, present, cache in zip(s.cache_layout["past"], s.cache_layout["present"], self.caches):
            binding.bind_ortvalue_input(past, cache)
            binding.bind_ortvalue_output(present, cache)
        for name, value in self.extra.items():
            binding.bind_ortvalue_input(name, value)
        return binding

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        import onnxruntime as ort

        s = self.session
        tokens = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        step = {"tokens": ort.OrtValue.ortvalue_from_numpy(tokens),
                "input_pos": ort.OrtValue.ortvalue_from_numpy(np.arange(start, start + tokens.shape[1], dtype=np.int64))}
        if self.binding is not None:
            for name, value in step.items():
                self.binding.bind_ortvalue_input(name, value)
            self.binding.bind_output("logits")  # its shape follows this call's token count
            s.session.run_with_iobinding(self.binding, self.options)
            logits = self.binding.get_outputs()[0]
        else:
            feeds = {**step, **dict(zip(s.cache_layout["past"], self.caches)), **self.extra}
            out = s.session.run_with_ort_values(s.output_names, feeds, self.options)
            logits, self.caches = out[0], list(out[1:])  # present -> next call's past
        return torch.from_numpy(logits.numpy()[0, -1].copy())


BACKEND = OnnxBackend
