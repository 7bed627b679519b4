"""CPU lowering of the routed-expert blocks (llmbuild/graph/moe.py) to ONNX Runtime's
fused `com.microsoft.MoE` (its CPU kernel, float32, ONNX Runtime 1.32: softmax over the
router logits, top-k, optional renormalisation, SwiGLU experts — HF's routing exactly;
checked against the standard graph and HF in tests/test_moe.py and the conformance suite):

    router_logits [B,S,E] ─Reshape [B·S, E]─Concat ×S (axis 1)───────────────┐
    x [B,S,H] (what the router reads) ────────────────────────────────────────┤
    fc1 [S·E, 2I/S, H] = gate/up rows interleaved (g0, u0, g1, u1, ...) ──────┤  (swiglu_fusion=1, the
    fc2 [S·E, H, I/S]  = down · S ────────────────────────────────────────────┴─► MoE(k·S) ─► y [B,S,H]
                                                                                  CPU kernel's only layout)

replacing TopK ─► Gather(stacked experts) ─► MatMul ... ReduceSum. fc1/fc2 are computed
from the stacked initializers by Transpose/Unsqueeze/Concat/Reshape nodes that ONNX
Runtime folds once at session creation (the artifact's weights are not duplicated on disk).

**Each expert is split in S = EXPERT_SHARDS slices of its width** (slice s of expert e is
kernel expert s·E + e, slice-major). The kernel hands each intra-op thread a contiguous
range of experts and runs one expert's GEMMs on one thread; a decode step (1 token, top-2)
whose two experts fall in the same half of the range ran on one of two threads. Sliced,
thread t of S gets slice t of every expert: both threads stream half of each picked expert,
whatever the routing. The router's logits are repeated S times, so the softmax gives every
slice p/S and top-(k·S) picks exactly the S slices of the k experts HF picks (the kernel
breaks ties by index, as before); the routing weight of a slice is w/S (renormalised or
not), which fc2 · S undoes (exact for S a power of 2); the kernel sums the slices' partial
down projections. Bytes read and FLOPs are those of whole experts. (Two experts whose
probabilities tie exactly at the k-th place could have their slices split; HF's topk and
the unsliced kernel already break such ties differently.) Measured on the 4-layer model of
benchmarks/moe, 2 threads: decode +6 % over whole experts; at 1 thread no loss
(benchmarks/moe/RESULTS.md, run f).
Quantized experts: llmbuild/lowering/moe_quantized.py (`com.microsoft.QMoE`), which runs first.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llmbuild.graph.annotations import MOE, nodes_with
from llmbuild.lowering.rewrite import MS_DOMAIN, float32_initializer, insert_in_order


EXPERT_SHARDS = 2  # slices per expert (module docstring); 2 threads share every expert


class MoELoweringError(ValueError):
    """A routed-expert block that does not have the shape llmbuild.graph.moe builds."""


def _float_weight(graph: ir.Graph, name: str) -> ir.Value:
    """Stacked initializer `name` as the float32 graph reads it."""
    weight = float32_initializer(graph, name)
    if weight is None:
        raise MoELoweringError(f"stacked expert weight {name} not found, or not float32 after promotion")
    return weight


def lower_moe_blocks(graph: ir.Graph, shards: int | None = None) -> int:
    """Replace every `llmbuild.moe` block with one com.microsoft.MoE; returns how many.
    Run after the float32 promotion and before dead-code removal. `shards`: each expert
    split in that many slices of its width (module docstring; 1 = whole experts; default
    EXPERT_SHARDS; an expert width it does not divide stays whole)."""
    shards = EXPERT_SHARDS if shards is None else shards
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
        s = shards if shards > 1 and inter % shards == 0 else 1
        fc1, fc2 = _sharded_experts(tape, const, gate, up, down, layer=layer, experts=experts, hidden=hidden,
                                    inter=inter, shards=s)
        rows = tape.op("Reshape", [logits, const(np.array([-1, experts], np.int64), f"moe.{layer}.rows")])
        if s > 1:  # every expert's logit once per slice, slice-major: [T, S·E]
            rows = tape.op("Concat", [rows] * s, {"axis": 1})
        y = tape.op("MoE", [x, rows, fc1, None, fc2, None], {
            "k": int(meta["top_k"]) * s, "activation_type": "swiglu", "swiglu_fusion": 1,
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


def _sharded_experts(tape: ir.tape.Tape, const, gate: ir.Value, up: ir.Value, down: ir.Value, *, layer: int,
                     experts: int, hidden: int, inter: int, shards: int) -> tuple[ir.Value, ir.Value]:
    """
    gate, up [E,H,I] ─Transpose─► [E,I,H] ─Unsqueeze(2)─Concat(axis 2)─► [E,I,2,H]   (g0,u0,g1,u1,...)
        ─Reshape [E,S,2I/S,H]─Transpose(1,0,2,3)─Reshape─► fc1 [S·E, 2I/S, H]
    down [E,I,H] ─Reshape [E,S,I/S,H]─Transpose(1,0,3,2)─Reshape─► [S·E, H, I/S] ─Mul(S)─► fc2

    Slice s of expert e is "expert" s·E + e of width I/S (S = 1: fc1 [E,2I,H], fc2 [E,H,I]).
    """
    name = f"moe.{layer}"
    s, part = shards, inter // shards
    axis2 = const(np.array([2], np.int64), f"{name}.axis2")
    g, u = (tape.op("Unsqueeze", [tape.op("Transpose", [w], {"perm": [0, 2, 1]}), axis2]) for w in (gate, up))
    fc1 = tape.op("Concat", [g, u], {"axis": 2})  # [E, I, 2, H]
    if s > 1:
        fc1 = tape.op("Transpose", [tape.op("Reshape", [fc1, const(np.array([experts, s, 2 * part, hidden], np.int64),
                                                                     f"{name}.fc1_slices")])], {"perm": [1, 0, 2, 3]})
    fc1 = tape.op("Reshape", [fc1, const(np.array([s * experts, 2 * part, hidden], np.int64), f"{name}.fc1_shape")])
    if s == 1:
        return fc1, tape.op("Transpose", [down], {"perm": [0, 2, 1]})  # [E, I, H] -> [E, H, I]
    fc2 = tape.op("Transpose", [tape.op("Reshape", [down, const(np.array([experts, s, part, hidden], np.int64),
                                                                 f"{name}.fc2_slices")])], {"perm": [1, 0, 3, 2]})
    fc2 = tape.op("Reshape", [fc2, const(np.array([s * experts, hidden, part], np.int64), f"{name}.fc2_shape")])
    return fc1, tape.op("Mul", [fc2, const(np.array(float(s), np.float32), f"{name}.slices")])
