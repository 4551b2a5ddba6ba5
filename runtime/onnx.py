"""ONNX Runtime: an ONNX export (`exporters/onnx.py`) opened once, adapters swapped per sequence.

The KV caches are graph inputs and outputs, so each sequence owns its state and requests run in
parallel on one InferenceSession (ORT's Run is thread-safe). An adapter is the graph's slot inputs,
fed per call (or bound once per sequence): they have overridable empty initializers (rank 0, the
base), and an input in the feed replaces them. A packed `.onnx_adapter` is read once into those
inputs (`read_slots`, then `transposed_slot_inputs`: each layer and group at its own used rank, in
fp32, in the layout of the manifest's `slot_feed`; a layer or group the adapter leaves at zero is not
fed at all), not fed as an `onnxruntime.LoraAdapter`: ORT's IO binding, which the in-place cache
needs, ignores a RunOptions' active LoraAdapter (measured on ORT 1.32), and a LoraAdapter feeds
tensors only as stored. Exports written before `slot_feed` (fixed-rank `lora_A_<group>.<layer>`
inputs) get the padded full-rank tensors they take (`fixed_rank_slot_inputs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import OdloraError
from ..formats.blobs import ONNX_ADAPTER_VERSIONS, onnx_model_version
from ..formats.manifest import read_manifest
from ..formats.slots import SlotSpec
from .adapters import transposed_slot_inputs
from .backends import Backend, Loaded, tensors_nbytes

class OnnxSession:
    """An ONNX Runtime export opened once; adapters swap per call.

        s = OnnxSession("out/")
        ad = s.load_adapter("my.onnx_adapter")                  # its slot inputs, ready to feed
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
        self.model_version = onnx_model_version(self.manifest["base_fingerprint"])
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT warns once per overridable initializer: by design here
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.dir / info["model"]), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.vocab_size = self.session.get_outputs()[0].shape[-1]

    @property
    def max_seq_len(self) -> int:
        return self.cache_layout["shape"][2]

    @property
    def in_place(self) -> bool:
        """Whether present may share past's buffer (the graph updates the cache in place)."""
        return self.cache_layout.get("in_place", False)

    def load_adapter(self, path: Path) -> "OnnxAdapter":
        """An `.onnx_adapter` file, checked against this export, as the graph's slot inputs."""
        return self.adapter_from_slots(read_slots(path, self.manifest))

    def adapter_from_slots(self, slots: dict[str, torch.Tensor]) -> "OnnxAdapter":
        """Stacked slot tensors (at the export's rank R) as the graph's slot inputs, fp32 OrtValues."""
        import onnxruntime as ort

        info, spec = self.manifest["onnx"], SlotSpec.from_dict(self.manifest["slots"])
        if "slot_feed" in info:
            arrays = transposed_slot_inputs(slots, spec, info["slot_feed"])
        else:
            arrays = fixed_rank_slot_inputs(slots, info["slot_inputs"])
        # The OrtValues borrow the arrays' memory: the adapter keeps the arrays alive with them.
        return OnnxAdapter({name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}, arrays)

    def new_cache(self) -> list:
        """A request's KV caches. An in-place graph reads only the rows it has written, so its
        caches are left unset (zeroing 24 MB took 2.9 ms of every request at max_seq_len 512); the
        older graph attends over every row under a mask, and a NaN there would survive it."""
        import onnxruntime as ort

        shape = self.cache_layout["shape"]
        if self.in_place:
            return [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32) for _ in self.cache_layout["past"]]
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in self.cache_layout["past"]]

    def forward(self, tokens, input_pos, caches: Sequence, adapter: Optional["OnnxAdapter"] = None):
        """tokens (1, T) and input_pos (T,) ints; caches from `new_cache()` or a previous call;
        `adapter` from `load_adapter` (None: the base). Returns (logits (1, T, vocab) numpy, the updated caches)."""
        import onnxruntime as ort

        tokens = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        input_pos = np.asarray(input_pos, dtype=np.int64).reshape(-1)
        feeds = {"tokens": ort.OrtValue.ortvalue_from_numpy(tokens),
                 "input_pos": ort.OrtValue.ortvalue_from_numpy(input_pos)}
        for name, cache in zip(self.cache_layout["past"], caches):
            if not isinstance(cache, ort.OrtValue):
                cache = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(cache, np.float32))
            feeds[name] = cache
        if adapter is not None:
            feeds.update(adapter.feeds)
        out = self.session.run_with_ort_values(self.output_names, feeds)
        return out[0].numpy(), list(out[1:])


def read_adapter_format(path: Path, model_version: int, spec: SlotSpec):
    """An `.onnx_adapter` file read into memory, checked against an export's model version (its
    base) and slots (`formats/slots.py`): every `<slot>.<layer>` tensor at full rank (version 1), or
    at one rank r <= R (version 2). Returns (the AdapterFormat, r)."""
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
    version = fmt.get_adapter_version()
    if version not in ONNX_ADAPTER_VERSIONS:
        raise OdloraError(f"{path}: adapter version {version}; this odlora reads {ONNX_ADAPTER_VERSIONS}")
    shapes = {name: list(v.shape()) for name, v in params.items()}
    rank = spec.max_rank
    if version > 1:
        first_b = next((shape for name, shape in shapes.items() if name.startswith("lora_B_")), None)
        rank = first_b[-1] if first_b else 0  # one rank for the whole blob: B's last axis
    expected = {name: spec.shape(name.rpartition(".")[0], rank)[1:] for name in spec.per_layer_names()}
    if shapes != expected or not 1 <= rank <= spec.max_rank:
        name = sorted(set(shapes) ^ set(expected)) or [n for n in shapes if shapes[n] != expected[n]] or ["rank"]
        raise OdloraError(f"{path}: its tensors do not match this export's slots (first difference: {name[0]}, "
                          f"{shapes.get(name[0])} vs {expected.get(name[0])}); pack it against this export")
    return fmt, rank


def read_slots(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """An `.onnx_adapter` blob as stacked (L, ...) fp32 slot tensors at the export's rank R, checked
    against `manifest`'s base and slots."""
    spec = SlotSpec.from_dict(manifest["slots"])
    fmt, rank = read_adapter_format(path, onnx_model_version(manifest["base_fingerprint"]), spec)
    params = {name: torch.from_numpy(np.array(v.numpy(), np.float32)) for name, v in fmt.get_parameters().items()}
    stacked = stack_layers(params, spec.layout())
    return stacked if rank == spec.max_rank else spec.resize_rank(stacked, rank, spec.max_rank)


def stack_layers(tensors: dict[str, torch.Tensor], layout: dict) -> dict[str, torch.Tensor]:
    """`<slot>.<layer>` tensors -> stacked (L, ...) slot tensors."""
    return {name: torch.stack([tensors[f"{name}.{i}"] for i in range(shape[0])]) for name, shape in layout.items()}


def fixed_rank_slot_inputs(slots: dict[str, torch.Tensor], names: list[str]) -> dict[str, np.ndarray]:
    """Stacked slot tensors -> an older export's slot inputs `names`: fixed rank R, per layer
    (`lora_A_qkv.0`) or stacked (`lora_A_qkv`)."""
    out = {}
    for name in names:
        slot, _, layer = name.rpartition(".")
        tensor = slots[name] if name in slots else slots[slot][int(layer)]
        out[name] = np.ascontiguousarray(tensor.float().numpy())
    return out


# -- the backend the runtime opens ---------------------------------------------------------------

class OnnxAdapter:
    """An adapter as the graph's slot inputs: `feeds` (name -> OrtValue) over `arrays` (their memory)."""

    def __init__(self, feeds: dict, arrays: dict):
        self.feeds, self.arrays = feeds, arrays

    @property
    def nbytes(self) -> int:
        return tensors_nbytes(self.arrays.values())


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, export_dir: Path, manifest: dict, threads: Optional[int] = None):
        super().__init__(export_dir, manifest)
        self.session = OnnxSession(export_dir, threads=threads, verify=False)  # the runtime verified it

    def load_packed(self, path: Path) -> Loaded:
        adapter = self.session.load_adapter(path)  # checks the base (model version) and the slot shapes
        return Loaded(adapter, adapter.nbytes)

    def from_slots(self, slots: dict[str, torch.Tensor]) -> Loaded:
        adapter = self.session.adapter_from_slots(slots)
        return Loaded(adapter, adapter.nbytes)

    def _new_sequence(self, adapter):
        return OnnxSequence(self.session, adapter.native if adapter is not None else None)


class OnnxSequence:
    """One request's state on the shared session: its KV caches and its adapter's slot inputs.

    On an export whose caches update in place (`cache_layout.in_place`) the sequence holds one IO
    binding with every past input and its present output bound to the same buffer, and the
    adapter's inputs bound, all once: a decode step rebinds only its tokens, positions and logits,
    and writes its new cache rows where they are instead of returning a copy of every layer's cache.
    The logits land in an array the sequence owns (one for all one-token steps), so a step reads
    them without asking ORT for its outputs (which wraps every cache too: ~0.25 ms a step).
    """

    def __init__(self, session, adapter: Optional[OnnxAdapter]):
        self.session, self.caches = session, session.new_cache()
        self.extra = adapter.feeds if adapter is not None else {}
        self._adapter = adapter  # alive while the sequence runs, even if the cache evicts it
        self.binding = self._bind_state() if session.in_place else None
        self._step_logits = None  # (array, OrtValue) of shape (1, 1, vocab), made by the first one-token step

    def _bind_state(self):
        """The IO binding of what stays for the whole sequence: caches (past = present) and slot inputs."""
        s = self.session
        binding = s.session.io_binding()
        for past, present, cache in zip(s.cache_layout["past"], s.cache_layout["present"], self.caches):
            binding.bind_ortvalue_input(past, cache)
            binding.bind_ortvalue_output(present, cache)
        for name, value in self.extra.items():
            binding.bind_ortvalue_input(name, value)
        return binding

    def _logits_buffer(self, tokens: int) -> tuple[np.ndarray, object]:
        """An array for this call's logits and the OrtValue over it (reused for one-token steps)."""
        import onnxruntime as ort

        if tokens == 1 and self._step_logits is not None:
            return self._step_logits
        array = np.empty((1, tokens, self.session.vocab_size), np.float32)
        buffer = (array, ort.OrtValue.ortvalue_from_numpy(array))
        if tokens == 1:
            self._step_logits = buffer
        return buffer

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        import onnxruntime as ort

        s = self.session
        tokens = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        step = {"tokens": ort.OrtValue.ortvalue_from_numpy(tokens),
                "input_pos": ort.OrtValue.ortvalue_from_numpy(np.arange(start, start + tokens.shape[1], dtype=np.int64))}
        if self.binding is not None:
            for name, value in step.items():
                self.binding.bind_ortvalue_input(name, value)
            logits, value = self._logits_buffer(tokens.shape[1])
            self.binding.bind_ortvalue_output("logits", value)
            s.session.run_with_iobinding(self.binding)
        else:
            feeds = {**step, **dict(zip(s.cache_layout["past"], self.caches)), **self.extra}
            out = s.session.run_with_ort_values(s.output_names, feeds)
            logits, self.caches = out[0].numpy(), list(out[1:])  # present -> next call's past
        return torch.from_numpy(logits[0, -1].copy())


BACKEND = OnnxBackend
