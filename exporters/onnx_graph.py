"""Rewrites of an exported ONNX graph, in place: fewer, larger nodes, each exact.

A decode step of the default base is a few milliseconds; every node costs on the order of a
microsecond of ONNX Runtime's own time, and a node that copies (a Split) or reads a tensor twice
more, so nodes that ONNX Runtime's kernels can do in one are merged here:

- `pack_qkv_into_attention`: GroupQueryAttention reads q|k|v packed (no Split);
- `fold_residual_norms`: a residual Add and the RMSNorm after it are one SkipSimplifiedLayerNormalization
  (ONNX Runtime's own fusion does not match the graph torch.onnx writes);
- `sum_add_chains`: `((a + b) + c) + d` is one Sum (a linear's weight term, block-minimum term,
  bias and slot term);
- `fold_weight_transposes` (for the quantiser): constant weights read through a Transpose.
"""

from __future__ import annotations

from collections import Counter

MS_DOMAIN = "com.microsoft"


def producers(graph) -> dict:
    return {name: node for node in graph.node for name in node.output}


def consumers(graph) -> Counter:
    """How many times each value is read (graph outputs count once)."""
    counts = Counter(name for node in graph.node for name in node.input if name)
    counts.update(o.name for o in graph.output)
    return counts


def drop_nodes(graph, dropped: set[str]) -> None:
    """Remove the nodes whose first output is in `dropped`."""
    kept = [node for node in graph.node if node.output[0] not in dropped]
    del graph.node[:]
    graph.node.extend(kept)


def pack_qkv_into_attention(proto) -> int:
    """Each GroupQueryAttention whose q, k and v are the outputs of one Split, in order and read by
    nothing else, takes the Split's input as packed q|k|v (key and value left empty), and the Split
    goes. Returns the number of nodes packed."""
    graph = proto.graph
    made_by, reads = producers(graph), consumers(graph)
    dropped = set()
    for node in graph.node:
        split = made_by.get(node.input[0]) if node.op_type == "GroupQueryAttention" else None
        if (split is None or split.op_type != "Split" or list(node.input[:3]) != list(split.output)
                or any(reads[name] != 1 for name in split.output)):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        dropped.add(split.output[0])
    drop_nodes(graph, dropped)
    return len(dropped)


def fold_residual_norms(proto) -> int:
    """`s = a + b; y = SimplifiedLayerNormalization(s)` -> `y, s = SkipSimplifiedLayerNormalization(a, b)`:
    the sum is still an output for the next residual. Returns the number of norms folded."""
    from onnx import helper

    graph = proto.graph
    made_by = producers(graph)
    dropped = set()
    for i, node in enumerate(graph.node):
        add = made_by.get(node.input[0]) if node.op_type == "SimplifiedLayerNormalization" else None
        if add is None or add.op_type != "Add" or add.output[0] in dropped:
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        graph.node[i].CopyFrom(helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], node.input[1]],
            [node.output[0], "", "", add.output[0]], name=f"{node.name}_skip", domain=MS_DOMAIN, epsilon=epsilon))
        dropped.add(add.output[0])
    drop_nodes(graph, dropped)
    if dropped and not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(dropped)


def sum_add_chains(proto) -> int:
    """An Add whose input is another Add read only by it becomes one Sum of all their terms, as
    far as the chain goes (Sum broadcasts as Add does). Returns the number of Adds merged away."""
    from onnx import helper

    graph = proto.graph
    made_by, reads = producers(graph), consumers(graph)
    outputs = {o.name for o in graph.output}

    def terms(name: str) -> list[str]:
        node = made_by.get(name)
        if node is None or node.op_type not in ("Add", "Sum") or reads[name] != 1 or name in outputs:
            return [name]
        return [t for x in node.input for t in terms(x)]

    merged = set()
    for i, node in enumerate(graph.node):
        if node.op_type != "Add":
            continue
        inputs = [t for x in node.input for t in terms(x)]
        if len(inputs) > 2:
            merged.update(x for x in node.input if len(terms(x)) > 1)
            graph.node[i].CopyFrom(helper.make_node("Sum", inputs, list(node.output), name=node.name))
            made_by[node.output[0]] = graph.node[i]
    # An inner Add merged into a later one is dropped; the later one (now a Sum) stays.
    drop_nodes(graph, merged)
    return len(merged)


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
