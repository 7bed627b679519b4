"""Graph surgery shared by the rewrites in this package (onnx_ir, in memory): constants,
initializer reads, a fused node plus Split in place of several, order-preserving
insertion and dead-code removal."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"


def initializer_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()


def float32_initializer(graph: ir.Graph, name: str) -> ir.Value | None:
    """Initializer `name` as a float32 graph reads it: itself, or the Cast to float32 that
    the CPU lowering's promotion put after a 16-bit one; None if there is neither."""
    init = graph.initializers.get(name)
    if init is None or init.dtype == ir.DataType.FLOAT:
        return init
    for user, _ in init.uses():
        if user.op_type == "Cast" and user.outputs[0].dtype == ir.DataType.FLOAT:
            return user.outputs[0]
    return None


def constant(name: str, array: np.ndarray, like: ir.Value | None = None) -> ir.Value:
    dtype = like.type if like is not None else ir.TensorType(ir.DataType.from_numpy(array.dtype))
    return ir.Value(name=name, type=dtype, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))


def replace_with_split(graph: ir.Graph, nodes: list[ir.Node], fused: ir.Node, widths: list[int], name: str) -> None:
    """`fused` computes the outputs of `nodes` concatenated on the last axis (widths in
    order): insert it and a Split before the first of them; each node's output (its
    name, type and graph-output place) becomes the matching Split output; remove the
    nodes."""
    sizes = constant(f"{name}.split", np.array(widths, np.int64))
    graph.register_initializer(sizes)
    split = ir.node("Split", [fused.outputs[0], sizes], {"axis": -1}, num_outputs=len(nodes), name=f"{name}.split")
    graph.insert_before(nodes[0], [fused, split])
    for node, out in zip(nodes, split.outputs):
        old = node.outputs[0]
        out.type, out.shape = old.type or fused.outputs[0].type, old.shape
        old_name = old.name
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        old.name = f"{old_name}.unfused"
        out.name = old_name
    for node in nodes:
        graph.remove(node, safe=True)


def insert_in_order(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Insert tape nodes, each after the last graph node that produces one of its inputs."""
    position = {id(n): i for i, n in enumerate(graph)}
    for node in nodes:
        anchors = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
        anchors = [a for a in anchors if id(a) in position]
        if anchors:
            graph.insert_after(max(anchors, key=lambda a: position[id(a)]), node)
        else:
            graph.insert_before(next(iter(graph)), node)
        position = {id(n): i for i, n in enumerate(graph)}


def remove_unused(graph: ir.Graph) -> None:
    live_outputs = set(id(v) for v in graph.outputs)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not out.uses() and id(out) not in live_outputs for out in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.inputs]:
        del graph.initializers[name]


def drop_unused_initializers(graph: ir.Graph, values) -> None:
    for v in values:
        if v is not None and not v.uses() and v.name in graph.initializers and v not in graph.inputs:
            graph.initializers.pop(v.name)
