"""CPU lowering of quantized linears: `DequantizeLinear(int4|int8) → MatMul` rewritten into
ONNX Runtime's `com.microsoft.MatMulNBits`, each with its own accuracy level.

    W_q [K, N] int4/int8 ─┐
    scale ────────────────┴─DequantizeLinear─► W ─┐           A ─MatMulNBits(B [N, G, blk·bits/8] uint8,
    A [.., K] ────────────────────────────────────┴─MatMul  ==>     scales [N·G], K, N, bits, block_size,
                                                                    accuracy_level)─► Y

Why not leave it to ONNX Runtime: its own fusion of this pattern makes the same node,
but one session-wide accuracy level applies to all of them. Level 4 (int8 dot products,
activations quantized once per block of `block_size` inputs) is what makes int4 fast;
for int8 *per-channel* weights its block is the whole input row (576 or 1536 values),
one activation scale per row, and SmolLM2 then answers "L'Étoile, la Cité…" instead of
"Paris". Here int8 per-channel weights are packed in blocks of `int8_block` (the
channel's scale repeated per block: the same weights) so level 4 quantizes activations
per 128 inputs, as for int4.

Codes are stored unsigned with MatMulNBits' default zero point (8 for 4 bits, 128 for
8 bits), i.e. the graph's signed codes + 2^(bits−1); a short last block is padded with
zero codes. DequantizeLinear nodes with a zero point, fp8, or other layouts are left
alone. Operates in memory on an `onnx_ir` model (weights are read to be repacked).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"


def _initializer(value: ir.Value | None) -> np.ndarray | None:
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def pack_matmulnbits(codes: np.ndarray, scales: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed codes [K, N] and per-block scales [G, N] → MatMulNBits' B [N, G, block·bits/8]
    (uint8, low nibble first) and scales [N·G]."""
    k, n = codes.shape
    g = -(-k // block)
    if scales.shape != (g, n):
        raise ValueError(f"scales {scales.shape} do not match {g} blocks of {block} over {k} rows x {n}")
    padded = np.zeros((g * block, n), np.int16)
    padded[:k] = codes.astype(np.int16)
    u = (padded + (1 << (bits - 1))).astype(np.uint8).T.reshape(n, g, block)  # [N, G, block]
    if bits == 4:
        u = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(u), np.ascontiguousarray(scales.T).reshape(-1)


def lower_quantized_matmuls(model: ir.Model, *, int4_accuracy_level: int = 4, int8_accuracy_level: int = 4,
                            int8_block: int = 128) -> int:
    """Rewrite every eligible DequantizeLinear → MatMul of `model` in place; returns how many
    MatMuls became MatMulNBits."""
    graph = model.graph
    lowered = 0
    for dq in list(graph):
        if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
            continue
        if len(dq.inputs) > 2 and dq.inputs[2] is not None:
            continue  # zero points: not produced by llmbuild's graphs
        q, s = dq.inputs[0], dq.inputs[1]
        if q is None or q.dtype not in (ir.DataType.INT4, ir.DataType.INT8) or q.shape is None or len(q.shape) != 2:
            continue
        users = list(dq.outputs[0].uses())
        if not users or any(u.node.op_type != "MatMul" or u.idx != 1 for u in users):
            continue
        codes, scale = _initializer(q), _initializer(s)
        if codes is None or scale is None:
            continue
        axis, block = _attr(dq, "axis", 1), _attr(dq, "block_size", 0)
        k, n = (int(d) for d in codes.shape)
        if q.dtype == ir.DataType.INT4 and axis == 0 and block:
            bits, blk, per_block, level = 4, int(block), scale, int4_accuracy_level
        elif q.dtype == ir.DataType.INT8 and axis in (1, -1) and not block and scale.shape == (n,):
            bits, blk, level = 8, int8_block, int8_accuracy_level
            per_block = np.repeat(scale[None, :], -(-k // blk), axis=0)
        elif q.dtype == ir.DataType.INT8 and axis == 0 and block:
            bits, blk, per_block, level = 8, int(block), scale, int8_accuracy_level
        else:
            continue
        if blk < 16 or blk & (blk - 1):
            continue  # MatMulNBits blocks are powers of two >= 16
        packed, flat_scales = pack_matmulnbits(np.asarray(codes).astype(np.int16), np.asarray(per_block), bits, blk)
        b_val = ir.Value(name=f"{q.name}.nbits", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape(packed.shape),
                         const_value=ir.tensor(packed, name=f"{q.name}.nbits"))
        s_val = ir.Value(name=f"{q.name}.nbits_scales", type=s.type, shape=ir.Shape(flat_scales.shape),
                         const_value=ir.tensor(flat_scales.astype(scale.dtype), name=f"{q.name}.nbits_scales"))
        graph.register_initializer(b_val)
        graph.register_initializer(s_val)
        for use in users:
            mm = use.node
            node = ir.node("MatMulNBits", [mm.inputs[0], b_val, s_val],
                           {"K": k, "N": n, "bits": bits, "block_size": blk, "accuracy_level": level},
                           domain=MS_DOMAIN, name=f"{mm.name or q.name}.nbits")
            out, new = mm.outputs[0], node.outputs[0]
            new.type, new.shape = out.type, out.shape
            graph.insert_before(mm, node)
            name = out.name
            out.replace_all_uses_with(new, replace_graph_outputs=True)
            graph.remove(mm, safe=True)
            new.name = name
            lowered += 1
        graph.remove(dq, safe=True)
        for v in (q, s):
            if not v.uses() and v.name in graph.initializers:
                graph.initializers.pop(v.name)
    if lowered:
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return lowered
