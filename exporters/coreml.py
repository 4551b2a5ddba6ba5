"""Core ML target: one stateful ML Program (iOS 18 / macOS 15) with adapter slots as inputs.

    odlora export --target coreml --quant int4 --out exports/coreml      # model.mlpackage + manifest.json
    odlora adapter pack adapters/dates --export exports/coreml --out dates.safetensors

Stages, each a function so that tests can inspect what every stage hands to the next:

    prepare(model, spec, max_seq_len)  copy the model, Core ML rewrites (REWRITES), slot wrapper
    trace(decoder, spec)               torch.export + run_decompositions({}): the graph ct.convert gets
    convert(program, spec)             ct.convert -> mlprogram, KV caches as states, slots as inputs
    quantize(mlmodel, quant)           4- or 8-bit base weights (coremltools.optimize.coreml)

What the package computes, per call (one-token decode):

    inputs   tokens (1, 1) int32, input_pos (1,) int32, one fp16 input per slot tensor
             (`SlotSpec.layout()`: lora_A_qkv (L, 3R, dim), lora_B_qkv (L, q+k+v out, R), ...)
    states   per layer a key and a value cache (1, n_kv_heads, max_seq_len, head_dim) fp16, named
             after the torch buffers (model_model_layers_{i}_self_attn_kv_cache_{k,v}_cache); the app
             makes them with `model.makeState()` and needs no names
    outputs  logits (1, 1, vocab) fp16

Why these choices:

- Slots are *inputs*, not a multifunction model: multifunction deduplicates shared weights but fixes
  every adapter when the package is built, and per-user adapters arrive after the app ships. An
  all-zero feed is exactly the base. Core ML has no "optional input", so the app feeds zeros for no
  adapter (or keeps one zero MLMultiArray per slot and reuses it).
- Decode only (T=1). Core ML writes a state in place with `slice_update`, which coremltools emits
  for `cache[:, :, input_pos] = k` only when `input_pos` is one position (it squeezes the index).
  A prefill of T tokens is T calls; a multi-token prefill function (sharing weights through
  `ct.utils.save_multifunction`) is the next step if prefill latency matters.
- fp16 compute throughout: an mlprogram computes in fp16 by default (`compute_precision`), and
  Core ML states must be fp16. "fp16" keeps fp16 weights; "int8" (per output channel) and "int4"
  (per block of 32 input channels) quantise only the base's linear and embedding weights. The slot
  inputs are never quantised (they are not constants), nor are the RoPE tables. Both are plain
  round-to-nearest: on the default base int8 keeps 97% of next-token argmaxes on a chat prompt and
  int4 59% (both still answer "The capital of France is Paris.").
- RMSNorm is rewritten for fp16 (`ScaledRMSNorm`): real bases carry activations whose square
  overflows fp16, and the plain form then makes the whole package output garbage.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..errors import OdloraError
from ..formats.blobs import COREML_SLOTS_FORMAT, COREML_SLOTS_VERSION
from ..formats.slots import SlotSpec
from ..models.slots import SlottedModel, zero_slots

QUANTS = ("fp16", "int8", "int4")
FAMILIES = ("llama",)  # the model families (`models.family_of`) it knows the structure of
PACKAGE = "model.mlpackage"
INT4_BLOCK_SIZE = 32  # input channels per int4 scale; 576 and 1536 (the default base) divide by it
DTYPES = {"FLOAT16": "float16", "FLOAT32": "float32", "INT32": "int32"}


# -- rewrites for Core ML: pure module replacements (ExecuTorch's pattern) --------------------------

class StateKVCache(nn.Module):
    """`KVCache` with the one-position write Core ML turns into an in-place state update.

    `index_copy_` has no coremltools translation; slice assignment at a single position becomes
    `slice_update` + `coreml_update_state`. The buffers are the replaced cache's own tensors.
    """

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor):
        super().__init__()
        self.register_buffer("k_cache", k_cache, persistent=False)
        self.register_buffer("v_cache", v_cache, persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos: (1,), k/v: (B, n_kv, 1, hd) -> full caches (B, n_kv, max_seq, hd)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


def replace_kv_cache_with_state_cache(model: nn.Module) -> nn.Module:
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.kv_cache = StateKVCache(attn.kv_cache.k_cache, attn.kv_cache.v_cache)
    return model


def trim_rope_tables(model: nn.Module) -> nn.Module:
    """Keep RoPE rows for the cache's positions only: the tables are constants of the package."""
    n = model.cache_len
    model.rope_cos, model.rope_sin = model.rope_cos[:n].clone(), model.rope_sin[:n].clone()
    return model


class ScaledRMSNorm(nn.Module):
    """RMSNorm that cannot overflow in fp16, which is how Core ML computes it.

    `mean(x²)` overflows fp16 (max 65504) once |x| > 256, and real bases carry "massive activations"
    far above that (the default base: about 25000 in the residual stream from layer 12 on), so the
    plain form turns into inf/NaN on device. Dividing by s = max|x| first is exact in real numbers,
        x · rsqrt(mean(x²) + eps) = (x/s) · rsqrt(mean((x/s)²) + eps/s²),
    and keeps every intermediate in range: |x/s| <= 1 and mean((x/s)²) >= 1/dim. The floor on s
    keeps eps/s² finite for an all-zero row.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-2)  # (..., 1)
        y = x / s
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps / s / s))  # eps/s² never inf


def replace_rms_norm_with_scaled(model: nn.Module) -> nn.Module:
    from ..models.llama import RMSNorm

    for name, module in list(model.named_modules()):
        if isinstance(module, RMSNorm):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, ScaledRMSNorm(module))
    return model


REWRITES = [replace_kv_cache_with_state_cache, trim_rope_tables, replace_rms_norm_with_scaled]


# -- stages ---------------------------------------------------------------------------------------

def prepare(model: nn.Module, spec: SlotSpec, max_seq_len: int) -> SlottedModel:
    """A converted-ready copy of `model` (the caller's model is left untouched)."""
    model = copy.deepcopy(model).float().eval()
    model.setup_cache(max_batch=1, max_seq_len=max_seq_len, dtype=torch.float32)
    for rewrite in REWRITES:
        model = rewrite(model)
    return SlottedModel(model, spec).eval()


def example_inputs(spec: SlotSpec) -> tuple:
    return (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), *zero_slots(spec).values())


def drop_aliases(program):
    """Remove `aten.alias` nodes (coremltools has no translation): a slice over a whole dimension,
    e.g. a single-member slot group's rank slice, exports as one. Returns `program`, changed in place."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()
    return program


def trace(decoder: SlottedModel, spec: SlotSpec):
    """The ExportedProgram that `convert` hands to ct.convert (ATen ops after decompositions)."""
    with torch.no_grad():
        program = torch.export.export(decoder, example_inputs(spec), strict=False)
    return drop_aliases(program.run_decompositions({}))


def convert(program, spec: SlotSpec):
    """ct.convert into an fp16 mlprogram for iOS 18 / macOS 15 (not loaded: Linux cannot)."""
    import coremltools as ct

    inputs = [ct.TensorType(name="tokens", shape=(1, 1), dtype=np.int32),
              ct.TensorType(name="input_pos", shape=(1,), dtype=np.int32)]
    inputs += [ct.TensorType(name=name, shape=tuple(shape), dtype=np.float16) for name, shape in spec.layout().items()]
    # The KV caches are the buffers the program writes: each becomes an fp16 state of its shape.
    mutated = set(program.graph_signature.buffers_to_mutate.values())
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(placeholders[s.arg.name].meta["val"].shape),
                                                      dtype=np.float16), name=s.target)
              for s in program.graph_signature.input_specs if s.target in mutated]
    return ct.convert(
        program,
        inputs=inputs,
        states=states,
        outputs=[ct.TensorType(name="logits", dtype=np.float16)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
    )


def mil_program(mlmodel):
    """The MIL program of a converted or a loaded (`skip_model_load=True`) model."""
    if getattr(mlmodel, "_mil_program", None) is not None:
        return mlmodel._mil_program
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = mlmodel.get_spec()
    return load(model_spec=spec, specification_version=spec.specificationVersion, file_weights_dir=mlmodel.weights_dir)


def quant_config(mlmodel, quant: str):
    """Which constants to quantise, by name: every linear's weight and the token embedding (one
    constant when the LM head is tied to it). Biases, norms and RoPE tables stay fp16; the slot
    tensors are inputs, never constants, so no config can reach them."""
    import coremltools.optimize.coreml as cto

    check_quant(quant)
    if quant == "fp16":
        return None  # fp16 weights: nothing to quantise
    if quant == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=0)
    else:
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=INT4_BLOCK_SIZE, weight_threshold=0)
    names = {}
    for o in mil_program(mlmodel).functions["main"].operations:
        weight = {"linear": "weight", "gather": "x"}.get(o.op_type)
        weight = o.inputs.get(weight) if weight else None
        if weight is not None and weight.op is not None and weight.op.op_type == "const":
            if o.op_type == "linear" or "embed_tokens" in weight.op.name:  # not the RoPE tables' gathers
                names[weight.op.name] = op
    return cto.OptimizationConfig(global_config=None, op_name_configs=names)


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise OdloraError(f"{quant!r} is not supported for coreml (choose from {', '.join(QUANTS)})", param="quant")


def quantize(mlmodel, quant: str):
    import coremltools.optimize.coreml as cto

    config = quant_config(mlmodel, quant)
    return mlmodel if config is None else cto.linear_quantize_weights(mlmodel, config)


def describe(mlmodel) -> dict:
    """Inputs, states and outputs as the package's own spec declares them (for the manifest)."""
    desc = mlmodel.get_spec().description

    def array(feature, kind="multiArrayType"):
        t = feature.type.stateType.arrayType if kind == "state" else feature.type.multiArrayType
        return {"shape": [int(s) for s in t.shape],
                "dtype": DTYPES.get(type(t).ArrayDataType.Name(t.dataType), str(t.dataType))}

    return {
        "inputs": {f.name: array(f) for f in desc.input},
        "states": [{"name": f.name, **array(f, "state")} for f in desc.state],
        "outputs": [{"name": f.name, **array(f)} for f in desc.output],
    }


# -- the target interface (see export.py) ---------------------------------------------------------

def export_program(model: nn.Module, spec: SlotSpec, out_dir: Path, quant: str, max_seq_len: int,
                   config: Optional[dict] = None, stage: Callable[[str], None] = lambda name: None) -> dict:
    """Write model.mlpackage into out_dir; returns the manifest's "coreml" fields (`config` is
    not read: the package needs nothing from it). `stage(name)` is told as each stage starts."""
    check_quant(quant)  # before minutes of conversion
    started = time.perf_counter()
    stage("tracing the model (torch.export)")
    traced = trace(prepare(model, spec, max_seq_len), spec)
    stage("converting to Core ML (coremltools)")
    converted = convert(traced, spec)
    stage(f"quantising the weights ({quant})")
    mlmodel = quantize(converted, quant)
    stage(f"writing {PACKAGE}")
    mlmodel.save(str(Path(out_dir) / PACKAGE))
    return {"coreml": {
        "package": PACKAGE,
        "minimum_deployment_target": "iOS18",  # and macOS 15: stateful models need Core ML 8
        **describe(mlmodel),
        "compute_precision": "float16",
        "weights": {"fp16": "float16", "int8": "int8 per output channel (linear, embedding)",
                    "int4": f"int4 per block of {INT4_BLOCK_SIZE} inputs (linear, embedding)"}[quant],
        "tokens_per_call": 1,
        "adapter_feed": "inputs",
        "convert_seconds": round(time.perf_counter() - started, 1),
    }}


def pack_slots(slots: dict[str, torch.Tensor], manifest: dict, out_file: Path) -> None:
    """Write one adapter's slot tensors (fp16) in a safetensors file, one tensor per slot input,
    named as the input, at the adapter's own rank r (the slots' all-zero tail beyond r dropped, as
    the ExecuTorch blob does: a rank-8 all-linear adapter of the default base is 4.9 MB instead of
    9.8 MB at R = 16); a reader pads each member's rows and B's columns back to R. `__metadata__`
    holds the format (version 2), the base fingerprint, the rank and the stored layout ({input:
    shape}, JSON). The .mlpackage is never touched."""
    from safetensors.torch import save_file

    inputs = manifest["coreml"]["inputs"]
    for name, tensor in slots.items():
        if name not in inputs:
            raise OdloraError(f"slot {name} is not an input of this Core ML export")
        if list(tensor.shape) != inputs[name]["shape"]:
            raise OdloraError(f"slot {name} has shape {list(tensor.shape)}, the export's input is {inputs[name]['shape']}")
    missing = [n for n in manifest["slots"]["layout"] if n not in slots]
    if missing:
        raise OdloraError(f"slot {missing[0]} is missing")
    spec = SlotSpec.from_dict(manifest["slots"])
    rank = max(1, spec.used_rank(slots))
    tensors = {name: t.to(getattr(torch, inputs[name]["dtype"])).contiguous()
               for name, t in spec.resize_rank(slots, spec.max_rank, rank).items()}
    metadata = {"format": COREML_SLOTS_FORMAT, "format_version": str(COREML_SLOTS_VERSION),
                "base_fingerprint": manifest["base_fingerprint"], "rank": str(rank),
                "layout": json.dumps({n: list(t.shape) for n, t in tensors.items()}),
                "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.")}
    save_file(tensors, str(out_file), metadata=metadata)
