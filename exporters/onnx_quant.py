"""Weight quantisation of an exported ONNX graph: ONNX Runtime's MatMulNBits and GatherBlockQuantized.

Every constant-weight MatMul `x @ W` (W is K x N) becomes

    MatMulNBits(x, q, d)  +  MatMulNBits8(x @ P, c)        c = m + 2^(bits-1) d

with, per block of inputs of each output column (`BLOCK_SIZES`), `m` the block's minimum, `d` its step
`(max - min) / (2^bits - 1)` and `q = round((w - m) / d)` unsigned; the first term is MatMulNBits'
symmetric kernel, `d (q - 2^(bits-1))`, and the second adds each block's offset `c` times the sum of
its inputs (`P`, K x blocks of 0/1): the float minimum that MatMulNBits' integer zero points cannot
hold. The offsets (blocks x N) are themselves stored as 8-bit symmetric blocks of `OFFSET_BLOCK`
along the blocks axis: as fp32 they were 13 MB read per decode step of the default base, and the
term cost ~0.7 ms of an ~8.5 ms step more than in 8 bits, which moves held-out perplexity by +0.3%
(26.89 -> 26.96; each offset within 1/254 of its group's largest).

Why not ONNX Runtime's own `MatMulNBitsQuantizer`: GGUF bases are already on such a grid
(Q4_1: `w = d q + m` in blocks of 32 with a float `m`; the default base is one). Its
integer zero point rounds `m / d`, moving every weight of a block by up to half a step: the
4-bit export of the default base lost 28% held-out perplexity to that. MatMulNBits also accepts
float zero points, which would hold `m`, but ORT 1.32's CPU kernel then dequantises the whole
weight per call (3 ms instead of 48 us for one 576 x 1536 decode step). The separate minimum
term reproduces a Q4_1 weight at 4 bits (blocks of 32) up to the 8-bit rounding of its offset.

The embedding table (a Gather) and the LM head are 8-bit symmetric blocks of 32 (`TABLE_BLOCK`):
exact for a Q8_0 table (the default base's), whatever the width of the other linears (a 4-bit head's
error dominated: +12% perplexity in one measurement), and with no block-minimum term (symmetric:
MatMulNBits' own kernel). A tied head and the embedding share one copy of the bytes: MatMulNBits
reads it as `(vocab, blocks, 32)`, GatherBlockQuantized gathers rows of the same tensor.

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
TABLE_BITS = 8  # the embedding and the LM head
TABLE_BLOCK = 32  # Q8_0's block
OFFSET_BLOCK = 16  # the block offsets' own 8-bit blocks (along a column's blocks: 18 of them for K = 576)


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
    """A table (V, D) as 8-bit symmetric blocks along D: (uint8 q + 128 (V, D/block, block), scales (V, D/block))."""
    v, d = table.shape
    blocks = table.reshape(v, d // block, block).astype(np.float32)
    scale = np.abs(blocks).max(axis=2) / 127
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128
    return q.astype(np.uint8), scale.astype(np.float32)


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
        self.tables: dict[str, tuple[str, str, tuple]] = {}  # source -> 8-bit symmetric copy (q, scales, shape)

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
        self.node("Add", [main, self.offsets(self.block_sum(x, k), low, prefix)], prefix)
        self.dropped.add(w)
        self.counts["MatMulNBits"] += 1

    def offsets(self, sums: str, low: np.ndarray, prefix: str) -> str:
        """`sums @ low` (low: blocks x N) as an 8-bit symmetric MatMulNBits, low's columns in blocks of
        OFFSET_BLOCK (zero-padded to whole blocks)."""
        blocks, n = low.shape
        padded = np.zeros((n, -(-blocks // OFFSET_BLOCK) * OFFSET_BLOCK), np.float32)
        padded[:, :blocks] = low.T
        q, scale = symmetric_rows(padded, OFFSET_BLOCK)
        return self.node("MatMulNBits", [sums, self.add_initializer(q, f"{prefix}.min.q8"),
                                         self.add_initializer(scale, f"{prefix}.min.scale")],
                         f"{prefix}_min", domain="com.microsoft", K=blocks, N=n, bits=8, block_size=OFFSET_BLOCK,
                         accuracy_level=ACCURACY_LEVEL)

    def table(self, rows: np.ndarray, source: str) -> tuple[str, str, tuple]:
        """`rows` (R, D) as 8-bit symmetric blocks: the (q (R, D/b, b), scales (R, D/b)) initializers, made
        once per `source` (the embedding and a head tied to it pass the same)."""
        if source not in self.tables:
            q, scale = symmetric_rows(rows, TABLE_BLOCK)
            self.tables[source] = (self.add_initializer(q, f"{source}.q8"), self.add_initializer(scale, f"{source}.scale"),
                                   q.shape)
        return self.tables[source]

    def head(self, node, rows: np.ndarray, source: str) -> None:
        """The LM head `x @ rows.T` as one symmetric 8-bit MatMulNBits."""
        x, w = node.input
        q, scale, (n, blocks, block) = self.table(rows, source)
        self.node("MatMulNBits", [x, q, scale], node.output[0], domain="com.microsoft", K=blocks * block, N=n,
                  bits=TABLE_BITS, block_size=block, accuracy_level=ACCURACY_LEVEL)
        self.dropped.add(w)
        self.counts["MatMulNBits"] += 1

    def gather(self, node, source: str) -> None:
        """The embedding as GatherBlockQuantized over the table's (V, D/b, b) bytes, reshaped to (..., D)."""
        table, indices = node.input
        q, scale, (_, blocks, block) = self.table(self.to_array(self.initializers[table]), source)
        if f"{scale}3" not in self.initializers:  # the gather wants the scales with the data's rank
            self.add_initializer(self.to_array(self.initializers[scale])[..., None], f"{scale}3")
            self.add_initializer(np.array([0, 0, blocks * block], np.int64), f"{q}.row_shape")
        rows = self.node("GatherBlockQuantized", [q, indices, f"{scale}3"], f"{node.output[0]}_blocks",
                         domain="com.microsoft", bits=TABLE_BITS, block_size=block, gather_axis=0, quantize_axis=2)
        self.node("Reshape", [rows, f"{q}.row_shape"], node.output[0])
        self.dropped.add(table)
        self.counts["GatherBlockQuantized"] += 1

    def kind(self, node, head_weight: Optional[str]) -> Optional[str]:
        """What becomes of a node: "matmul", "head" (the LM head's MatMul), "gather" (the embedding),
        "kept" (a constant weight that does not divide in blocks: stays fp32) or None (not a weight's)."""
        weight_index = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        if weight_index is None or node.input[weight_index] not in self.initializers:
            return None
        if node.op_type == "Gather" and node.input[1] != "tokens":
            return None  # not the embedding (a RoPE table, say)
        kind = "head" if node.op_type == "MatMul" and node.input[1] == head_weight else node.op_type.lower()
        dims = list(self.initializers[node.input[weight_index]].dims)
        axis = 0 if node.op_type == "MatMul" else 1  # the K of x @ W; the row width of a table
        block = self.block if kind == "matmul" else TABLE_BLOCK
        return kind if len(dims) == 2 and dims[axis] % block == 0 else "kept"

    def run(self, head_weight: Optional[str]) -> None:
        """Quantise, in place, every MatMul with a constant weight (the LM head's, `head_weight`, as a
        symmetric 8-bit table) and the embedding Gather."""
        kinds = [self.kind(node, head_weight) for node in self.graph.node]
        embedding = next((n.input[0] for n, k in zip(self.graph.node, kinds) if k == "gather"), None)
        head_rows = self.to_array(self.initializers[head_weight]).T if "head" in kinds else None
        tied = (embedding is not None and head_rows is not None
                and np.array_equal(head_rows, self.to_array(self.initializers[embedding])))
        for node, kind in zip(list(self.graph.node), kinds):
            if kind == "matmul":
                self.matmul(node, self.bits)
            elif kind == "head":
                self.head(node, head_rows, embedding if tied else head_weight)
            elif kind == "gather":
                self.gather(node, node.input[0])
            else:
                self.counts["kept_fp32"] += kind == "kept"
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
            "block_size": BLOCK_SIZES[quant], "scheme": "unsigned with a float block minimum (a Q4_1 grid), the minimums in 8 bits",
            "lm_head_bits": TABLE_BITS,
            "embedding": f"int{TABLE_BITS} symmetric blocks of {TABLE_BLOCK} (GatherBlockQuantized), shared with a tied head",
            "accuracy_level": ACCURACY_LEVEL, **quantizer.counts}
