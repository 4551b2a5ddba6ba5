"""ExecuTorch training program: the frozen base plus LoRA A/B, one joint forward/backward graph.

    odlora export --target executorch --trainable --rank 8 --batch-size 8 --seq-len 128 --out prog/
    odlora personalize --engine executorch --program prog/ --data dates.jsonl --out adapters/dates

The program has one method,

    forward(input_ids (B, T), targets (B, T), segment_ids (B, T))
        -> loss, d loss / d every LoRA factor (ExecuTorch's training layout, read by
           `executorch.extension.training.TrainingModule`), then the factors themselves

with B and T fixed at export. `targets` is -100 wherever no loss is taken (prompt tokens,
padding, the padding rows of a short last batch), so the loss is the mean cross-entropy over
completion tokens, exactly `evaluate.token_loss`; `segment_ids` are `data.pack`'s (packed
examples attend only inside their own segment). The LoRA factors are the program's only
parameters that require grad, so the backward computes input gradients through the frozen
base and weight gradients for A and B only; no optimiser runs in the program (ExecuTorch
offers only SGD, `get_sgd_optimizer`; the trainer runs AdamW on the returned gradients).

The frozen base is stored in `train.ptd` beside the program (`train.pte` holds the graph and
the LoRA factors, which the trainer updates in place): fp32 (`none`), or with the decoder's
linears int8 per output channel (`int8`, the laptop path's `quant.Int8Linear` grid), dequantised
by plain ops inside the graph, so the backward runs through them like any other op (ExecuTorch has no
quantised op with a backward; none is needed since the base does not train). Rewrites that make the joint
graph ExecuTorch's (each a pure function, `JOINT_REWRITES`):

- attention is traced through SDPA's math backend: the fused CPU flash-attention backward has
  no decomposition to core ATen and no ExecuTorch kernel;
- `empty_permuted` with the identity permutation (SiLU's backward makes one) becomes `empty`;
- a frozen weight transposed twice (forward, then backward) is read as it is.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OdloraError
from ..config import LoraConfig
from ..lora import apply_lora
from ..models.rewrite import replace_linears
from ..quant import Int8Linear, quantize_base

PROGRAM, DATA = "train.pte", "train.ptd"
BASE_QUANTS = ("none", "int8")  # named as personalize's --base-quant
FAMILIES = ("llama",)  # the model families (`models.family_of`) it knows the structure of
IGNORE = -100


class TrainStep(nn.Module):
    """The exported module: a LoRA-wrapped model whose forward returns the completion-token loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, targets, segment_ids):
        hidden = self.model.hidden_states(input_ids, segment_ids=segment_ids)  # (B, T, dim)
        # Every position goes through the LM head (a static shape); IGNORE targets drop out of the mean.
        logits = self.model.lm_head(hidden).float()  # (B, T, vocab)
        return (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE),)


def lora_parameters(step: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in step.named_parameters() if p.requires_grad}


# -- rewrites of the joint graph: pure functions on an ExportedProgram ---------------------------

def identity_empty_permuted(ep) -> None:
    aten = torch.ops.aten
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.target == aten.empty_permuted.default and list(node.args[1]) == list(range(len(node.args[1]))):
            with graph.inserting_before(node):
                empty = graph.call_function(aten.empty.memory_format, (node.args[0],), {"dtype": node.kwargs["dtype"]})
            empty.meta = node.meta
            node.replace_all_uses_with(empty)
            graph.erase_node(node)
    ep.graph_module.recompile()


def cancel_double_transpose(ep) -> None:
    """`permute(permute(W, [1, 0]), [1, 0])` -> W: the backward of each frozen linear transposes
    the forward's transposed weight back, which ExecuTorch would copy (a whole weight) per step."""
    aten = torch.ops.aten
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        inner = node.args[0] if node.target == aten.permute.default else None
        if (inner is not None and getattr(inner, "target", None) == aten.permute.default
                and list(node.args[1]) == [1, 0] and list(inner.args[1]) == [1, 0]):
            node.replace_all_uses_with(inner.args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code()
    ep.graph_module.recompile()


JOINT_REWRITES = [identity_empty_permuted, cancel_double_transpose]


# -- export -----------------------------------------------------------------------------------

def training_step(model: nn.Module, lora: LoraConfig, base_quant: str = "none") -> TrainStep:
    """A fp32 copy of `model`, its decoder linears quantised per `base_quant`, with LoRA applied
    (A random, B zero) inside a TrainStep."""
    if lora.dropout:
        raise OdloraError("is not supported by the ExecuTorch training program (no random ops in it)", param="dropout")
    if base_quant not in BASE_QUANTS:
        raise OdloraError(f"the ExecuTorch training program holds the base as {' or '.join(BASE_QUANTS)}, not {base_quant!r}")
    model = copy.deepcopy(model).float()
    model.drop_cache()
    if base_quant == "int8":
        quantize_int8(model)
    apply_lora(model, lora)
    return TrainStep(model).eval()


class DequantizingLinear(nn.Module):
    """A `quant.Int8Linear` (the laptop path's int8 grid: one scale per output channel) as plain
    ops: its int8 weight dequantised to fp32 in the graph, then an ordinary linear."""

    def __init__(self, q: Int8Linear):
        super().__init__()
        self.in_features, self.out_features = q.in_features, q.out_features
        self.register_buffer("qweight", q.qweight)  # (out, in) int8
        self.register_buffer("scales", q.scales.float()[:, None])  # (out, 1)
        self.register_buffer("bias", q.bias.float() if q.bias is not None else None)

    def forward(self, x):
        return F.linear(x, self.qweight.float() * self.scales, self.bias)


def quantize_int8(model: nn.Module) -> None:
    """The decoder's linears to int8 weights in place (the embedding and LM head stay fp32)."""
    quantize_base(model, "int8", torch.float32)
    int8 = [name for name, module in model.named_modules() if isinstance(module, Int8Linear)]
    replace_linears(model, int8, lambda _, linear: DequantizingLinear(linear))


def example_batch(batch_size: int, seq_len: int):
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    targets = torch.full((batch_size, seq_len), IGNORE, dtype=torch.long)
    targets[:, 0] = 0
    return ids, targets, torch.zeros(batch_size, seq_len, dtype=torch.long)


def export_joint(step: TrainStep, batch_size: int, seq_len: int):
    """torch.export + the joint forward/backward graph, rewritten for ExecuTorch."""
    from torch.export.experimental import _export_forward_backward
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        ep = torch.export.export(step, example_batch(batch_size, seq_len), strict=False)
        ep = _export_forward_backward(ep)
    for rewrite in JOINT_REWRITES:
        rewrite(ep)
    return ep


def export_training_program(model: nn.Module, lora: LoraConfig, batch_size: int, seq_len: int, out_dir: Path,
                            base_quant: str = "none") -> dict:
    """Write train.pte + train.ptd into out_dir; returns the manifest's target fields."""
    from executorch.exir import ExecutorchBackendConfig, to_edge

    if batch_size < 1:
        raise OdloraError(f"must be >= 1, got {batch_size}", param="batch_size")
    if not 8 <= seq_len <= model.args.max_seq_len:
        raise OdloraError(f"must be in 8..{model.args.max_seq_len}, got {seq_len}", param="seq_len")
    step = training_step(model, lora, base_quant)
    params = lora_parameters(step)
    ep = export_joint(step, batch_size, seq_len)
    tag = DATA.removesuffix(".ptd")
    program = to_edge(ep).to_executorch(ExecutorchBackendConfig(
        # The frozen base (constants) to the .ptd; the trainable factors stay in the program, and
        # so do constants the compiler lifted (they have no module path to be named by).
        external_constants=lambda node: None if "_tensor_constant" in node.name else tag,
    ))
    out_dir = Path(out_dir)
    with open(out_dir / PROGRAM, "wb") as f:
        program.write_to_file(f)
    program.write_tensor_data_to_file(str(out_dir))
    return {"executorch_train": {
        "program": PROGRAM, "data": DATA, "method": "forward", "batch_size": batch_size, "seq_len": seq_len,
        "inputs": ["input_ids", "targets", "segment_ids"], "base_quant": base_quant,
        "lora": json.loads(json.dumps(lora.to_dict())), "scaling": lora.scaling,
        "parameters": {name: list(p.shape) for name, p in params.items()},
    }}
