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
"Paris". Here int8 per-channel weights are packed in blocks of the largest power of two
in [16, `int8_block`] that divides K (576 → 64, 1536 → 128; `int8_block` if none does,
the last block then padded), the channel's scale repeated per block (the same weights),
so level 4 quantizes activations per block of at most 128 inputs, as for int4.

int4 codes stored padded to whole blocks come with a Pad that widens the activation by
as many zero columns (llmbuild.quantize.graph); MatMulNBits takes a short last block
itself, so the MatMulNBits reads the unpadded activation (K = its width) and only the
first K rows of codes are packed. The dropped rows only ever multiplied zeros: exact.

    x [.., 576] ─Pad(0..64)─► x' [.., 640] ─MatMul(x', DQ(q [640, N]))  ==>  x ─MatMulNBits(K=576)─►

Codes are stored unsigned with MatMulNBits' default zero point (8 for 4 bits, 128 for
8 bits), i.e. the graph's signed codes + 2^(bits−1); a short last block is padded with
zero codes. int8 in blocks (`group_size`) keeps its blocks. DequantizeLinear nodes with
a zero point, fp8, or other layouts are left alone. Operates in memory on an `onnx_ir`
model (weights are read to be repacked).

Asymmetric int4 and int8 in blocks (w = s·q + o per block; the standard graph adds
(x summed per block)·o, llmbuild.quantize.graph) keep the offset term: MatMulNBits without
zero points computes x·(s·q), and the Add of (x summed per block)·o stays as the standard
graph has it (exact; G = K/32 columns of block sums, 1/32 of the main product's work at
g32; fused siblings share one product and Add, `fuse_sibling_matmulnbits`):

    y = MatMul(x, DQ(q, s)) + MatMul(MatMul(x, indicator), o)  ==>  MatMulNBits(x, B, s) + (same term)

Why not zero points: ONNX Runtime 1.32's CPU MatMulNBits takes uint8 (integer) zero
points for 8 bits, which cannot hold a float offset, and refuses float zero points at 8
bits when the session is made ("MatMulNBits on CPU does not support 8-bit weights with
floating-point zero points; use uint8 zero points"). At 4 bits it takes float zero points
(w = s·(u − zp), u = q + 8, zp = 8 − o/s; `int4_float_zero_points=True` folds the term
into them), but then skips MLAS's prepacked kernels and dequantizes the weight at every
call: SmolLM2 int4 asym g32 decoded 9–13 tokens/s that way against 87–116 with the offset
term kept (2026-12-02, benchmarks/quantization/NOTES.md).

int4 with `scale_bits: 8` (scale and offset tables as 8-bit codes · a float32 step per
column, decoded in the standard graph) is first folded to those float tables
(`fold_decoded_tables`, in memory: the lowered graph carries the decoded tables, the
artifact's standard graph the codes), then lowered as above.

`fuse_sibling_matmulnbits` then makes one MatMulNBits of those reading the same
activation (q/k/v, gate/up), as the float lowering does for plain MatMuls.
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir

from llmbuild.lowering.rewrite import (MS_DOMAIN, constant, drop_unused_initializers, initializer_array,
                                       insert_in_order, replace_with_split)


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


def int8_block_size(k: int, largest: int = 128) -> int:
    """MatMulNBits block for int8 per-channel weights of K input rows: the largest power of
    two in [16, largest] that divides K (no padded block), else `largest`."""
    blk = largest
    while blk >= 16:
        if k % blk == 0:
            return blk
        blk //= 2
    return largest


def _block_pad(x: ir.Value, rows: int) -> tuple[ir.Node, int] | None:
    """(the Pad, its width) when `x` is `Pad(x0, pads=[0, w], axes=[-1])` with zeros, i.e. the
    activation widened to `rows` stored code rows (llmbuild.quantize.graph); else None."""
    pad = x.producer()
    if pad is None or pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx"):
        return None
    if _attr(pad, "mode", "constant") != "constant" or len(pad.inputs) < 2:
        return None
    pads = initializer_array(pad.inputs[1])
    fill = initializer_array(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] is not None else np.zeros(())
    axes = initializer_array(pad.inputs[3]) if len(pad.inputs) > 3 and pad.inputs[3] is not None else None
    if pads is None or fill is None or np.any(fill != 0):
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if axes is not None:
        if [int(a) for a in np.asarray(axes).reshape(-1)] != [-1] or len(pads) != 2:
            return None
    elif len(pads) < 2 or any(pads[: len(pads) // 2]) or any(pads[len(pads) // 2 : -1]):
        return None
    width = pads[-1]
    if pads[len(pads) // 2 - 1] != 0 or not 0 < width < rows:
        return None
    shape = pad.inputs[0].shape
    if shape is not None and len(shape) and isinstance(shape[-1], int) and shape[-1] != rows - width:
        return None
    return pad, width


def _offset_term(y: ir.Value, a: ir.Value, k: int, blk: int) -> tuple[ir.Node, ir.Value, np.ndarray] | None:
    """(the Add, the other MatMul input's offset o [G, N]) when `y` (a MatMul of the
    activation `a`) feeds only `Add(y, MatMul(MatMul(a, indicator [k, G]), o))` with a 0/1
    indicator of blocks of `blk` rows: asymmetric int4's offset term; else None."""
    found = _offset_add(y)
    if found is None:
        return None
    add, sums_out, offset = found
    sums = sums_out.producer()
    if sums.inputs[0] is not a:
        return None
    ind = initializer_array(sums.inputs[1])
    g = -(-k // blk)
    if ind is None or ind.shape != (k, g) or offset.shape[0] != g:
        return None
    expected = np.zeros((k, g), ind.dtype)
    expected[np.arange(k), np.arange(k) // blk] = 1
    if not np.array_equal(ind, expected):
        return None
    return add, offset


def _drop_offset_term(graph: ir.Graph, add: ir.Node, y: ir.Value) -> None:
    """Remove an offset term's Add (its output now `y`'s) and what only it used."""
    corr = next(v.producer() for v in add.inputs if v is not None and v is not y)
    out = add.outputs[0]
    name = out.name
    out.replace_all_uses_with(y, replace_graph_outputs=True)
    graph.remove(add, safe=True)
    y.name = name
    sums, offset = corr.inputs[0].producer(), corr.inputs[1]
    graph.remove(corr, safe=True)
    drop_unused_initializers(graph, [offset])
    if not sums.outputs[0].uses():
        indicator = sums.inputs[1]
        graph.remove(sums, safe=True)
        drop_unused_initializers(graph, [indicator])


# Metadata of the constant-only nodes of the standard graph that the lowering folds: int4's
# `scale_bits: 8` tables and the block indicators (llmbuild.quantize.graph writes it;
# fold_decoded_tables reads it).
DECODE_MARK = "llmbuild.decoded_table"


def fold_decoded_tables(model: ir.Model) -> int:
    """Replace the constant subgraphs the quantized graph marks with DECODE_MARK by their
    values: int4's `scale_bits: 8` tables (llmbuild.quantize.graph._decoded_table:
    DequantizeLinear(int8 codes, float32 step, axis=1) [→ Add(step · 128)] [→ Cast]),
    computed as the graph computes them (exact in float32, one rounding by the Cast), and
    the asymmetric schemes' block indicators (Expand → Reshape of an identity), so that
    `lower_quantized_matmuls` sees float scales, offsets and indicators. In memory only:
    the artifact keeps the compact forms. Returns how many values were folded."""
    graph = model.graph
    marked = [node for node in graph if node.metadata_props.get(DECODE_MARK)]
    values: dict[int, np.ndarray] = {}

    def array(v: ir.Value) -> np.ndarray | None:
        return values[id(v)] if id(v) in values else initializer_array(v)

    for node in marked:
        ins = [array(v) for v in node.inputs]
        if any(a is None for a in ins):
            raise ValueError(f"{node.name}: a scale_bits table decoded from a value that is not a constant")
        if node.op_type == "DequantizeLinear":
            out = ins[0].astype(np.float32) * ins[1][None, :].astype(np.float32)  # [G, n] codes, [n] step (axis 1)
        elif node.op_type == "Mul":
            out = ins[0] * ins[1]
        elif node.op_type == "Add":
            out = ins[0] + ins[1]
        elif node.op_type == "Cast":
            out = ins[0].astype(ir.DataType(_attr(node, "to")).numpy())
        elif node.op_type == "Expand":  # the block indicator (quantize.graph.block_indicator)
            out = ins[0] * np.ones(tuple(int(d) for d in ins[1]), ins[0].dtype)
        elif node.op_type == "Reshape":
            out = ins[0].reshape(tuple(int(d) for d in ins[1]))
        else:
            raise ValueError(f"{node.name}: unexpected {node.op_type} in a scale_bits table")
        values[id(node.outputs[0])] = out
    folded = 0
    for node in marked:
        v = node.outputs[0]
        if v.is_graph_output() or any(not u.node.metadata_props.get(DECODE_MARK) for u in v.uses()):
            c = constant(f"{v.name}.folded", np.ascontiguousarray(values[id(v)]))
            v.replace_all_uses_with(c, replace_graph_outputs=True)
            c.name = v.name
            v.name = f"{c.name}.decoded_in_graph"
            graph.register_initializer(c)
            folded += 1
    inputs = [v for node in marked for v in node.inputs]
    for node in reversed(marked):
        graph.remove(node, safe=True)
    drop_unused_initializers(graph, inputs)
    return folded


# int8 stored in blocks (`group_size`) runs at accuracy level 4 *with the activation
# residual* (`add_activation_residuals`): plain level 4 quantizes activations to int8 per
# block (0.5 % error per product), and on SmolLM2 int8 g32 answers "What is the capital of
# France?" with "L'Étoile, la Cité…" (the standard graph: "The capital of France is Paris.";
# benchmarks/quantization/NOTES.md, 2026-12-01); level 1 (float32 activations) is exact
# but ONNX Runtime 1.32's 8-bit float kernel dequantizes the weight at every call: SmolLM2
# int8 g32 decoded 4.4 tokens/s against 46.8 for float32 (benchmarks/quantization/NOTES.md,
# 2026-12-02). The residual keeps level 4's kernel and float32-level error.
INT8_BLOCK_ACCURACY_LEVEL = 4
RESIDUAL_MARK = "llmbuild.activation_residual"  # metadata of MatMulNBits that get the residual
RESIDUAL_MAX_ROWS = 64  # passes of more rows run int8 blocks at level 1 (add_activation_residuals)


def lower_quantized_matmuls(model: ir.Model, *, int4_accuracy_level: int = 4, int8_accuracy_level: int = 4,
                            int8_block: int = 128, int8_block_accuracy_level: int = INT8_BLOCK_ACCURACY_LEVEL,
                            int8_block_residual: bool = True, int4_float_zero_points: bool = False) -> int:
    """Rewrite every eligible DequantizeLinear → MatMul of `model` in place; returns how many
    MatMuls became MatMulNBits. `int8_accuracy_level` applies to int8 per channel,
    `int8_block_accuracy_level` to int8 in blocks; at level 4 those are marked for
    `add_activation_residuals` unless `int8_block_residual` is false."""
    graph = model.graph
    lowered = 0
    bypassed: list[ir.Node] = []  # Pads whose MatMuls now read their input
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
        codes, scale = initializer_array(q), initializer_array(s)
        if codes is None or scale is None:
            continue
        axis, block = _attr(dq, "axis", 1), _attr(dq, "block_size", 0)
        k, n = (int(d) for d in codes.shape)
        if q.dtype == ir.DataType.INT4 and axis == 0 and block:
            bits, blk, per_block, level = 4, int(block), scale, int4_accuracy_level
        elif q.dtype == ir.DataType.INT8 and axis in (1, -1) and not block and scale.shape == (n,):
            bits, blk, level = 8, int8_block_size(k, int8_block), int8_accuracy_level
            per_block = np.repeat(scale[None, :], -(-k // blk), axis=0)
        elif q.dtype == ir.DataType.INT8 and axis == 0 and block:
            bits, blk, per_block, level = 8, int(block), scale, int8_block_accuracy_level
        else:
            continue
        if blk < 16 or blk & (blk - 1):
            continue  # MatMulNBits blocks are powers of two >= 16
        packed: dict[int, tuple[ir.Value, ir.Value]] = {}  # K -> (B, scales)
        for use in users:
            mm = use.node
            a, width = mm.inputs[0], k
            # asymmetric: the offset term stays, unless int4 is asked for float zero points (module doc)
            fold = bits == 4 and int4_float_zero_points and a is not None
            term = _offset_term(mm.outputs[0], a, k, blk) if fold else None
            found = _block_pad(a, k) if a is not None else None
            if found is not None:
                pad, pad_width = found
                a, width = pad.inputs[0], k - pad_width
                bypassed.append(pad)
            if width not in packed:
                g = -(-width // blk)
                b, flat = pack_matmulnbits(np.asarray(codes[:width]).astype(np.int16), np.asarray(per_block[:g]),
                                           bits, blk)
                suffix = f".k{width}" if packed else ""  # one width per weight in practice
                b_val = constant(f"{q.name}.nbits{suffix}", b)
                s_val = constant(f"{q.name}.nbits_scales{suffix}", flat.astype(scale.dtype), like=s)
                graph.register_initializer(b_val)
                graph.register_initializer(s_val)
                packed[width] = b_val, s_val
            b_val, s_val = packed[width]
            inputs = [a, b_val, s_val]
            if term is not None:  # w = s·q + o = s·(u − zp), u = q + 8: zp = 8 − o/s
                g = -(-width // blk)
                zp = (8.0 - term[1][:g].astype(np.float32) / np.asarray(per_block[:g], np.float32))
                inputs.append(constant(f"{q.name}.nbits_zero_points", np.ascontiguousarray(zp.T).reshape(-1)
                                       .astype(scale.dtype), like=s))
                graph.register_initializer(inputs[-1])
            node = ir.node("MatMulNBits", inputs,
                           {"K": width, "N": n, "bits": bits, "block_size": blk, "accuracy_level": level},
                           domain=MS_DOMAIN, name=f"{mm.name or q.name}.nbits")
            if bits == 8 and block and level == 4 and int8_block_residual:
                node.metadata_props[RESIDUAL_MARK] = "1"
            _replace_node(graph, mm, node)
            if term is not None:
                _drop_offset_term(graph, term[0], node.outputs[0])
            lowered += 1
        graph.remove(dq, safe=True)
        drop_unused_initializers(graph, (q, s))
    for pad in {id(p): p for p in bypassed}.values():
        if not pad.outputs[0].uses() and not pad.outputs[0].is_graph_output():
            graph.remove(pad, safe=True)
            drop_unused_initializers(graph, pad.inputs[1:])
    if lowered:
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return lowered


def fuse_sibling_matmulnbits(model: ir.Model) -> int:
    """
    A ─┬─MatMulNBits(B1, s1, N1)─► y1         A ─MatMulNBits(B1‖B2‖B3, s1‖s2‖s3, N1+N2+N3)─Split(-1)─► y1, y2, y3
       ├─MatMulNBits(B2, s2, N2)─► y2   ==>
       └─MatMulNBits(B3, s3, N3)─► y3
    MatMulNBits nodes reading the same A with the same K, bits, block size, accuracy level
    and scale dtype, all with float zero points or none, without g_idx or bias (q/k/v;
    gate/up): one kernel call
    (and, at accuracy level 4, one quantization of A) instead of several. B [N, G, ·] and
    the scales [N·G] are N-major, so they concatenate along N; the result is the same
    per output column (zero points [N·G] too). Returns how many nodes were merged away.
    """
    graph = model.graph
    groups: dict[tuple, list[ir.Node]] = {}
    for node in graph:
        if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN or node.inputs[0] is None:
            continue
        if len(node.inputs) < 3 or any(v is not None for v in node.inputs[4:]):
            continue
        zp = node.inputs[3] if len(node.inputs) > 3 else None
        b, s = initializer_array(node.inputs[1]), initializer_array(node.inputs[2])
        if b is None or s is None or b.ndim != 3 or (zp is not None and (zp.dtype != node.inputs[2].dtype or
                                                                         initializer_array(zp) is None)):
            continue
        key = (id(node.inputs[0]), _attr(node, "K"), _attr(node, "bits", 4), _attr(node, "block_size"),
               _attr(node, "accuracy_level", 0), node.inputs[2].dtype, zp is not None,
               node.metadata_props.get(RESIDUAL_MARK))
        groups.setdefault(key, []).append(node)
    merged = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        widths = [int(_attr(n, "N")) for n in nodes]
        bs = [n.inputs[1] for n in nodes]
        ss = [n.inputs[2] for n in nodes]
        prefix = os.path.commonprefix([b.name for b in bs]).rpartition(".")[0] + "."  # model.layers.0.mlp.
        name = prefix + "+".join(b.name[len(prefix):] for b in bs)
        b_val = constant(name, np.concatenate([initializer_array(b) for b in bs], axis=0))
        s_val = constant(f"{name}.scales", np.concatenate([initializer_array(s).reshape(-1) for s in ss]), like=ss[0])
        zps = [n.inputs[3] for n in nodes if len(n.inputs) > 3 and n.inputs[3] is not None]
        extra = [constant(f"{name}.zero_points", np.concatenate([initializer_array(z) for z in zps]), like=zps[0])
                 ] if zps else []
        for v in (b_val, s_val, *extra):
            graph.register_initializer(v)
        first = nodes[0]
        attrs = {k: a.value for k, a in first.attributes.items()}
        fused = ir.node("MatMulNBits", [first.inputs[0], b_val, s_val, *extra], {**attrs, "N": sum(widths)},
                        domain=MS_DOMAIN, name=f"{first.name}+{len(nodes) - 1}")
        fused.metadata_props.update(first.metadata_props)
        fused.outputs[0].type = first.outputs[0].type
        terms = [_offset_add(n.outputs[0]) for n in nodes]
        replace_with_split(graph, nodes, fused, widths, first.name)
        drop_unused_initializers(graph, [*bs, *ss, *zps])
        if all(terms) and len({id(t[1]) for t in terms}) == 1:
            _fuse_offset_terms(graph, fused, terms, name)
        merged += len(nodes) - 1
    return merged


def _offset_add(y: ir.Value) -> tuple[ir.Node, ir.Value, np.ndarray] | None:
    """(the Add, the block sums, o [G, N]) when `y` feeds only an asymmetric scheme's
    offset term `Add(y, MatMul(block sums, o))` (llmbuild.quantize.graph); else None."""
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    corr = add.inputs[1 - uses[0].idx].producer()
    if corr is None or corr.op_type != "MatMul" or corr.inputs[0] is None or len(corr.outputs[0].uses()) != 1:
        return None
    offset, sums = initializer_array(corr.inputs[1]), corr.inputs[0].producer()
    if offset is None or offset.ndim != 2 or sums is None or sums.op_type != "MatMul":
        return None
    return add, corr.inputs[0], offset


def _fuse_offset_terms(graph: ir.Graph, fused: ir.Node, terms: list, name: str) -> None:
    """
    MatMulNBits(fused) ─Split─► y_i ─(+ sums·o_i)─►   ==>   MatMulNBits(fused) ─(+ sums·[o_1 … o_k])─Split─► y_i
    Siblings' offset terms (same block sums, q/k/v; gate/up) as one product and one Add
    before the Split: two nodes per group instead of two per linear (decode runs each small
    node at a fixed cost)."""
    sums = terms[0][1]
    o_val = constant(f"{name}.offset", np.concatenate([t[2] for t in terms], axis=1))
    graph.register_initializer(o_val)
    corr = ir.node("MatMul", [sums, o_val], name=f"{name}.offset_product")
    add = ir.node("Add", [fused.outputs[0], corr.outputs[0]], name=f"{name}.offset_add")
    add.outputs[0].type = fused.outputs[0].type
    split = next(u.node for u in fused.outputs[0].uses())
    split.replace_input_with(0, add.outputs[0])
    graph.remove(split)  # re-inserted after the Add, itself after the block sums (made after the first linear)
    insert_in_order(graph, [corr, add, split])
    for t in terms:  # each sibling's own term (its Split output already in place of its MatMulNBits)
        y = next(v for v in t[0].inputs if v is not None and v.producer() is split)
        _drop_offset_term(graph, t[0], y)


def add_activation_residuals(model: ir.Model, max_rows: int = RESIDUAL_MAX_ROWS) -> int:
    """Give every MatMulNBits marked `RESIDUAL_MARK` (int8 blocks at accuracy level 4) its
    activation residual for passes of at most `max_rows` rows; returns how many nodes got
    one.

    At level 4 ONNX Runtime quantizes each row of A to int8 per block of `block_size`
    inputs (scale max|a|/127) before the integer dot products: 0.5 % error per product.
    Here A is split into the part that grid holds exactly and the rest, both rows go
    through the same kernel call, and the two results are added:

        â = round(a / s)·s, s = max(max|a_block|, tiny)/127     (per row, per block)
        r = a − â
        A ─► [â ; r] (Concat on axis 0) ─MatMulNBits(level 4)─► [y₁ ; y₂] ─Split(0)─► y₁ + y₂

    The kernel requantizes â to the same codes (its scale is max|â|/127 = s: exact), and
    r (|r| ≤ s/2) with its own scale, so what is left is the quantization error of r:
    about 1/254 of plain level 4's (tests/test_activation_residual.py). The weights are
    read once for both rows, so a decode step costs about what plain level 4 costs.

    A pass of more rows (a prefill) does twice the integer work that way, while level 1
    (float32 activations: exact) costs a fixed dequantization of the weight per call plus
    little per row; with ONNX Runtime 1.32 on 2 AVX2 cores the two cross near 64 rows
    (benchmarks/quantization/NOTES.md, 2026-12-02). So each node becomes

        If(rows(A) ≤ max_rows) ─then─► the residual construction at level 4
                               └else─► the same MatMulNBits at level 1

    Both branches read the same packed weights. Activations whose width is not a whole
    number of blocks are padded with zeros for the block maxima (the kernel's short last
    block has the same maximum)."""
    graph = model.graph
    marked = [n for n in graph if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN
              and n.metadata_props.get(RESIDUAL_MARK) == "1" and n.inputs[0] is not None]
    if not marked:
        return 0
    limit = constant("residual.max_rows", np.array(max_rows, np.int64))
    graph.register_initializer(limit)
    conds: dict[int, ir.Value] = {}
    for node in marked:
        a = node.inputs[0]
        attrs = {key: attr.value for key, attr in node.attributes.items()}
        if id(a) not in conds:  # rows(A) <= max_rows, once per activation
            rows = ir.node("Shape", [a], {"end": -1}, name=f"{node.name}.rows")
            count = ir.node("ReduceProd", [rows.outputs[0]], {"keepdims": 0}, name=f"{node.name}.row_count")
            few = ir.node("LessOrEqual", [count.outputs[0], limit], name=f"{node.name}.few_rows")
            for n in (rows, count, few):
                n.outputs[0].name = n.name
            graph.insert_before(node, [rows, count, few])
            conds[id(a)] = few.outputs[0]
        stacked, residual_nodes = _residual_rows(graph, node.name, a, int(attrs["K"]), int(attrs["block_size"]))
        level4 = ir.node("MatMulNBits", [stacked, *node.inputs[1:]], attrs, domain=MS_DOMAIN, name=f"{node.name}.residual")
        halves = ir.node("Split", [level4.outputs[0]], {"axis": 0, "num_outputs": 2}, num_outputs=2,
                         name=f"{node.name}.residual_split")
        add = ir.node("Add", list(halves.outputs), name=f"{node.name}.residual_add")
        level1 = ir.node("MatMulNBits", list(node.inputs), {**attrs, "accuracy_level": 1}, domain=MS_DOMAIN,
                         name=f"{node.name}.float")
        out = node.outputs[0]
        for n in (level4, halves, add, level1):
            for j, v in enumerate(n.outputs):
                v.type, v.name = out.type, f"{n.name}.out{j}"
        then = ir.Graph([], [add.outputs[0]], nodes=[*residual_nodes, level4, halves, add], name=f"{node.name}.then")
        other = ir.Graph([], [level1.outputs[0]], nodes=[level1], name=f"{node.name}.else")
        branch = ir.node("If", [conds[id(a)]], {"then_branch": then, "else_branch": other}, name=f"{node.name}.if")
        _replace_node(graph, node, branch)
    return len(marked)


def _replace_node(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Insert `new` before `old`; its output takes over `old`'s (uses, name, type, shape,
    graph-output place); remove `old`."""
    out, value = old.outputs[0], new.outputs[0]
    value.type, value.shape = out.type, out.shape
    graph.insert_before(old, new)
    name = out.name
    out.replace_all_uses_with(value, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    value.name = name


def _residual_rows(graph: ir.Graph, base: str, a: ir.Value, k: int, blk: int) -> tuple[ir.Value, list[ir.Node]]:
    """[â ; r] of `add_activation_residuals` for activation `a` (last axis `k` wide) and the
    nodes that compute it (for a subgraph; their constants become `graph`'s initializers)."""
    dtype = a.dtype or ir.DataType.FLOAT
    np_dtype = dtype.numpy()
    base += ".residual"
    g = -(-k // blk)
    consts = {"shape": np.array([-1, g, blk], np.int64), "axes": np.array([-1], np.int64),
              "tiny": np.array(np.finfo(np_dtype).tiny, np_dtype), "inv127": np.array(1 / 127, np_dtype)}
    if g * blk != k:
        consts.update(pads=np.array([0, g * blk - k], np.int64), zero=np.array([0], np.int64),
                      k=np.array([k], np.int64))
    c = {key: constant(f"{base}.{key}", value) for key, value in consts.items()}
    for value in c.values():
        graph.register_initializer(value)
    nodes: list[ir.Node] = []

    def op(op_type, inputs, attrs=None):
        name = f"{base}.{op_type.lower()}{len(nodes)}"
        nodes.append(ir.node(op_type, inputs, attrs or {}, name=name))
        nodes[-1].outputs[0].name = name  # subgraph values need names unique in the model
        return nodes[-1].outputs[0]

    wide = op("Pad", [a, c["pads"], None, c["axes"]]) if g * blk != k else a
    blocks = op("Reshape", [wide, c["shape"]])
    amax = op("ReduceMax", [op("Abs", [blocks]), c["axes"]], {"keepdims": 1})
    scale = op("Mul", [op("Max", [amax, c["tiny"]]), c["inv127"]])
    on_grid = op("Mul", [op("Round", [op("Div", [blocks, scale])]), scale])
    on_grid = op("Reshape", [on_grid, op("Shape", [wide])])
    if g * blk != k:
        on_grid = op("Slice", [on_grid, c["zero"], c["k"], c["axes"]])
    rest = op("Sub", [a, on_grid])
    rows = op("Concat", [on_grid, rest], {"axis": 0})
    for v in (on_grid, rest, rows):
        v.type = a.type
    return rows, nodes
