"""ExecuTorch: an ExecuTorch export (`exporters/executorch.py`) loaded once, adapters swapped per call.

The KV cache is a mutable buffer inside the loaded program, shared by its methods, so sequences
take the backend's lock and run one at a time. A packed adapter (`.slots`) is safetensors of the
slot tensors at the adapter's own rank, passed to the program as per-layer method inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..errors import OdloraError
from ..formats.blobs import EXECUTORCH_SLOTS_FORMAT
from ..formats.manifest import read_manifest
from ..formats.slots import SlotSpec
from ..quiet import native_stderr_hidden, package_skipped
from ..models.slots import per_layer, zero_slots
from .adapters import transposed_slot_inputs
from .backends import Backend, Loaded, tensors_nbytes


def read_slots(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Load a packed adapter as the export's full-rank slot tensors, checking it was packed for
    this export's base and slot layout."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise OdloraError(f"{path}: no such packed adapter") from None
    except (SafetensorError, OSError) as e:
        raise OdloraError(f"{path}: not a packed ExecuTorch adapter ({e})") from None
    if meta.get("format") != EXECUTORCH_SLOTS_FORMAT:
        raise OdloraError(f"{path}: not a packed ExecuTorch adapter (format {meta.get('format')!r})")
    if meta.get("base_fingerprint") != manifest["base_fingerprint"]:
        raise OdloraError(f"{path}: packed for base {str(meta.get('base_fingerprint'))[:19]}..., "
                          f"this export is {manifest['base_fingerprint'][:19]}... (a different base)")
    spec = SlotSpec.from_dict(manifest["slots"])
    rank = int(meta.get("rank", spec.max_rank))
    mismatch = spec.stored_mismatch(tensors, rank)
    if mismatch:
        raise OdloraError(f"{path}: slot tensor {mismatch[0]} is missing or not {mismatch[1]}")
    return spec.resize_rank(tensors, rank, spec.max_rank)


class ExecutorchSession:
    """An ExecuTorch export loaded once, run with any packed adapter or none (exactly the base).

        session = ExecutorchSession("out/")
        adapter = session.load_adapter("my-adapter.slots")
        logits = session.forward(prompt_ids, 0, adapter)            # (1, T, vocab)

    The KV cache lives in the program (mutable buffers shared by `forward` and `prefill`). No reset
    between sequences is needed: a call at positions p.. reads only cache slots before p, so a new
    sequence from position 0 never sees the old one. Adapters may change between any two calls,
    but a sequence's cache holds keys and values computed under the adapter active at the time.
    """

    def __init__(self, export_dir: Path, threads: Optional[int] = None):
        Runtime = executorch_runtime()
        self.dir = Path(export_dir)
        self.manifest = read_manifest(self.dir, verify=False)
        if self.manifest["target"] != "executorch":
            raise OdloraError(f"{self.dir}: a {self.manifest['target']} export, not an ExecuTorch one")
        fields = self.manifest["executorch"]
        check_backend(fields.get("backend", "xnnpack"), self.dir)
        data = self.dir / fields["data"] if fields.get("data") else None
        with native_stderr_hidden():  # ExecuTorch's info lines (CPU probing, the thread pool)
            if threads:
                from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
                _unsafe_reset_threadpool(threads)
            self.program = Runtime.get().load_program(self.dir / fields["program"], data_path=data)
            self.decode = self.program.load_method("forward")
            self.prefill = self.program.load_method("prefill")
        self.chunk = fields["methods"]["prefill"]
        self.max_seq_len = self.manifest["max_seq_len"]
        self.spec = SlotSpec.from_dict(self.manifest["slots"])
        self._zeros = zero_slots(self.spec)  # the base, allocated once
        self._zero_inputs = self.slot_inputs(self._zeros)
        self._adapter = self._adapter_inputs = None

    def slot_inputs(self, slots: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Stacked slot tensors -> the program's slot inputs: AT/BT per layer and group at rank R
        (`transposed_slot_inputs`) as batches of one, or an older export's per-layer views of A and B."""
        feed = self.manifest["executorch"].get("slot_feed")
        if feed is None:
            return per_layer(slots)
        arrays = transposed_slot_inputs(slots, self.spec, feed, rank=self.spec.max_rank)
        return [torch.from_numpy(arrays[name])[None] for name in self.manifest["executorch"]["inputs"][2:]]

    def load_adapter(self, path: Path) -> dict[str, torch.Tensor]:
        return read_slots(path, self.manifest)

    def _inputs_for(self, adapter) -> list[torch.Tensor]:
        if adapter is None:
            return self._zero_inputs
        if isinstance(adapter, list):
            return adapter
        if adapter is not self._adapter:  # the last adapter's inputs, kept
            self._adapter, self._adapter_inputs = adapter, self.slot_inputs(adapter)
        return self._adapter_inputs

    def _run(self, method, tokens, positions, slots) -> torch.Tensor:
        return method.execute([tokens.contiguous(), positions.contiguous(), *slots])[0]

    def forward(self, tokens, input_pos, adapter=None) -> torch.Tensor:
        """Logits (1, T, vocab) for T tokens at consecutive positions from `input_pos` (an int
        or the (T,) positions), writing their keys and values into the cache. `adapter`: None (the
        base), stacked slot tensors (`load_adapter`) or their program inputs (`slot_inputs`)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
        T = tokens.shape[1]
        start = int(input_pos) if isinstance(input_pos, int) else int(torch.as_tensor(input_pos).reshape(-1)[0])
        positions = torch.arange(start, start + T)
        if not isinstance(input_pos, int) and not torch.equal(torch.as_tensor(input_pos).reshape(-1), positions):
            raise OdloraError("input_pos must be consecutive positions")
        if start < 0 or start + T > self.max_seq_len:
            raise OdloraError(f"positions {start}..{start + T - 1} are outside this export's {self.max_seq_len}")
        slots = self._inputs_for(adapter)
        if T == 1:
            return self._run(self.decode, tokens, positions, slots)
        C, done, outs = self.chunk, 0, []
        while T - done >= C:
            outs.append(self._run(self.prefill, tokens[:, done:done + C], positions[done:done + C], slots))
            done += C
        rest = T - done
        if rest and T >= C:
            # Right-align the last chunk: its first C - rest tokens are recomputed and rewrite the
            # same keys and values.
            outs.append(self._run(self.prefill, tokens[:, T - C:], positions[T - C:], slots)[:, C - rest:])
        elif rest and start + C <= self.max_seq_len:
            # Pad a short prompt to C tokens: the pad positions are written but never read, since
            # every later call reads only the slots before its own first position.
            padded = torch.cat((tokens, torch.zeros(1, C - rest, dtype=torch.long)), dim=1)  # T == rest here
            outs.append(self._run(self.prefill, padded, torch.arange(start, start + C), slots)[:, :rest])
        elif rest:  # too close to the end of the cache to pad: one token at a time
            outs += [self._run(self.decode, tokens[:, i:i + 1], positions[i:i + 1], slots) for i in range(done, T)]
        return torch.cat(outs, dim=1)


def executorch_runtime():
    """ExecuTorch's Python `Runtime` class, loaded without ExecuTorch's exporter.

    `executorch.runtime` imports `executorch.exir._warnings` (one decorator) and, through its
    package, all of `executorch.exir`: the exporter, torchao included, whose import prints two
    "Failed to load" lines and a torch deprecation warning and takes seconds. Loading that one
    module from its file first keeps the exporter out of a process that only runs programs.
    """
    with package_skipped("executorch.exir._warnings"):
        from executorch.runtime import Runtime

    import executorch.kernels.quantized  # noqa: F401  registers the quantised embedding kernels

    return Runtime


def check_backend(backend: str, export_dir: Path) -> None:
    """Refuse, in a line, an export lowered to a delegate this ExecuTorch runtime does not include
    (the wheel registers XNNPACK, OpenVINO and QNN; Vulkan and Core ML run on their devices only)."""
    from executorch.extension.pybindings.portable_lib import _get_registered_backend_names

    registered = [name.lower() for name in _get_registered_backend_names()]
    if not any(name.startswith(backend.lower()) for name in registered):
        raise OdloraError(f"{export_dir} is lowered to ExecuTorch's {backend} delegate, which this runtime does "
                          f"not include (it has {', '.join(sorted(registered))}): run it on its device's runtime")
    if backend == "openvino":
        try:
            import openvino  # noqa: F401  the backend loads OpenVINO's libraries from this package
        except ImportError:
            raise OdloraError(f"{export_dir} is lowered to OpenVINO: pip install 'ondevice-lora[openvino]'") from None


# -- the backend the runtime opens ---------------------------------------------------------------

class ExecutorchBackend(Backend):
    name = "executorch"
    serial = True  # the KV cache is a mutable buffer inside the loaded program

    def __init__(self, export_dir: Path, manifest: dict, threads: Optional[int] = None):
        super().__init__(export_dir, manifest)
        self.session = ExecutorchSession(export_dir, threads=threads)

    def load_packed(self, path: Path) -> Loaded:
        return self.from_slots(self.session.load_adapter(path))  # checks format, base and layout

    def from_slots(self, slots: dict[str, torch.Tensor]) -> Loaded:
        """The program's inputs, built once: a swap is then a lookup."""
        inputs = self.session.slot_inputs({name: slots[name].float() for name in self.spec.layout()})
        return Loaded(inputs, tensors_nbytes(inputs))

    def _new_sequence(self, adapter):
        return ExecutorchSequence(self.session, adapter.native if adapter is not None else None)


class ExecutorchSequence:
    def __init__(self, session, slots: Optional[list]):
        self.session, self.slots = session, slots

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        # A new sequence starts at 0 and each call reads only cache slots before its own start,
        # so what earlier requests left in the shared cache is never read.
        return self.session.forward(tokens, start, self.slots)[0, -1]


BACKEND = ExecutorchBackend
