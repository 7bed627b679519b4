"""CPU lowering of routed-expert blocks whose experts are quantized (llmbuild/quantize/experts.py)
to ONNX Runtime's `com.microsoft.QMoE` (its CPU kernel, ONNX Runtime 1.32, float32
activations, uint8-packed codes):

    router_logits [B,S,E] ─Reshape [B·S, E]────────────────────────────────────────┐
    x [B,S,H] ─────────────────────────────────────────────────────────────────────┤
    fc1 [E, 2I, H/pack] uint8: gate/up rows interleaved, u = q + 2^(bits-1) ───────┤  (swiglu_fusion=1,
    fc1_scales [E, 2I] (int8 per channel) | [E, 2I, H/block] (int4 blocks) ────────┤   expert_weight_bits,
    fc2 [E, H, I/pack], fc2_scales ────────────────────────────────────────────────┴─► QMoE ─► y   block_size)

replacing DequantizeLinear ─► Gather ─► MatMul ... ReduceSum; the packed tensors are made
here from the artifact's codes and scales (QMoE dequantizes (u − zero point)·scale with
the default zero point 8 for 4 bits, 128 for 8 bits: exactly the graph's s·q).

QMoE's CPU kernel renormalises the top-k probabilities even with
`normalize_routing_weights=0` (measured: a session with the attribute 0 equals the
renormalised reference to 2e-7 and misses the unnormalised one by 30 % of the output), so
for the families that do not renormalise (Qwen2-MoE, Qwen3-MoE without norm_topk_prob) its
output is multiplied by Σ top-k p, the routing weights the graph already computes:

    QMoE(...) [B,S,H] ─Mul(ReduceSum(weights [B,S,k], axis -1) [B,S,1])─► y

Checked with a real session (ONNX Runtime 1.32, CPU) against a numpy reference of the same
dequantized weights: int4 in blocks of 32 and int8 per channel agree to 2e-7; int8 in blocks
of 32 was off by 1 % of the output's range, so int8 in blocks stays on the standard routed
path, as do asymmetric int4 (QMoE's zero points are integers, our offsets are floats) and
int4 blocks that do not divide the hidden and expert widths (QMoE requires it). Those blocks
keep the routed path with the Gather moved before the DequantizeLinear
(`_gather_before_dequantize`), so a step dequantizes only the picked experts.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llmbuild.graph.annotations import MOE, nodes_with
from llmbuild.lowering.rewrite import MS_DOMAIN, initializer_array, insert_in_order

_BITS = {ir.DataType.INT4: 4, ir.DataType.INT8: 8}


def _dequantize(graph: ir.Graph, name: str) -> ir.Node | None:
    """The DequantizeLinear reading the stacked expert codes `name` (None: float experts)."""
    codes = graph.initializers.get(name)
    if codes is None or codes.dtype not in _BITS:
        return None
    users = [u.node for u in codes.uses() if u.node.op_type == "DequantizeLinear"]
    return users[0] if users else None


def _scale_array(value: ir.Value) -> np.ndarray | None:
    """A DequantizeLinear's scale initializer, also through the float32 promotion's Cast."""
    found = initializer_array(value)
    if found is None and value.producer() is not None and value.producer().op_type == "Cast":
        found = initializer_array(value.producer().inputs[0])
    return None if found is None else found.astype(np.float32)


def _qmoe_layout(dqs: dict[str, ir.Node], graph: ir.Graph, hidden: int, inter: int):
    """(bits, block or None, {proj: (codes [E, in, out] int8, scales [E, G, out])}) when
    QMoE can run the block exactly, else None."""
    bits = {p: _BITS[dq.inputs[0].dtype] for p, dq in dqs.items()}
    blocks = {p: int(dq.attributes.get_int("block_size", 0)) for p, dq in dqs.items()}
    if len(set(bits.values())) != 1 or any(dq.inputs[0].name + ".offset" in graph.initializers for dq in dqs.values()):
        return None
    arrays = {}
    for p, dq in dqs.items():
        codes, scale = initializer_array(dq.inputs[0]), _scale_array(dq.inputs[1])
        if codes is None or scale is None:
            return None
        arrays[p] = (codes.astype(np.int8), scale)
    rows = {"gate": hidden, "up": hidden, "down": inter}
    b = bits["gate"]
    if b == 8:  # per channel only: one block of all rows
        if any(blocks[p] != rows[p] or arrays[p][1].shape[1] != 1 for p in dqs):
            return None
        return 8, None, arrays
    block = blocks["gate"]
    if len(set(blocks.values())) != 1 or block < 16 or block & (block - 1) or hidden % block or inter % block:
        return None
    if any(arrays[p][0].shape[1] != rows[p] for p in dqs):  # codes padded to whole blocks
        return None
    return 4, block, arrays


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes [E, out, in] → QMoE's uint8 [E, out, in·bits/8] (low nibble first)."""
    u = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    return u if bits == 8 else (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[E, I, ...] twice → [E, 2I, ...] with rows g0, u0, g1, u1, ... (swiglu_fusion=1)."""
    e, i = gate.shape[:2]
    return np.stack([gate, up], axis=2).reshape(e, 2 * i, *gate.shape[2:])


def _gather_before_dequantize(graph: ir.Graph, dq: ir.Node, tape: ir.tape.Tape) -> None:
    """
    DQ(codes [E,in_p,out], s [E,G,out]) ─Gather(idx)─► W [..,k,in_p,out]
      ==>  Gather(codes as int8, idx) ─┐
           Gather(s, idx) ─────────────┴─DQ(axis=-2, block_size)─► W      (the same values)

    For the blocks QMoE cannot run: a step then reads (and dequantizes) only the picked
    experts' codes, not all E experts' (ONNX Runtime's Gather takes int8, not int4: int4
    codes are widened to int8 here, in memory).
    """
    codes, scale = dq.inputs[0], dq.inputs[1]
    array = initializer_array(codes)
    if array is None:
        return
    if codes.dtype == ir.DataType.INT4:
        name = f"{codes.name}.int8"
        codes = tape.initializer(ir.tensor(array.astype(np.int8), name=name), name=name)
    block = dq.attributes.get_int("block_size", 0)
    for use in list(dq.outputs[0].uses()):
        gather = use.node
        if gather.op_type != "Gather" or use.idx != 0:
            continue
        idx = gather.inputs[1]
        gc = tape.op("Gather", [codes, idx], {"axis": 0})
        gs = tape.op("Gather", [scale, idx], {"axis": 0})
        w = tape.op("DequantizeLinear", [gc, gs], {"axis": -2, "block_size": block})
        w.shape, w.type = gather.outputs[0].shape, gather.outputs[0].type
        ir.convenience.replace_all_uses_with(gather.outputs[0], w)


def lower_quantized_moe_blocks(graph: ir.Graph) -> int:
    """Replace every `llmbuild.moe` block with quantized experts by one com.microsoft.QMoE
    where QMoE computes it exactly (see the module docstring); returns how many. Every
    quantized block loses its annotation, so that the float lowering (llmbuild.lowering.moe)
    leaves the others on the standard routed path. Run after the float32 promotion."""
    values = {v.name: v for n in graph for v in n.outputs if v.name}
    values.update({v.name: v for v in graph.inputs})
    tape = ir.tape.Tape()
    lowered = 0
    for node, meta in nodes_with(list(graph), MOE):
        dqs = {p: _dequantize(graph, meta["stacked"][p]) for p in ("gate", "up", "down")}
        if any(dq is None for dq in dqs.values()):
            continue  # float experts: llmbuild.lowering.moe
        del node.metadata_props[MOE]
        layer, experts, hidden, inter = meta["layer"], meta["experts"], meta["hidden"], meta["intermediate"]
        layout = _qmoe_layout(dqs, graph, hidden, inter)
        x, logits = values.get(meta["input"]), values.get(meta["logits"])
        if layout is None or x is None or logits is None:
            for dq in dqs.values():
                _gather_before_dequantize(graph, dq, tape)
            continue
        bits, block, arrays = layout

        def t(a):  # [E, in|G, out] -> [E, out, in|G]
            return np.ascontiguousarray(np.swapaxes(a, 1, 2))

        (gq, gs), (uq, us), (dq_, ds) = arrays["gate"], arrays["up"], arrays["down"]
        fc1 = _pack(_interleave(t(gq), t(uq)), bits)
        fc1_scales = _interleave(t(gs), t(us))
        fc2, fc2_scales = _pack(t(dq_), bits), t(ds)
        if block is None:  # per channel: [E, out, 1] -> [E, out]
            fc1_scales, fc2_scales = fc1_scales[..., 0], fc2_scales[..., 0]

        def const(array: np.ndarray, name: str) -> ir.Value:
            return tape.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)

        rows = tape.op("Reshape", [logits, const(np.array([-1, experts], np.int64), f"qmoe.{layer}.rows")])
        attrs = {"k": int(meta["top_k"]), "activation_type": "swiglu", "swiglu_fusion": 1,
                 "normalize_routing_weights": int(bool(meta["normalize"])), "activation_alpha": 1.0,
                 "activation_beta": 0.0, "expert_weight_bits": bits}
        if block is not None:
            attrs["block_size"] = block
        y = tape.op("QMoE", [x, rows, const(fc1, f"qmoe.{layer}.fc1"), const(fc1_scales.astype(np.float32),
                                                                              f"qmoe.{layer}.fc1_scales"),
                             None, const(fc2, f"qmoe.{layer}.fc2"),
                             const(fc2_scales.astype(np.float32), f"qmoe.{layer}.fc2_scales")],
                    attrs, domain=MS_DOMAIN)
        if not meta["normalize"]:  # QMoE renormalises the top-k whatever the attribute: scale back by Σ top-k p
            weights = values.get(meta["weights"])
            if weights is None:
                raise ValueError(f"layer {layer}: the MoE annotation names {meta['weights']}, which the graph lacks")
            total = tape.op("ReduceSum", [weights, const(np.array([-1], np.int64), f"qmoe.{layer}.last_axis")],
                            {"keepdims": 1})  # [B, S, 1]
            y = tape.op("Mul", [y, total])
        y.name = f"moe.{layer}.fused"
        old = node.outputs[0]
        y.shape, y.type = old.shape, ir.TensorType(ir.DataType.FLOAT)
        ir.convenience.replace_all_uses_with(old, y)
        lowered += 1
    for value in tape.initializers:
        graph.register_initializer(value)
    insert_in_order(graph, tape.nodes)
    return lowered
