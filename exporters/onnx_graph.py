"""Rewrites of an exported ONNX graph, in place, before quantisation: fewer, larger nodes.

A decode step of the default base runs ~2,000 nodes for 116 MiB of weights; on a 2-core CPU each
node costs a few microseconds of its own, so the number of nodes is part of the step time.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def fuse_shared_input_matmuls(proto) -> int:
    """Every set of constant-weight MatMuls that read one input becomes one MatMul over the
    weights side by side, and a Split of its output into the original outputs (q, k and v of a
    layer; gate and up). Exact: each output column is the same dot product as before, and a
    quantiser that works per output column (onnx_quant.py) sees the same columns. Returns the
    number of MatMuls fused away.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    overridable = {i.name for i in graph.input}  # an initializer that is also an input is not a constant
    readers = defaultdict(list)  # input -> the constant-weight MatMuls that read it, in graph order
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and node.input[1] not in overridable and len(weight.dims) == 2:
            readers[node.input[0]].append(node)
    fused_at, fused_away = {}, set()
    for x, nodes in readers.items():
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        if len(nodes) < 2 or len({(w.shape[0], w.dtype) for w in weights}) != 1:
            continue
        name = f"{nodes[0].output[0]}_fused"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), f"{name}.weight"))
        sizes = numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), f"{name}.sizes")
        graph.initializer.append(sizes)
        fused_at[id(nodes[0])] = [
            helper.make_node("MatMul", [x, f"{name}.weight"], [name], name=name),
            helper.make_node("Split", [name, sizes.name], [n.output[0] for n in nodes], name=f"{name}_split", axis=-1)]
        fused_away.update(id(n) for n in nodes)
    kept = []
    for node in graph.node:  # the fused pair takes the first reader's place: x exists there, no output is read before
        kept.extend(fused_at.get(id(node), [] if id(node) in fused_away else [node]))
    del graph.node[:]
    graph.node.extend(kept)
    drop_unused_initializers(proto)
    return len(fused_away) - len(fused_at)


def drop_unused_initializers(proto) -> None:
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    kept = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def fold_weight_transposes(proto) -> None:
    """Turn `MatMul(x, Transpose(W))` with W an initializer into `MatMul(x, Wᵀ)`, in place.

    A tied LM head reads the embedding through a Transpose (the embedding Gather reads it as
    is), which hides it from quantisation: only MatMuls whose weight is an initializer are
    replaced. The transposed copy is what gets quantised; the Gather keeps its own.
    """
    from onnx import numpy_helper

    initializers = {i.name: i for i in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    keep = []
    for node in proto.graph.node:
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        weight = initializers.get(node.input[0]) if node.op_type == "Transpose" else None
        users = consumers.get(node.output[0], [])
        if (weight is None or len(weight.dims) != 2 or perm not in ([], [[1, 0]])
                or not users or any(u.op_type != "MatMul" or list(u.input).index(node.output[0]) != 1 for u in users)):
            keep.append(node)
            continue
        array = numpy_helper.to_array(weight).T.copy()
        proto.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
