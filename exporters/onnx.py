"""ONNX Runtime target: one `.onnx` graph (+ external data) with the KV cache and adapter slots as IO.

    odlora export --target onnx --quant int4 out/          # or fp32 (default), int8
    odlora adapter pack my-adapter out/ my.onnx_adapter

The graph, one for prefill and decode (T is dynamic, the cache length is fixed):

    (tokens[1,T] int64, input_pos[T] int64,
     past_key_0, past_value_0, ..., past_value_{L-1}      each (1, n_kv, max_seq_len, head_dim) fp32,
     lora_AT_qkv.0, lora_BT_qkv.0, ..., lora_BT_down.{L-1})  each layer's slot inputs, rank dynamic
      -> (logits[1,T,vocab], present_key_0, present_value_0, ...)

Rewrites before torch.export, pure functions on the model (the model file stays export-generic):
`projections.fuse_projections` (q|k|v, o, gate|up and down each one linear with one slot path: see
`projections.py` for the slot inputs' layout and why), `replace_attention_with_fused` (each layer's
attention as one ONNX Runtime GroupQueryAttention node: RoPE, cache update and grouped-query
attention over the filled positions; see `onnx_attention.py`), `replace_mlp_with_fused` and
`replace_kv_cache_with_io` (ONNX Runtime wants a functional graph: past-in / present-out tensors
instead of in-place buffers; present = past with positions `input_pos` overwritten). A runtime feeds
present back as the next call's past, or binds both to one buffer, which the node then updates in
place (`runtime/onnx.py`; the manifest's `cache_layout.in_place`).

After the export, graph passes (`onnx_graph.py`): the weights quantised (`onnx_quant.py`), q|k|v fed
to GroupQueryAttention packed, each residual Add folded into the norm after it
(SkipSimplifiedLayerNormalization), and chains of Adds summed in one node.

Slots: every slot input also has an *empty* initializer of the same name (`[in, 0]`, `[0, width]`).
ONNX Runtime treats an initializer that is also a graph input as overridable: with no adapter fed the
slot path multiplies by rank 0 (exactly the base, no bytes in the files), and the runtime feeds an
adapter's tensors under those names at the adapter's own rank (read from an `.onnx_adapter` file from
`pack_slots`, fp16 at its rank, laid out and widened when it is loaded; `runtime/onnx.py`).

int8/int4 quantise the frozen base weights to ONNX Runtime's MatMulNBits and the embedding to
GatherBlockQuantized (`onnx_quant.py`, which says why not ORT's own quantizer). Slot inputs are
never quantised: their MatMuls read graph inputs, not initializers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..errors import OdloraError
from ..formats.blobs import ONNX_ADAPTER_VERSION, onnx_model_version
from ..formats.slots import SlotSpec
from ..models.llama import MLP, Attention
from ..quiet import quiet
from . import onnx_attention, onnx_norm
from .onnx_attention import check_head_dim
from .onnx_graph import fold_residual_norms, pack_qkv_into_attention, sum_add_chains
from .onnx_quant import quantize_weights
from .projections import fuse_projections, slot_feed, slot_input_names, slotted_projections

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
    update and grouped-query attention over the filled positions. q, k and v come from one
    projection (`self.qkv`), o from `self.o` (`projections.fuse_projections`). `rope` holds the
    (cos, sin) tables of the export's positions, the graph's constants."""

    rope: tuple[torch.Tensor, torch.Tensor]

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.qkv.sizes, dim=-1)
        if hasattr(self, "q_norm"):  # Qwen3: each head normalised before RoPE
            q = self.q_norm(q.view(B, T, -1, self.head_dim)).reshape(B, T, -1)
            k = self.k_norm(k.view(B, T, -1, self.head_dim)).reshape(B, T, -1)
        cache = self.kv_cache
        y, present_k, present_v = torch.ops.odlora.group_query_attention(
            q, k, v, cache.k_cache, cache.v_cache, input_pos, *self.rope, self.n_heads, self.n_kv_heads)
        cache.present = (present_k, present_v)
        return self.o(y)


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


class FusedMLP(MLP):
    """The same SwiGLU MLP over the fused projections: gate|up in one, then down."""

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.gate_up.sizes, dim=-1)
        return self.down(self.activate(gate, up))


def replace_mlp_with_fused(model: nn.Module) -> None:
    for layer in model.model.layers:
        layer.mlp.__class__ = FusedMLP


def cache_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]


class CacheIOModel(nn.Module):
    """`forward(tokens, input_pos, *past_caches, *slot_inputs) -> (logits, *present_caches)`, the
    slot inputs as `projections.slot_input_names` orders them (layer-major: AT, BT per slotted group)."""

    def __init__(self, model: nn.Module, spec: SlotSpec, max_seq_len: int):
        super().__init__()
        self.projections = fuse_projections(model, spec)
        replace_attention_with_fused(model, max_seq_len)
        replace_mlp_with_fused(model)
        onnx_norm.replace_norms_with_fused(model)
        self.caches = replace_kv_cache_with_io(model)
        self.model = model

    def forward(self, tokens, input_pos, *flat):
        n = 2 * len(self.caches)
        for i, cache in enumerate(self.caches):
            cache.k_cache, cache.v_cache = flat[2 * i], flat[2 * i + 1]
        slots = iter(flat[n:])
        slotted = slotted_projections(self.projections)
        for projection in slotted:
            projection.slot = (next(slots), next(slots))
        logits = self.model(tokens, input_pos=input_pos)
        present = [t for cache in self.caches for t in cache.present]
        for cache in self.caches:  # drop references to this call's tensors
            cache.k_cache = cache.v_cache = cache.present = None
        for projection in slotted:
            projection.slot = None
        return (logits, *present)


def example_slot_inputs(graph: CacheIOModel, spec: SlotSpec) -> tuple[list[torch.Tensor], dict]:
    """Example AT/BT tensors at the export's rank R (any rank >= 2 would do: torch.export specialises
    sizes 0 and 1), and each one's dynamic dimension: one per group (m·r columns of AT, rows of BT)."""
    tensors, dims = [], {}
    for layer in graph.projections:
        for group, members in spec.groups().items():
            projection = layer[group]
            dim = dims.setdefault(group, torch.export.Dim(f"rank_{group}", min=0, max=len(members) * 4096))
            rank = len(members) * spec.max_rank
            tensors += [(torch.zeros(projection.in_features, rank), {1: dim}),
                        (torch.zeros(rank, projection.out_features), {0: dim})]
    return [t for t, _ in tensors], [d for _, d in tensors]


# -- export ------------------------------------------------------------------------------------

def export_program(model: nn.Module, spec: SlotSpec, out_dir: Path, quant: str, max_seq_len: int,
                   config: Optional[dict] = None, stage: Callable[[str], None] = lambda name: None) -> dict:
    """Write model.onnx + model.onnx.data into out_dir; returns the manifest's "onnx" fields.

    `model` is changed in place (slots and IO caches replace its linears and KV caches). `config`
    is not read: the graph needs nothing from it that the model does not hold. `stage(name)` is
    told as each stage starts (progress.Stages).
    """
    import onnx

    if quant not in QUANTS:
        raise OdloraError(f"{quant!r} is not supported for onnx (choose from {', '.join(QUANTS)})", param="quant")
    a = model.args
    cache_shape = [1, a.n_kv_heads, max_seq_len, a.head_dim]
    graph = CacheIOModel(model, spec, max_seq_len).eval()
    T = min(3, max_seq_len)  # not 1: torch.export would specialise T to the example's size
    caches = [torch.zeros(cache_shape) for _ in range(2 * a.n_layers)]
    slots, slot_dims = example_slot_inputs(graph, spec)
    example = (torch.zeros(1, T, dtype=torch.long), torch.arange(T), *caches, *slots)
    t_dim = torch.export.Dim("T", min=1, max=max_seq_len)
    dynamic = ({1: t_dim}, {0: t_dim}, (None,) * len(caches) + tuple(slot_dims))
    inputs = ["tokens", "input_pos", *cache_names(a.n_layers, "past"), *slot_input_names(spec)]
    outputs = ["logits", *cache_names(a.n_layers, "present")]
    with torch.no_grad(), quiet_toolchain():
        stage("tracing the model (torch.export)")
        program = torch.export.export(graph, example, dynamic_shapes=dynamic, strict=False)
        stage("converting to ONNX")
        onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=inputs, output_names=outputs,
                                         opset_version=OPSET, optimize=False, verbose=False,
                                         custom_translation_table={**onnx_attention.translations(),
                                                                                   **onnx_norm.translations()})
        light_optimize(onnx_program.model)
        proto = onnx_program.model_proto
    del onnx_program, program
    for node in proto.graph.node:  # stack traces and module paths: bytes, and this machine's file paths
        del node.metadata_props[:]
    stage(f"quantising the weights ({quant})")
    quantization = quantize_weights(proto, quant)
    stage("fusing attention, norms and adds")
    pack_qkv_into_attention(proto)
    fold_residual_norms(proto)
    sum_add_chains(proto)
    add_empty_slot_defaults(proto)
    name_rank_dims(proto)
    out_dir = Path(out_dir)
    stage("writing model.onnx")
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
        "slot_inputs": slot_input_names(spec),
        "slot_input_layout": ("lora_AT_<group>.<layer> (in, m·r) and lora_BT_<group>.<layer> (m·r, width): the "
                              "group's slotted members' A transposed side by side and their B transposed, "
                              "block-diagonal at the columns slot_feed gives; r dynamic (projections.py)"),
        "slot_feed": slot_feed(graph.projections[0], spec),
        "slot_defaults": "empty (rank 0: the base), overridden by the fed slot inputs",
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


def name_rank_dims(proto) -> None:
    """Name each slot input's rank dimension `rank_<group>` (torch.onnx numbers them: s3, s7, ...)."""
    for value in proto.graph.input:
        factor, _, group = value.name.partition(".")[0].removeprefix("lora_").partition("_")
        if factor in ("AT", "BT"):
            value.type.tensor_type.shape.dim[1 if factor == "AT" else 0].dim_param = f"rank_{group}"


def add_empty_slot_defaults(proto) -> None:
    """An empty initializer per slot input (rank 0): with no adapter fed the graph is the base."""
    from onnx import TensorProto, helper

    existing = {i.name for i in proto.graph.initializer}
    for value in proto.graph.input:
        if not value.name.startswith("lora_"):
            continue
        if value.name in existing:
            raise OdloraError(f"internal: the exported graph already has an initializer named {value.name}")
        shape = [d.dim_value if d.dim_value else 0 for d in value.type.tensor_type.shape.dim]  # the rank dim: 0
        proto.graph.initializer.append(helper.make_tensor(value.name, TensorProto.FLOAT, shape, []))


# -- adapters ----------------------------------------------------------------------------------

def per_layer_slots(slots: dict[str, torch.Tensor], spec: SlotSpec) -> dict[str, torch.Tensor]:
    """Stacked slot tensors -> `<slot>.<layer>` per layer (`SlotSpec.per_layer_names` order), as views."""
    return {f"{name}.{layer}": slots[name][layer] for layer in range(spec.n_layers) for name in spec.layout()}


def pack_slots(slots: dict[str, torch.Tensor], manifest: dict, out_file: Path) -> None:
    """Write one adapter's slot tensors as an ONNX Runtime `.onnx_adapter` file (AdapterFormat).

    Stored small: in fp16, at the adapter's own rank r (the slots' all-zero tail beyond r dropped),
    per layer and slot tensor, `<slot>.<layer>` (`SlotSpec.per_layer_names`; adapter version 2). A
    rank-8 all-linear adapter of the default base is 4.9 MB instead of 19.6 MB at fp32 and R = 16;
    the runtime lays it into the graph's slot inputs once, when it loads the blob (`runtime/onnx.py`). fp16 keeps a factor to
    3 significant digits, far inside what int4/int8 bases and the adapters' own noise allow (the
    tests hold the logits to the fp32 slots')."""
    import onnxruntime as ort

    spec = SlotSpec.from_dict(manifest["slots"])
    if list(slots) != list(spec.layout()):
        raise OdloraError(f"slot tensors {list(slots)} do not match the export's layout {list(spec.layout())}")
    rank = max(1, spec.used_rank(slots))
    params = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t.detach().to(torch.float16).numpy()))
              for name, t in per_layer_slots(spec.resize_rank(slots, spec.max_rank, rank), spec).items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ONNX_ADAPTER_VERSION)
    fmt.set_model_version(onnx_model_version(manifest["base_fingerprint"]))
    fmt.set_parameters(params)
    fmt.export_adapter(str(out_file))
