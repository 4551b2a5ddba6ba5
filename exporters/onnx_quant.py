"""Weight quantisation of an exported ONNX graph: ONNX Runtime's MatMulNBits and GatherBlockQuantized.

Every constant-weight MatMul `x @ W` (W is K x N) becomes

    MatMulNBits(x, q, d)  +  (x @ P) @ (m + 2^(bits-1) d)

with, per block of inputs of each output column (`BLOCK_SIZES`), `m` the block's minimum, `d` its step
`(max - min) / (2^bits - 1)` and `q = round((w - m) / d)` unsigned. `P` (K x blocks, 0/1) sums
the inputs of each block, so the second term adds `m` times that sum: the float minimum that
MatMulNBits' integer zero points cannot hold.

Why not ONNX Runtime's own `MatMulNBitsQuantizer`: GGUF bases are already on such a grid
(Q4_1: `w = d q + m` in blocks of 32 with a float `m`; the default base is one). Its
integer zero point rounds `m / d`, moving every weight of a block by up to half a step: the
4-bit export of the default base lost 28% held-out perplexity to that. MatMulNBits also accepts
float zero points, which would hold `m`, but ORT 1.32's CPU kernel then dequantises the whole
weight per call (3 ms instead of 48 us for one 576 x 1536 decode step). The separate minimum
term reproduces a Q4_1 weight exactly at 4 bits (blocks of 32), and within half an 8-bit step at 8.

The embedding table (a Gather) is stored as 8-bit symmetric blocks (GatherBlockQuantized),
exact for a Q8_0 table; a tied LM head gets its own 8-bit MatMulNBits copy, whatever the width
of the other linears (the head's 4-bit error dominated: +12% perplexity in one measurement).

`ACCURACY_LEVEL` 4 lets MatMulNBits multiply with int8 activations (per block): the fast CPU path.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .onnx_graph import fold_weight_transposes

# Inputs per block, per export width. MatMulNBits quantises the activations in blocks of the same
# size, so smaller blocks cost bytes and buy accuracy. On the default base: 8 bits at 32 flipped the
# greedy answer to a fixed prompt (a near tie in fp32), at 16 it keeps it (perplexity +1.8%,
# 251 MB vs 213 MB); 4 bits at 32 keep it (+1.4%, 158 MB, under 0.3x fp32).
BLOCK_SIZES = {"int8": 16, "int4": 32}
# MatMulNBits compute type 4 = int8 activations. Default base, one-token decode, 1 thread, CPU ms:
# 8-bit weights 281 at level 1 (fp32 compute: ORT 1.32's CPU falls back to dequantising per call),
# 17 at level 4; 4-bit 20.8 -> 15.6 (measured with ORT's own quantizer; same kernels).
ACCURACY_LEVEL = 4
HEAD_BITS = 8
EMBEDDING_BITS = 8


def block_quantize(weight: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (K, N) weight as MatMulNBits wants it, with the float minimum apart.

    Returns (q packed as (N, blocks, block * bits / 8) uint8, steps (N * blocks,) float32,
    minimums (blocks, N) float32).
    """
    k, n = weight.shape
    blocks = weight.T.reshape(n, k // block, block).astype(np.float32)
    low, high = blocks.min(axis=2), blocks.max(axis=2)
    step = (high - low) / (2**bits - 1)
    step[step == 0] = 1.0  # a constant block: q = 0 and the minimum carries it
    q = np.clip(np.rint((blocks - low[..., None]) / step[..., None]), 0, 2**bits - 1).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # two per byte, the first in the low nibble
    return q, step.reshape(-1).astype(np.float32), np.ascontiguousarray(low.T)


def symmetric_rows(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """An embedding table (V, D) as 8-bit symmetric blocks along D: (uint8 q + 128, scales (V, D/block))."""
    v, d = table.shape
    blocks = table.reshape(v, d // block, block).astype(np.float32)
    scale = np.abs(blocks).max(axis=2) / 127
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128
    return q.astype(np.uint8).reshape(v, d), scale.astype(np.float32)


class GraphQuantizer:
    """Rewrites one graph in place; keeps the shared block-sum matrices and per-input sums."""

    def __init__(self, proto, bits: int, block: int):
        from onnx import numpy_helper

        self.proto, self.bits, self.block = proto, bits, block
        self.graph = proto.graph
        self.to_array = numpy_helper.to_array
        self.from_array = numpy_helper.from_array
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.block_sums: dict[str, str] = {}  # MatMul input -> its per-block sums
        self.nodes: list = []
        self.dropped: set[str] = set()
        self.counts = {"MatMulNBits": 0, "GatherBlockQuantized": 0, "kept_fp32": 0}

    def add_initializer(self, array: np.ndarray, name: str) -> str:
        self.graph.initializer.append(self.from_array(array, name))
        self.initializers[name] = self.graph.initializer[-1]
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs))
        return output

    def block_sum(self, x: str, k: int) -> str:
        """x @ P: the sum of each block of inputs, computed once per input tensor."""
        if x not in self.block_sums:
            p_name = f"block_sums_{k}.P"  # one 0/1 matrix per input width, shared by every layer
            if p_name not in self.initializers:
                p = np.kron(np.eye(k // self.block, dtype=np.float32), np.ones((self.block, 1), np.float32))
                self.add_initializer(p, p_name)
            self.block_sums[x] = self.node("MatMul", [x, p_name], f"{x}_block_sums")
        return self.block_sums[x]

    def matmul(self, node, bits: int) -> None:
        x, w = node.input
        weight = self.to_array(self.initializers[w])
        k, n = weight.shape
        q, step, low = block_quantize(weight, bits, self.block)
        # No zero-point input: MatMulNBits then takes its symmetric kernel (q - 2^(bits-1), faster on
        # CPU than the same weights with explicit zeros), and the minimum term adds the offset back:
        # w = d q + m = d (q - 2^(bits-1)) + (m + 2^(bits-1) d).
        low = low + (2 ** (bits - 1)) * step.reshape(n, k // self.block).T
        prefix = node.output[0]
        main = self.node("MatMulNBits", [x, self.add_initializer(q, f"{prefix}.q"),
                                         self.add_initializer(step, f"{prefix}.step")],
                         f"{prefix}_nbits", domain="com.microsoft", K=k, N=n, bits=bits,
                         block_size=self.block, accuracy_level=ACCURACY_LEVEL)
        offset = self.node("MatMul", [self.block_sum(x, k), self.add_initializer(low, f"{prefix}.min")],
                           f"{prefix}_min")
        self.node("Add", [main, offset], prefix)
        self.dropped.add(w)
        self.counts["MatMulNBits"] += 1

    def gather(self, node) -> None:
        table, indices = node.input
        q, scale = symmetric_rows(self.to_array(self.initializers[table]), self.block)
        self.node("GatherBlockQuantized", [self.add_initializer(q, f"{table}.q8"), indices,
                                           self.add_initializer(scale, f"{table}.scale")],
                  node.output[0], domain="com.microsoft", bits=EMBEDDING_BITS, block_size=self.block,
                  gather_axis=0, quantize_axis=1)
        self.dropped.add(table)
        self.counts["GatherBlockQuantized"] += 1

    def quantizable(self, node) -> Optional[str]:
        """"matmul", "gather" or None for a node whose weight is a 2-D initializer that divides in blocks."""
        weight_index = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        if weight_index is None or node.input[weight_index] not in self.initializers:
            return None
        if node.op_type == "Gather" and node.input[1] != "tokens":
            return None  # not the embedding (a RoPE table, say)
        dims = list(self.initializers[node.input[weight_index]].dims)
        axis = 0 if node.op_type == "MatMul" else 1  # the K of x @ W; the row width of a table
        if len(dims) != 2 or dims[axis] % self.block:
            self.counts["kept_fp32"] += 1
            return None
        return node.op_type.lower()

    def run(self, head_input: Optional[str]) -> None:
        for node in list(self.graph.node):
            kind = self.quantizable(node)
            if kind == "matmul":
                self.matmul(node, HEAD_BITS if node.input[1] == head_input else self.bits)
            elif kind == "gather":
                self.gather(node)
            else:
                self.nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        still_used = {name for n in self.graph.node for name in n.input}
        kept = [i for i in self.graph.initializer if i.name not in self.dropped or i.name in still_used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)
        if not any(o.domain == "com.microsoft" for o in self.proto.opset_import):
            from onnx import helper

            self.proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def lm_head_weight(proto) -> Optional[str]:
    """The weight initializer of the MatMul that makes `logits` (None if it is not one)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type != "MatMul" and node.input:
        node = producers.get(node.input[0])  # through a Reshape/Cast the exporter may leave
    return node.input[1] if node is not None and node.op_type == "MatMul" else None


def quantize_weights(proto, quant: str) -> Optional[dict]:
    """Replace constant-weight MatMuls and the embedding Gather, in place; returns what was done."""
    if quant == "fp32":
        return None
    bits = {"int8": 8, "int4": 4}[quant]
    fold_weight_transposes(proto)
    quantizer = GraphQuantizer(proto, bits, BLOCK_SIZES[quant])
    quantizer.run(lm_head_weight(proto))
    return {"tool": "odlora block quantisation to MatMulNBits (onnx_quant.py)", "bits": bits,
            "block_size": BLOCK_SIZES[quant], "scheme": "unsigned with a float block minimum (exact on a Q4_1 grid)",
            "lm_head_bits": HEAD_BITS, "embedding": f"int{EMBEDDING_BITS} symmetric blocks (GatherBlockQuantized)",
            "accuracy_level": ACCURACY_LEVEL, **quantizer.counts}
