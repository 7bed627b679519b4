"""CPU lowering of the routed-expert blocks (llmbuild/graph/moe.py) to ONNX Runtime's
fused `com.microsoft.MoE` (its CPU kernel, float32, ONNX Runtime 1.32: softmax over the
router logits, top-k, optional renormalisation, SwiGLU experts — HF's routing exactly;
checked against the standard graph and HF in tests/test_moe.py and the conformance suite):

    router_logits [B,S,E] ─Reshape [B·S, E]──────────────────────────────┐
    x [B,S,H] (what the router reads) ───────────────────────────────────┤
    fc1 [E, 2I, H] = gate/up rows interleaved (g0, u0, g1, u1, ...) ─────┤   (swiglu_fusion=1, the
    fc2 [E, H, I]  = down ───────────────────────────────────────────────┴─► MoE ─► y [B,S,H]   CPU kernel's only layout)

replacing TopK ─► Gather(stacked experts) ─► MatMul ... ReduceSum. fc1/fc2 are computed
from the stacked initializers by Transpose/Unsqueeze/Concat/Reshape nodes that ONNX
Runtime folds once at session creation (the artifact's weights are not duplicated on disk).
Quantized experts: llmbuild/lowering/moe_quantized.py (`com.microsoft.QMoE`), which runs first.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llmbuild.graph.annotations import MOE, nodes_with
from llmbuild.lowering.rewrite import MS_DOMAIN, float32_initializer, insert_in_order


class MoELoweringError(ValueError):
    """A routed-expert block that does not have the shape llmbuild.graph.moe builds."""


def _float_weight(graph: ir.Graph, name: str) -> ir.Value:
    """Stacked initializer `name` as the float32 graph reads it."""
    weight = float32_initializer(graph, name)
    if weight is None:
        raise MoELoweringError(f"stacked expert weight {name} not found, or not float32 after promotion")
    return weight


def lower_moe_blocks(graph: ir.Graph) -> int:
    """Replace every `llmbuild.moe` block with one com.microsoft.MoE; returns how many.
    Run after the float32 promotion and before dead-code removal."""
    blocks = nodes_with(list(graph), MOE)
    if not blocks:
        return 0
    values = {v.name: v for n in graph for v in n.outputs if v.name}
    values.update({v.name: v for v in graph.inputs})
    tape = ir.tape.Tape()

    def const(array: np.ndarray, name: str) -> ir.Value:
        return tape.initializer(ir.tensor(array, name=name), name=name)

    for node, meta in blocks:
        layer, experts, hidden, inter = meta["layer"], meta["experts"], meta["hidden"], meta["intermediate"]
        x, logits = values.get(meta["input"]), values.get(meta["logits"])
        if x is None or logits is None:
            raise MoELoweringError(f"layer {layer}: the MoE annotation names {meta['input']} / {meta['logits']}, "
                                   "which the graph does not have")
        gate, up, down = (_float_weight(graph, meta["stacked"][p]) for p in ("gate", "up", "down"))
        # [E, H, I] -> [E, I, H] -> [E, I, 1, H]; gate/up interleaved on the new axis -> [E, 2I, H]
        axis2 = const(np.array([2], np.int64), f"moe.{layer}.axis2")
        g, u = (tape.op("Unsqueeze", [tape.op("Transpose", [w], {"perm": [0, 2, 1]}), axis2]) for w in (gate, up))
        fc1 = tape.op("Reshape", [tape.op("Concat", [g, u], {"axis": 2}),
                                  const(np.array([experts, 2 * inter, hidden], np.int64), f"moe.{layer}.fc1_shape")])
        fc2 = tape.op("Transpose", [down], {"perm": [0, 2, 1]})  # [E, I, H] -> [E, H, I]
        rows = tape.op("Reshape", [logits, const(np.array([-1, experts], np.int64), f"moe.{layer}.rows")])
        y = tape.op("MoE", [x, rows, fc1, None, fc2, None], {
            "k": int(meta["top_k"]), "activation_type": "swiglu", "swiglu_fusion": 1,
            "normalize_routing_weights": int(bool(meta["normalize"])), "activation_alpha": 1.0,
            "activation_beta": 0.0}, domain=MS_DOMAIN)
        y.name = f"moe.{layer}.fused"
        old = node.outputs[0]
        y.shape, y.type = old.shape, ir.TensorType(ir.DataType.FLOAT)
        ir.convenience.replace_all_uses_with(old, y)
    for value in tape.initializers:
        graph.register_initializer(value)
    insert_in_order(graph, tape.nodes)
    return len(blocks)
