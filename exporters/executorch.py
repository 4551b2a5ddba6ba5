"""ExecuTorch target: one delegated program (XNNPACK by default) with adapter slots and an in-program KV cache.

    odlora export --target executorch [--quant 8da4w] out/          # model.pte + model.ptd
    odlora export --target executorch --backend openvino out/       # model.pte (OpenVINO's blob inside)
    odlora adapter pack my-adapter out/ my-adapter.slots             # safetensors of the slot tensors

The program has two methods over the same weights and one shared KV cache (mutable buffers):

    forward(tokens (1, 1), input_pos (1,), *slots) -> logits (1, 1, vocab)     one decode step
    prefill(tokens (1, C), input_pos (C,), *slots) -> logits (1, C, vocab)     C consecutive positions

both static-shaped: XNNPACK refuses reshapes with a symbolic size, so a dynamic T would cut the
delegate at every view. Prompts run in C-token chunks (the last one right-aligned, or padded when
the prompt is shorter than C; see `runtime/executorch.py`'s `ExecutorchSession.forward`). Each group
of projections that reads one input (q|k|v, o, gate|up, down) is one linear with one slot path,
`y = x Wᵀ + (x @ AT) @ BT`, its AT (1, in, m·R) and BT (1, m·R, width) inputs per layer at the
export's rank R (`projections.py`; the manifest's `slot_feed` says where each member's columns are),
read in place: zeros give exactly the base. Exports written before this took one input per layer and slot
tensor (`SlotSpec.per_layer_names`); the runtimes still run them.

To keep the XNNPACK delegate whole (one partition per method, two with a tied embedding, instead
of several per layer: the design notes' measured warning) the model goes through rewrites first:

- attention reads the cache *before* this chunk is written (old positions < input_pos[0]) and
  attends to the chunk's own keys separately, so the cache write is a leaf of the graph instead of
  a cut between two partitions; grouped-query heads share their KV head by reshaping q, not by
  repeating the cache; RoPE's half-rotation uses slices (XNNPACK has no split).
- RMSNorm takes its mean of squares as a matmul with a constant 1/dim column (XNNPACK's mean
  only averages the two inner dims of 4-D tensors).
- matmuls whose right operand is a runtime tensor (the slots) become bmm: XNNPACK's mm/linear
  wants a constant weight, its bmm takes two runtime operands.

The same rewrites serve the other delegates (`executorch_delegates.py`): OpenVINO, Vulkan and Core
ML each take a whole method in one partition too (Vulkan and Core ML leave the cache writes on the CPU).

Quantisation (`QUANTS`) applies to the frozen base's linears and embedding only, never the slots:
`8da4w` is torchao's int8 dynamic activation + int4 weight (groups of 32; the LM head int8),
`8da8w` the same with int8 per-channel weights; both run as XNNPACK's quantised GEMMs. Weight-only
int8 is not offered: XNNPACK leaves torchao's weight-only linears to portable kernels, which
dequantise the whole weight every call. The embedding table is stored int8 (per row) by both,
so a tied embedding does not keep an fp32 copy of the vocabulary matrix.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OdloraError
from ..formats.blobs import EXECUTORCH_SLOTS_FORMAT
from ..formats.slots import SlotSpec
from ..models.llama import MLP
from ..models.rewrite import replace_linears
from .executorch_delegates import lowering_report, partitioner
from .projections import example_slot_tensors, fuse_projections, slot_feed, slot_input_names, slotted_projections

QUANTS = ("fp32", "8da4w", "8da8w")
FAMILIES = ("llama",)  # the model families (`models.family_of`) it knows the structure of
PROGRAM, DATA = "model.pte", "model.ptd"
PREFILL_CHUNK = 32  # tokens per prefill call; see the module docstring
GROUP_SIZE = 32  # int4 weight group


# -- backend rewrites: pure functions module -> module ----------------------------------------

class XnnpackRMSNorm(nn.Module):
    """RMSNorm with its mean of squares as `x² @ (1/dim)`: a constant-weight matmul XNNPACK takes."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        dim = norm.weight.shape[0]
        self.register_buffer("inv_dim", torch.full((1, dim), 1.0 / dim), persistent=False)

    def forward(self, x):
        # No dtype round trip for fp32 input: a no-op `to` still lowers to an alias, which XNNPACK
        # does not take, and would cut the delegate at every norm.
        xf = x if x.dtype == torch.float32 else x.float()
        mean_square = F.linear(xf * xf, self.inv_dim)  # (..., 1)
        y = xf * torch.rsqrt(mean_square + self.eps)
        return self.weight * (y if y.dtype == x.dtype else y.to(x.dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class XnnpackAttention(nn.Module):
    """The model's attention over a static KV cache, in ops XNNPACK takes without cuts.

    For a chunk of T consecutive positions p..p+T-1, each query attends to the cache slots
    before p (written by earlier calls) and causally to the chunk's own keys; the chunk's keys
    and values are written to the cache last, so nothing in the layer waits on that write.
    Exactly the reference's attention to every position <= its own.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.qkv, self.o = attn.qkv, attn.o  # projections.fuse_projections
        if hasattr(attn, "q_norm"):
            self.q_norm, self.k_norm = XnnpackRMSNorm(attn.q_norm), XnnpackRMSNorm(attn.k_norm)
        # The cache as (kv heads, positions, head dim), the shape the bmm reads: a view of a 4-D
        # cache is a reshape, which XNNPACK runs as a copy of the whole cache (measured: 4 of a
        # 20 ms decode step of the default base at 512 positions).
        cache = attn.kv_cache  # (1, kv heads, positions, head dim)
        self.register_buffer("k_cache", cache.k_cache[0].clone(), persistent=False)
        self.register_buffer("v_cache", cache.v_cache[0].clone(), persistent=False)

    def forward(self, x, cos, sin, masks, input_pos):
        B, T, _ = x.shape  # B == 1: the cache holds one sequence
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        group = H // Hkv
        qkv = self.qkv(x)  # slices, not split: XNNPACK has no split
        q = qkv[..., :H * hd].view(B, T, H, hd)
        k = qkv[..., H * hd:(H + Hkv) * hd].view(B, T, Hkv, hd)
        v = qkv[..., (H + Hkv) * hd:].view(B, T, Hkv, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Query heads h*group .. h*group+group-1 share KV head h: fold them into the row axis.
        q = (q * (1.0 / math.sqrt(hd))).reshape(B * Hkv, group * T, hd)
        k_new, v_new = k.reshape(B * Hkv, T, hd), v.reshape(B * Hkv, T, hd)
        S = self.k_cache.shape[1]
        k_old, v_old = self.k_cache, self.v_cache  # before this chunk is written
        old_mask, new_mask = masks  # (1, 1, S), (1, group*T, T): 0 or -inf
        # k_old @ qᵀ then transpose: the transpose moves (group*T, S) scores, not the whole cache.
        old = torch.bmm(k_old, q.transpose(1, 2)).transpose(1, 2) + old_mask  # (B*Hkv, group*T, S)
        new = torch.bmm(q, k_new.transpose(1, 2)) + new_mask  # (B*Hkv, group*T, T)
        p = torch.softmax(torch.cat((old, new), dim=-1), dim=-1)
        y = torch.bmm(p[..., :S], v_old) + torch.bmm(p[..., S:], v_new)  # (B*Hkv, group*T, hd)
        self.k_cache.index_copy_(1, input_pos, k_new)
        self.v_cache.index_copy_(1, input_pos, v_new)
        y = y.view(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)
        return self.o(y)


def replace_attention(model: nn.Module) -> nn.Module:
    for layer in model.model.layers:
        layer.self_attn = XnnpackAttention(layer.self_attn)
    return model


class XnnpackMLP(MLP):
    """The SwiGLU MLP over the fused gate|up projection, taken apart by slices (XNNPACK has no split)."""

    def forward(self, x):
        hidden = self.gate_up.sizes[0]
        gate_up = self.gate_up(x)
        return self.down(self.activate(gate_up[..., :hidden], gate_up[..., hidden:]))


def replace_mlp(model: nn.Module) -> nn.Module:
    for layer in model.model.layers:
        layer.mlp.__class__ = XnnpackMLP
    return model


def replace_rms_norm(model: nn.Module) -> nn.Module:
    for layer in model.model.layers:
        layer.input_layernorm = XnnpackRMSNorm(layer.input_layernorm)
        layer.post_attention_layernorm = XnnpackRMSNorm(layer.post_attention_layernorm)
    model.model.norm = XnnpackRMSNorm(model.model.norm)
    return model


REWRITES = [replace_attention, replace_mlp, replace_rms_norm]


class CachedDecoder(nn.Module):
    """`forward(tokens, input_pos) -> logits` over the rewritten layers: RoPE tables and the
    two attention masks are computed once per call, not once per layer. `projections` are the
    layers' fused projections by group (`projections.fuse_projections`), where slot inputs go."""

    def __init__(self, model: nn.Module, projections: list[dict]):
        super().__init__()
        self.args, self.projections = model.args, projections
        self.model, self.lm_head = model.model, model.lm_head
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.cache_len = model.model.layers[0].self_attn.k_cache.shape[1]

    def forward(self, tokens, input_pos):
        T = tokens.shape[1]
        group = self.args.n_heads // self.args.n_kv_heads
        x = self.model.embed_tokens(tokens)  # (1, T, dim)
        cos = self.rope_cos[input_pos][None, None]  # (1, 1, T, hd), fp32 like the model
        sin = self.rope_sin[input_pos][None, None]
        slots = torch.arange(self.cache_len)
        old_mask = torch.where(slots < input_pos[:1], 0.0, float("-inf")).view(1, 1, -1)
        causal = torch.full((T, T), float("-inf")).triu(1)
        new_mask = causal.repeat(group, 1)[None]  # rows are (head in group, position)
        for layer in self.model.layers:
            x = layer(x, cos, sin, (old_mask, new_mask), input_pos)
        return self.lm_head(self.model.norm(x))


def prepare(model: nn.Module, max_seq_len: int, spec: Optional[SlotSpec]) -> CachedDecoder:
    """A copy of `model` with a 1 x max_seq_len KV cache, its projections fused per group (slotted
    where `spec` has the group; `projections.py`) and the XNNPACK rewrites applied."""
    model = copy.deepcopy(model)
    model.setup_cache(1, max_seq_len)
    projections = fuse_projections(model, spec)
    for rewrite in REWRITES:  # each in place
        rewrite(model)
    return CachedDecoder(model, projections).eval()


class SlotInputs(nn.Module):
    """`forward(tokens, input_pos, *slot_inputs)`: the decoder with its slot inputs (a pair per layer
    and slotted group, `projections.slot_input_names` order) set on its projections for the call."""

    def __init__(self, decoder: CachedDecoder):
        super().__init__()
        self.decoder = decoder
        self.slotted = slotted_projections(decoder.projections)

    def forward(self, tokens, input_pos, *slots):
        for i, projection in enumerate(self.slotted):
            projection.slot = (slots[2 * i], slots[2 * i + 1])
        logits = self.decoder(tokens, input_pos)
        for projection in self.slotted:  # drop references to this call's tensors
            projection.slot = None
        return logits


def weight_inputs(ep) -> set[str]:
    """Placeholder names of an exported program's constants: parameters, buffers it never
    mutates (not the KV cache), lifted constants."""
    sig = ep.graph_signature
    mutated = set(sig.buffers_to_mutate.values())
    names = set(sig.inputs_to_parameters) | set(sig.inputs_to_lifted_tensor_constants)
    return names | {name for name, buffer in sig.inputs_to_buffers.items() if buffer not in mutated}


def xnnpack_graph_rewrites(ep) -> None:
    """Graph rewrites in place, each removing an op XNNPACK refuses, which would cut the delegate:

    - a matmul by a 2-D right operand computed at run time (the slot tensors) becomes a 3-D bmm
      (`runtime_matmul`): XNNPACK's mm and linear take only a constant weight;
    - `alias` (what a full-width slice such as a single-member group's rank slice becomes) and
      a `to` that keeps the dtype are dropped.
    """
    aten = torch.ops.aten
    static = weight_inputs(ep)
    graph = ep.graph_module.graph
    runtime = set()  # nodes computed from runtime inputs
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.name not in static:
            runtime.add(node)
        if node.op != "call_function":
            continue
        if any(n in runtime for n in node.all_input_nodes):
            runtime.add(node)
        if (node.target in (aten.alias.default, aten.to.dtype) and node.args[0].op != "placeholder"
                and node.args[0].meta["val"].dtype == node.meta["val"].dtype):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif (node.target in (aten.matmul.default, aten.mm.default) and node.args[1] in runtime
              and is_matrix(node.args[1].meta["val"])):
            with graph.inserting_before(node):
                y, added = runtime_matmul(graph, node)
            runtime.update(added)
            node.replace_all_uses_with(y)
            graph.erase_node(node)
    ep.graph_module.recompile()


def is_matrix(value: torch.Tensor) -> bool:
    """(k, n), or (1, k, n): a batch of one, as the slot inputs come."""
    return value.dim() == 2 or (value.dim() == 3 and value.shape[0] == 1)


def runtime_matmul(graph, node):
    """`a @ b` for a runtime b (k, n) or (1, k, n) as a 3-D bmm; returns the result node and the
    nodes added.

    Reshapes only where the shapes differ: each node costs export time in every one of
    ExecuTorch's many passes, and XNNPACK runs a reshape of a runtime tensor as a copy (the slot
    inputs come 3-D so that none is copied per call). (Putting the slot tensor on the left of the
    bmm, where XNNPACK would not repack it per call, measured no faster on the default base.)
    """
    aten = torch.ops.aten
    a, b = node.args
    lead, (k, n) = list(a.meta["val"].shape[:-1]), b.meta["val"].shape[-2:]
    rows = math.prod(lead)
    added = []

    def call(target, *args):
        new = graph.call_function(target, args)
        new.meta["val"] = target(*(x.meta["val"] if isinstance(x, torch.fx.Node) else x for x in args))
        new.meta.update({key: node.meta[key] for key in ("stack_trace", "nn_module_stack") if key in node.meta})
        added.append(new)
        return new

    a3 = a if lead == [1, rows] else call(aten.reshape.default, a, [1, rows, k])
    b3 = b if b.meta["val"].dim() == 3 else call(aten.reshape.default, b, [1, k, n])  # XNNPACK unsqueezes only the last dim
    y = call(aten.bmm.default, a3, b3)
    return (y if lead == [1, rows] else call(aten.reshape.default, y, lead + [n])), added


# -- quantisation of the frozen base ----------------------------------------------------------

class GridOffsetLinear(nn.Module):
    """A linear split so that symmetric int4 kernels hold an asymmetric 4-bit grid exactly:
    `centred(x) + offsets(block_sums(x))`.

    Per block of GROUP_SIZE inputs of each output, with step = (max - min) / 15 and
    offset = min + 8 step, the centred weight w - offset lies on {-8, ..., 7} x step, which
    symmetric int4 without clipping (scale = step) represents exactly; `block_sums` (a fixed 0/1
    matrix) and `offsets` (fp32) add offset times the sum of the block's inputs back. A Q4_1 GGUF
    base (w = d q + m, the default base) thus keeps its weights exactly in 4 bits.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        blocks = self.in_features // GROUP_SIZE
        w = linear.weight.detach().float().reshape(self.out_features, blocks, GROUP_SIZE)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        offset = low + 8 * (high - low) / 15
        self.centred = nn.Linear(self.in_features, self.out_features, bias=linear.bias is not None)
        self.centred.weight.data = (w - offset).reshape(self.out_features, self.in_features)
        if linear.bias is not None:
            self.centred.bias.data = linear.bias.detach().float()
        self.block_sums = nn.Linear(self.in_features, blocks, bias=False)
        self.block_sums.weight.data = torch.kron(torch.eye(blocks), torch.ones(1, GROUP_SIZE))
        self.offsets = nn.Linear(blocks, self.out_features, bias=False)
        self.offsets.weight.data = offset.squeeze(-1)

    def forward(self, x):
        return self.centred(x) + self.offsets(self.block_sums(x))


def split_for_int4(model: nn.Module) -> None:
    """Every base linear but the LM head (and a baked adapter's factors) becomes a GridOffsetLinear."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"
               and "lora_" not in name and module.in_features % GROUP_SIZE == 0]
    replace_linears(model, linears, lambda _, linear: GridOffsetLinear(linear))


def quantize_base(model: nn.Module, quant: str) -> nn.Module:
    """torchao quantisation of the base's linears and embedding; slot tensors are inputs and stay fp32.

    8da4w: int4 weights in groups of 32 on each block's own grid (GridOffsetLinear; its two small
    correction linears stay fp32), except the LM head, int8 per channel. Measured on the default
    base before that split: held-out perplexity +51% with all linears at plain symmetric int4,
    +31% with HQQ scales and an int8 head. The embedding table is int8 per row in both modes.
    """
    if quant == "fp32":
        return model
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType
    from torchao.utils import unwrap_tensor_subclass

    int8 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    int4 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE),
                                                 weight_mapping_type=MappingType.SYMMETRIC_NO_CLIPPING_ERR)

    def linear(m, fqn, head):  # never the LoRA factors of a baked adapter, nor the int4 corrections
        return (isinstance(m, nn.Linear) and "lora_" not in fqn and (fqn == "lm_head") == head
                and not fqn.endswith((".block_sums", ".offsets")))

    with torch.no_grad():
        quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
                  filter_fn=lambda m, _: isinstance(m, nn.Embedding))
        quantize_(model, int8, filter_fn=lambda m, fqn: linear(m, fqn, head=True))
        if quant == "8da4w":
            split_for_int4(model)
            quantize_(model, int4, filter_fn=lambda m, fqn: linear(m, fqn, head=False) and fqn.endswith(".centred"))
        quantize_(model, int8, filter_fn=lambda m, fqn: linear(m, fqn, head=False) and not fqn.endswith(".centred"))
    return unwrap_tensor_subclass(model)  # plain tensors export as plain weights (and keep their tags)


# -- export -----------------------------------------------------------------------------------

def tag_weights(ep, tag: str) -> None:
    """Mark every weight for the named data file: XNNPACK then stores its constants there, not in
    the program (the tag `delegate_external_constants_pass_unlifted` sets, set on the lifted graph)."""
    weights = weight_inputs(ep)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in weights:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag


def export_program(model: nn.Module, spec: Optional[SlotSpec], out_dir: Path, quant: str, max_seq_len: int,
                   config: Optional[dict] = None, backend: str = "xnnpack",
                   stage: Callable[[str], None] = lambda name: None) -> dict:
    """Write model.pte (program) and model.ptd (weights) into out_dir; returns the manifest fields.

    `model` is not modified (the export works on a copy). `spec=None` exports without slots (the
    bench's comparison). `config` (the base's config.json dict), when given, supplies the BOS/EOS
    ids the ExecuTorch LLM runner reads from the program. `backend` names the delegate
    (`executorch_delegates.DELEGATES`) the graph is lowered to; a delegate that compiles the
    weights into its own blob (all but XNNPACK) writes no model.ptd. `stage(name)` is told as each
    stage starts (progress.Stages).
    """
    if quant not in QUANTS:
        raise OdloraError(f"unknown ExecuTorch quantisation {quant!r} (choose from {', '.join(QUANTS)})")
    if quant != "fp32" and backend != "xnnpack":
        raise OdloraError(f"{quant} is torchao's quantisation for XNNPACK's kernels; the {backend} delegate takes "
                          "fp32 here (its own quantiser is not wired in yet)", param="quant")
    lowering_partitioner = partitioner(backend)  # before the slow part: a delegate missing here fails at once
    stage(f"preparing the model ({quant})")
    decoder = quantize_base(prepare(model, max_seq_len, spec), quant)
    module = SlotInputs(decoder).eval()
    slots = tuple(example_slot_tensors(decoder.projections, spec)) if spec is not None else ()
    chunk = min(PREFILL_CHUNK, max_seq_len)
    lowering = lower(module, {"forward": 1, "prefill": chunk}, slots, Path(out_dir),
                     metadata=runner_metadata(decoder.args, max_seq_len, chunk, config), quantised=quant != "fp32",
                     partitioner=lowering_partitioner, stage=stage)
    return {"executorch": {
        "program": PROGRAM, "data": DATA if (Path(out_dir) / DATA).exists() else None,
        "methods": {"forward": 1, "prefill": chunk},
        "inputs": ["tokens", "input_pos", *(slot_input_names(spec) if spec is not None else ())],
        "slot_feed": slot_feed(decoder.projections[0], spec) if spec is not None else None,
        "delegate_partitions": {method: report["partitions"] for method, report in lowering.items()},
        "backend": backend, "lowering": lowering,
    }}


def lower(module: nn.Module, methods: dict[str, int], extra_inputs: tuple, out_dir: Path, metadata: dict,
          quantised: bool, partitioner, stage: Callable[[str], None] = lambda name: None) -> dict[str, int]:
    """export -> graph rewrites -> edge + `partitioner` -> out_dir/model.pte + model.ptd, one method
    per (name, T) in `methods` over the same weights and KV cache; returns what the delegate took
    of each method (`lowering_report`)."""
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    tag = DATA.removesuffix(".ptd")
    programs = {}
    with torch.no_grad():
        for method, T in methods.items():
            stage(f"tracing method {method} ({T} token{'s' if T > 1 else ''} a call)")
            example = (torch.zeros(1, T, dtype=torch.long), torch.arange(T)) + extra_inputs
            ep = torch.export.export(module, example, strict=False)
            xnnpack_graph_rewrites(ep)
            tag_weights(ep, tag)
            programs[method] = ep
    stage("lowering to the delegate")
    edge = to_edge_transform_and_lower(programs, partitioner=[partitioner], constant_methods=metadata)
    reports = {method: lowering_report(edge.exported_program(method).graph_module) for method in programs}
    stage("planning memory and emitting the program")
    program = edge.to_executorch(ExecutorchBackendConfig(
        # Weights outside the delegate go to the .ptd too; constants the compiler folded (masks,
        # per method and shape, under one name in every method) stay in the program.
        external_constants=lambda node: None if "_tensor_constant" in node.name else tag,
        # One KV cache for all methods; inputs read where the caller keeps them, not copied in.
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True, alloc_graph_input=False),
        emit_mutable_buffer_names=True,
        run_reinplace_pass=True,  # the cache write in place, not a copy of the cache per call
        do_quant_fusion_and_const_prop=quantised,  # dequantise + embedding -> a quantised embedding op
    ))
    stage(f"writing {PROGRAM}")
    with open(out_dir / PROGRAM, "wb") as f:
        program.write_to_file(f)
    program.write_tensor_data_to_file(str(out_dir))
    return reports


def runner_metadata(args, max_seq_len: int, chunk: int, config: Optional[dict]) -> dict:
    """Constant methods the ExecuTorch LLM runner reads (`get_max_seq_len`, ...)."""
    meta = {"get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len, "get_vocab_size": args.vocab_size,
            "use_kv_cache": True, "use_sdpa_with_kv_cache": False, "enable_dynamic_shape": False,
            "get_n_layers": args.n_layers, "get_prefill_chunk": chunk}
    if config:
        if config.get("bos_token_id") is not None:
            meta["get_bos_id"] = int(config["bos_token_id"])
        eos = config.get("eos_token_id")
        if eos is not None:
            meta["get_eos_ids"] = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return meta


# -- adapters ---------------------------------------------------------------------------------

def pack_slots(slots: dict[str, torch.Tensor], manifest: dict, out_file: Path) -> None:
    """The adapter blob: its slot tensors as safetensors, passed to the program as method inputs.

    Stored in fp16 at the adapter's own rank r (the slots' all-zero tail beyond r dropped, restored
    and widened to fp32 on load), so a rank-8 all-linear adapter of the default base is 4.9 MB
    (19.5 MB in fp32 at R = 16). Inputs rather than a
    second .ptd: the Python runtime loads one data file per program, and swapping adapters then
    needs no reload (the bench script measures what inputs cost).
    """
    from safetensors.torch import save_file

    spec = SlotSpec.from_dict(manifest["slots"])
    if list(slots) != list(spec.layout()):
        raise OdloraError(f"slot tensors {list(slots)} do not match the export's layout {list(spec.layout())}")
    rank = max(1, spec.used_rank(slots))
    meta = {"format": EXECUTORCH_SLOTS_FORMAT, "target": "executorch", "base_fingerprint": manifest["base_fingerprint"],
            "rank": str(rank)}
    trimmed = spec.resize_rank(slots, spec.max_rank, rank)
    save_file({name: t.to(torch.float16).contiguous() for name, t in trimmed.items()}, str(out_file), metadata=meta)
