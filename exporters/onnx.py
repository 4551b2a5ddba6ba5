"""ONNX Runtime target: one `.onnx` graph (+ external data) with the KV cache and adapter slots as IO.

    odlora export --target onnx --quant int4 out/          # or fp32 (default), int8
    odlora adapter pack my-adapter out/ my.onnx_adapter

The graph, one for prefill and decode (T is dynamic, the cache length is fixed):

    (tokens[1,T] int64, input_pos[T] int64,
     past_key_0, past_value_0, ..., past_value_{L-1}      each (1, n_kv, max_seq_len, head_dim) fp32,
     lora_A_qkv.0, lora_B_qkv.0, ..., lora_B_down.{L-1})  layer i of each SlotSpec.layout() tensor
      -> (logits[1,T,vocab], present_key_0, present_value_0, ...)

Rewrites before torch.export, pure functions on the model (the model file stays export-generic):
`replace_attention_with_fused` (each layer's attention as one ONNX Runtime GroupQueryAttention
node: RoPE, cache update and grouped-query attention over the filled positions; see
`onnx_attention.py`) and `replace_kv_cache_with_io` (ONNX Runtime wants a functional graph:
past-in / present-out tensors instead of in-place buffers; present = past with positions
`input_pos` overwritten). A runtime feeds present back as the next call's past, or binds both to
one buffer, which the node then updates in place (`runtime/onnx.py`; the manifest's
`cache_layout.in_place`). The slotted linears are
`models.slots.SlottedModel`'s, fed one graph input per layer (see `CacheIOModel` for why).

Slots: every slot input also has an all-zero *sparse* initializer of the same name. ONNX Runtime
treats an initializer that is also a graph input as overridable: with no adapter active it uses
the zeros (exactly the base, and no bytes in the files), and the runtime feeds an adapter's
tensors under those names (read from an `.onnx_adapter` file from `pack_slots`: fp16 at the
adapter's own rank, padded to R when it is loaded; `runtime/onnx.py`). Measured on ORT 1.32: an *empty* default (`[L,0,in]`, what
Olive's ExtractAdapters writes for its per-projection inputs) breaks here, because ORT fuses our
fixed-rank slices into a Split that rejects a zero-size axis; full-size dense zeros work too but
cost 4·|slots| bytes on disk.

int8/int4 quantise the frozen base weights to ONNX Runtime's MatMulNBits and the embedding to
GatherBlockQuantized (`onnx_quant.py`, which says why not ORT's own quantizer). Slot inputs are
never quantised: their MatMuls read graph inputs, not initializers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import OdloraError
from ..formats.blobs import ONNX_ADAPTER_VERSION, onnx_model_version, onnx_slot_shapes
from ..formats.slots import SlotSpec
from ..models.llama import Attention
from ..models.slots import SlottedModel, zero_slots
from ..quiet import quiet
from . import onnx_attention, onnx_norm
from .onnx_attention import check_head_dim
from .onnx_graph import fuse_shared_input_matmuls
from .onnx_quant import quantize_weights

QUANTS = ("fp32", "int8", "int4")
FAMILIES = ("llama",)  # the model families (`models.family_of`) it knows the structure of
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 21


# -- graph rewrites (pure functions, applied before torch.export) -------------------------------

class KVCacheIO:
    """A functional stand-in for `KVCache`: the past caches are graph inputs (set per call) and the
    attention keeps the updated ones in `present`, which become graph outputs."""

    def __init__(self):
        self.k_cache: Optional[torch.Tensor] = None  # (B, n_kv, max_seq, hd), a graph input
        self.v_cache: Optional[torch.Tensor] = None
        self.present: Optional[tuple[torch.Tensor, torch.Tensor]] = None


def replace_kv_cache_with_io(model: nn.Module) -> list[KVCacheIO]:
    """Give every attention layer a `KVCacheIO` (replacing any `KVCache` module); returns them in layer order."""
    caches = []
    for layer in model.model.layers:
        attn = layer.self_attn
        attn._modules.pop("kv_cache", None)  # a registered KVCache module cannot be overwritten by a plain object
        attn.kv_cache = KVCacheIO()
        caches.append(attn.kv_cache)
    return caches


class FusedAttention(Attention):
    """The same attention as one GroupQueryAttention node (`onnx_attention.py`): RoPE, the cache
    update and grouped-query attention over the filled positions. `rope` holds the (cos, sin)
    tables of the export's positions, the graph's constants."""

    rope: tuple[torch.Tensor, torch.Tensor]

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if hasattr(self, "q_norm"):  # Qwen3: each head normalised before RoPE
            q = self.q_norm(q.view(B, T, -1, self.head_dim)).reshape(B, T, -1)
            k = self.k_norm(k.view(B, T, -1, self.head_dim)).reshape(B, T, -1)
        cache = self.kv_cache
        y, present_k, present_v = torch.ops.odlora.group_query_attention(
            q, k, v, cache.k_cache, cache.v_cache, input_pos, *self.rope, self.n_heads, self.n_kv_heads)
        cache.present = (present_k, present_v)
        return self.o_proj(y)


def replace_attention_with_fused(model: nn.Module, max_seq_len: int) -> None:
    """Swap every `Attention` for `FusedAttention` (same modules and weights, new forward)."""
    check_head_dim(model.args.head_dim)
    half = model.args.head_dim // 2  # llama.py's tables repeat each frequency in both halves
    rope = (model.rope_cos[:max_seq_len, :half].contiguous(), model.rope_sin[:max_seq_len, :half].contiguous())
    for layer in model.model.layers:
        if type(layer.self_attn) is not Attention:
            raise OdloraError(f"cannot export attention of type {type(layer.self_attn).__name__} to onnx")
        layer.self_attn.__class__ = FusedAttention
        layer.self_attn.rope = rope


def cache_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]


def per_layer_slots(slots: dict[str, torch.Tensor], spec: SlotSpec) -> dict[str, torch.Tensor]:
    """Stacked slot tensors (`slot_tensors`' output) -> the graph's per-layer slot inputs."""
    return {f"{name}.{layer}": slots[name][layer] for layer in range(spec.n_layers) for name in spec.layout()}


class CacheIOModel(nn.Module):
    """`forward(tokens, input_pos, *past_caches, *per_layer_slots) -> (logits, *present_caches)`.

    The slotted linears are `SlottedModel`'s, but each layer's slice of a slot tensor is its own
    graph input (`SlotSpec.per_layer_names`): with the stacked (L, ...) inputs of `SlottedModel.forward`
    ONNX Runtime copies every layer's slice out of the stack on every call (Gather/Split), which
    measured 37% over the slot-free graph per int4 decode step against 13% for per-layer inputs
    (1 thread, CPU time, default base, r <= 16 on all seven linears).
    """

    def __init__(self, model: nn.Module, spec: SlotSpec, max_seq_len: int):
        super().__init__()
        replace_attention_with_fused(model, max_seq_len)
        onnx_norm.replace_norms_with_fused(model)
        self.caches = replace_kv_cache_with_io(model)
        self.slotted = SlottedModel(model, spec)

    def forward(self, tokens, input_pos, *flat):
        n = 2 * len(self.caches)
        for i, cache in enumerate(self.caches):
            cache.k_cache, cache.v_cache = flat[2 * i], flat[2 * i + 1]
        slots = iter(flat[n:])  # SlotSpec.per_layer_names order: layer-major, then spec.layout() order
        for groups in self.slotted.groups:
            named = {name: next(slots) for name in self.slotted.slot_names}
            for group_name, group in groups.items():
                group.set(named[f"lora_A_{group_name}"], named[f"lora_B_{group_name}"])
        logits = self.slotted.model(tokens, input_pos=input_pos)
        present = [t for cache in self.caches for t in cache.present]
        for cache in self.caches:  # drop references to this call's tensors
            cache.k_cache = cache.v_cache = cache.present = None
        for groups in self.slotted.groups:
            for group in groups.values():
                group.set(None, None)
        return (logits, *present)


# -- export ------------------------------------------------------------------------------------

def export_program(model: nn.Module, spec: SlotSpec, out_dir: Path, quant: str, max_seq_len: int,
                   config: Optional[dict] = None) -> dict:
    """Write model.onnx + model.onnx.data into out_dir; returns the manifest's "onnx" fields.

    `model` is changed in place (slots and IO caches replace its linears and KV caches). `config`
    is not read: the graph needs nothing from it that the model does not hold.
    """
    import onnx

    if quant not in QUANTS:
        raise OdloraError(f"{quant!r} is not supported for onnx (choose from {', '.join(QUANTS)})", param="quant")
    a = model.args
    cache_shape = [1, a.n_kv_heads, max_seq_len, a.head_dim]
    graph = CacheIOModel(model, spec, max_seq_len).eval()
    T = min(3, max_seq_len)  # not 1: torch.export would specialise T to the example's size
    caches = [torch.zeros(cache_shape) for _ in range(2 * a.n_layers)]
    slots = per_layer_slots(zero_slots(spec), spec).values()
    example = (torch.zeros(1, T, dtype=torch.long), torch.arange(T), *caches, *slots)
    t_dim = torch.export.Dim("T", min=1, max=max_seq_len)
    dynamic = ({1: t_dim}, {0: t_dim}, (None,) * (len(example) - 2))
    inputs = ["tokens", "input_pos", *cache_names(a.n_layers, "past"), *spec.per_layer_names()]
    outputs = ["logits", *cache_names(a.n_layers, "present")]
    with torch.no_grad(), quiet_toolchain():
        program = torch.export.export(graph, example, dynamic_shapes=dynamic, strict=False)
        onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=inputs, output_names=outputs,
                                         opset_version=OPSET, optimize=False, verbose=False,
                                         custom_translation_table={**onnx_attention.translations(),
                                                                                   **onnx_norm.translations()})
        light_optimize(onnx_program.model)
        proto = onnx_program.model_proto
    del onnx_program, program
    for node in proto.graph.node:  # stack traces and module paths: bytes, and this machine's file paths
        del node.metadata_props[:]
    fuse_shared_input_matmuls(proto)
    quantization = quantize_weights(proto, quant)
    add_zero_slot_defaults(proto, spec)
    out_dir = Path(out_dir)
    onnx.save_model(proto, str(out_dir / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    for name in (MODEL_FILE, DATA_FILE):
        os.chmod(out_dir / name, 0o644)  # onnx creates the data file 0600
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"onnx": {
        "model": MODEL_FILE, "external_data": DATA_FILE, "opset": opset, "ir_version": proto.ir_version,
        "inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output),
        "cache_layout": {
            "past": cache_names(a.n_layers, "past"), "present": cache_names(a.n_layers, "present"),
            "shape": cache_shape, "dtype": "float32", "position_axis": 2,
            "update": "present = past with positions input_pos overwritten; feed present as the next past",
            "in_place": True,  # present may be bound to past's buffer (IO binding): the rows are written there
        },
        "slot_inputs": spec.per_layer_names(),
        "slot_input_layout": "<slot>.<layer> is layer <layer> of the stacked slot tensor <slot> (slots.layout)",
        "slot_defaults": "zeros (sparse initializers, overridden by the fed slot inputs)",
        "quantization": quantization,
    }}


def quiet_toolchain():
    """Silence what torch.export / torch.onnx print that is no news to our users (torchvision
    ops skipped, deprecations inside torch); errors still raise."""
    return quiet(("torch.onnx", "torch.export", "torch._export", "onnxruntime.quantization", "onnxscript", "onnx_ir"),
                 (FutureWarning, DeprecationWarning))


def light_optimize(model) -> None:
    """Constant folding (weight transposes become initializers) and clean-up, in place.

    torch.onnx's own `optimize=True` adds onnxscript's pattern rewrites, which took 80% of a
    ~100 s export of the default base; ONNX Runtime applies its own fusions at load anyway.
    """
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model)
    for p in (passes.RemoveUnusedNodesPass(),
              passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
              passes.DeduplicateInitializersPass(), passes.CommonSubexpressionEliminationPass()):
        p(model)


def describe(values) -> list[dict]:
    """Graph inputs/outputs as {"name", "shape", "dtype"}; symbolic dimensions by name."""
    from onnx import helper

    return [{"name": v.name,
             "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
             "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name} for v in values]


def add_zero_slot_defaults(proto, spec: SlotSpec) -> None:
    """An all-zero sparse initializer per slot input: with no adapter active the graph is the base."""
    from onnx import TensorProto, helper

    existing = {i.name for i in proto.graph.initializer} | {s.values.name for s in proto.graph.sparse_initializer}
    for name, tensor in per_layer_slots(zero_slots(spec), spec).items():
        if name in existing:
            raise OdloraError(f"internal: the exported graph already has an initializer named {name}")
        values = helper.make_tensor(name, TensorProto.FLOAT, [0], [])
        indices = helper.make_tensor(f"{name}_indices", TensorProto.INT64, [0], [])
        proto.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(tensor.shape)))


# -- adapters ----------------------------------------------------------------------------------

def pack_slots(slots: dict[str, torch.Tensor], manifest: dict, out_file: Path) -> None:
    """Write one adapter's slot tensors as an ONNX Runtime `.onnx_adapter` file (AdapterFormat).

    Stored small: in fp16, at the adapter's own rank r (the slots' all-zero tail beyond r dropped),
    per layer as the graph names its inputs (adapter version 2). A rank-8 all-linear adapter of the
    default base is 4.9 MB instead of 19.6 MB at fp32 and R = 16; the runtime pads and widens it
    once, when it loads the blob (`runtime/onnx.py` `read_adapter_slots`). fp16 keeps a factor to
    3 significant digits, far inside what int4/int8 bases and the adapters' own noise allow (the
    tests hold the logits to the fp32 slots')."""
    import onnxruntime as ort

    spec = SlotSpec.from_dict(manifest["slots"])
    if list(slots) != list(spec.layout()):
        raise OdloraError(f"slot tensors {list(slots)} do not match the export's layout {list(spec.layout())}")
    expected = onnx_slot_shapes(manifest)
    if set(spec.per_layer_names()) != set(expected):
        raise OdloraError(f"the export's slot inputs {sorted(expected)} are not per layer; re-export it")
    rank = max(1, spec.used_rank(slots))
    params = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t.detach().to(torch.float16).numpy()))
              for name, t in per_layer_slots(spec.resize_rank(slots, spec.max_rank, rank), spec).items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ONNX_ADAPTER_VERSION)
    fmt.set_model_version(onnx_model_version(manifest["base_fingerprint"]))
    fmt.set_parameters(params)
    fmt.export_adapter(str(out_file))
