"""Rewrite a decoder graph's linear weights into quantized initializers + DequantizeLinear.

Nothing is computed here: every new initializer is an `onnx_ir.LazyTensor`, so that
`ir.save` quantizes one weight at a time while it streams the weights to disk (the
weight's codes, scales and offsets are computed once, handed out as the
saver asks for them, then dropped).

Symmetric weights (int8, int4, fp8):

    W_q [in,out] int8|int4|fp8 ─┐
    scale ──────────────────────┴─DequantizeLinear(axis, block_size)─► W ─┐
    x ────────────────────────────────────────────────────────────────────┴─MatMul─► y

int4 and int8 in blocks (`group_size`) with a short last block (576 input rows in groups
of 128): TensorRT derives the block size as rows / scale rows, so the codes are stored
padded with zero rows to whole blocks and the activation gets as many zero columns (one
Pad per distinct input):

    x [.., 576] ─Pad(axes=[-1], 0..64)─► x' [.., 640] ─MatMul(x', DequantizeLinear(q [640, out], s [5, out]))

Asymmetric int4 and int8 (w = s·q + o, o a float per block, as llama.cpp's Q4_1): DequantizeLinear
cannot hold it (its zero point is an integer on the code grid, and TensorRT takes only
zero-valued zero points), so the offset is a second, small product: x·(s·q) + (x summed
per block)·o. The block sums are one MatMul with a 0/1 indicator [in, G] (G = blocks per
column; made in the graph from a [G, 1, G] identity: `block_indicator`), shared by the
linears that read the same x (q/k/v; gate/up):

    x ──MatMul(x, DequantizeLinear(q, s))──────────────────────────────┐
     └─MatMul(x, indicator [in, G])──MatMul(·, o [G, out])─────────────(+)─► y

All of it is plain ONNX that TensorRT parses (its int4/int8 weight-only GEMM for the first
product, two small GEMMs and an Add for the offset); the CPU lowering keeps the offset
product after a zero-point-free MatMulNBits (llmbuild.lowering.quantized).

int4 with `scale_bits: 8` stores the scale table [G, out] (and the offset table) as int8
codes and a float32 step per column, decoded by a few nodes of constants only, which ONNX
Runtime and TensorRT fold (TensorRT-RTX builds it; the CPU lowering folds the tables
itself, llmbuild.lowering.quantized.fold_decoded_tables):

    codes [G, out] int8 ─DequantizeLinear(step [out], axis=1)─(+128·step)─Cast─► s ─► DequantizeLinear(q, s)

fp8 also quantizes the activation entering the MatMul (per-tensor scale from
calibration; inputs shared by several linears are quantized once):

    x ─QuantizeLinear(s_x, fp8 zero)─DequantizeLinear(s_x)─► x̂ ─MatMul(x̂, W)─► y
"""

from __future__ import annotations

import threading
from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from llmbuild.graph.annotations import LINEAR, annotate, annotation, nodes_with
from llmbuild.graph.builder import SOURCE_LOADER
from llmbuild.lowering.quantized import DECODE_MARK  # the mark the CPU lowering folds
from llmbuild.lowering.rewrite import constant
from llmbuild.quantize.plan import ModuleSpec, stored_bytes
from llmbuild.quantize.schemes import QuantizedTensor, fp8_activation_scale

_ONNX_CODES = {"int8": ir.DataType.INT8, "int4": ir.DataType.INT4, "fp8": ir.DataType.FLOAT8E4M3FN}


def linear_weights(model: ir.Model) -> dict[str, ir.Value]:
    """Weight name -> initializer for every linear the graph blocks annotated
    (`llmbuild.linear` on a MatMul whose B input is a 2-D weight with a source loader):
    the decoder's linears, and an untied lm_head (a tied lm_head's Gemm is not a MatMul
    until `untie_lm_head` makes it one)."""
    found = {}
    for node, _meta in nodes_with(list(model.graph), LINEAR):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = node.inputs[1]
        if w is not None and w.is_initializer() and SOURCE_LOADER in w.meta and len(w.shape) == 2:
            found[w.name] = w
    return found


def tied_lm_head(model: ir.Model) -> ir.Node | None:
    """The lm_head of a model whose output projection is its embedding (the Gemm the
    lm_head block annotated `"tied": true`), or None."""
    for node, meta in nodes_with(list(model.graph), LINEAR):
        if meta.get("role") == "lm_head" and meta.get("tied"):
            e = node.inputs[1]
            if node.op_type != "Gemm" or e is None or not e.is_initializer() or SOURCE_LOADER not in e.meta:
                raise ValueError(f"{node.name}: the tied lm_head is not a Gemm over the embedding initializer")
            return node
    return None


def untie_lm_head(model: ir.Model, weight_name: str) -> bool:
    """Give a tied lm_head its own weight `weight_name` (the architecture's untied lm_head
    name, `ArchitectureSpec.lm_head`) so that it can be quantized apart from the embedding
    (which the Gather keeps reading in the graph dtype):

        x ─Gemm(x, E [V, H], transB=1)─► y    ==>    x ─MatMul(x, W = E^T [H, V])─► y

    The new weight is E^T, read from the source only on save (or by the quantize
    stage). Returns False when the model has no tied lm_head."""
    gemm = tied_lm_head(model)
    if gemm is None:
        return False
    e = gemm.inputs[1]
    vocab, hidden = (int(d) for d in e.shape)
    source_load = e.meta[SOURCE_LOADER]
    np_dtype = e.dtype.numpy()

    def load() -> np.ndarray:
        return np.asarray(source_load()).T

    def materialize() -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(load().astype(np_dtype, copy=False)), name=weight_name)

    w = _lazy(weight_name, e.dtype, (hidden, vocab), materialize)
    w.meta[SOURCE_LOADER] = load
    model.graph.register_initializer(w)
    matmul = ir.node("MatMul", [gemm.inputs[0], w], name=weight_name)
    meta = annotation(gemm, LINEAR)
    annotate(matmul, LINEAR, {**meta, "weight": weight_name, "tied": False})
    out = matmul.outputs[0]
    out.type, out.shape = gemm.outputs[0].type, gemm.outputs[0].shape
    model.graph.insert_before(gemm, matmul)
    name = gemm.outputs[0].name
    gemm.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
    model.graph.remove(gemm, safe=True)
    out.name = name
    return True


class _SharedResult:
    """One weight's QuantizedTensor, computed on the first request for any of its parts
    and released once every part was read (recomputed if a part is read again)."""

    def __init__(self, compute: Callable[[], QuantizedTensor], parts: int):
        self._compute = compute
        self._parts = parts
        self._taken: set[str] = set()
        self._value: QuantizedTensor | None = None
        self._lock = threading.Lock()

    def part(self, key: str, extract: Callable[[QuantizedTensor], np.ndarray]) -> Callable[[], ir.TensorProtocol]:
        def load() -> ir.TensorProtocol:
            with self._lock:
                if self._value is None:
                    self._value = self._compute()
                    self._taken = set()
                array = extract(self._value)
                self._taken.add(key)
                if len(self._taken) >= self._parts:
                    self._value = None
            return ir.tensor(np.ascontiguousarray(array))

        return load


def quantize_graph(
    model: ir.Model,
    plan: dict[str, ModuleSpec],
    *,
    results: Callable[[str], QuantizedTensor | None] = lambda name: None,
    replaced_floats: Callable[[str], np.ndarray | None] | None = None,
    replaced_names: tuple[str, ...] = (),
    activation_amax: dict[str, float] | None = None,
) -> dict[str, int]:
    """Rewrite `model` in place following `plan`; returns weight name -> stored bytes.

    `results(name)` gives a calibrated QuantizedTensor (AWQ, GPTQ) or None (quantize the
    source weight to nearest here). `replaced_names` are float initializers (AWQ-scaled
    norm weights …) whose values `replaced_floats(name)` supplies. `activation_amax`
    (weight name -> max |input|) is required for fp8.
    """
    graph = model.graph
    weights = linear_weights(model)
    unknown = sorted(set(plan) - set(weights))
    if unknown:
        raise ValueError(f"plan names weights that are not linear weights of the graph: {unknown[:5]}")
    compute = weights[next(iter(weights))].dtype if weights else ir.DataType.FLOAT
    scale_np = compute.numpy()
    stored = {}
    act_cache: dict[int, ir.Value] = {}
    pad_cache: dict[tuple[int, int], ir.Value] = {}
    sums_cache: dict[tuple[int, int, int], ir.Value] = {}
    for name, value in weights.items():
        spec = plan.get(name, ModuleSpec("none"))
        k, n = (int(d) for d in value.shape)
        stored[name] = stored_bytes(spec, (k, n), compute.itemsize)
        if spec.scheme == "none":
            continue
        loader = value.meta[SOURCE_LOADER]
        scheme = spec.make()

        def make(name=name, loader=loader, scheme=scheme):
            qt = results(name)
            if qt is None:
                qt = scheme.quantize(np.asarray(loader(), np.float32), scale_np)
            return qt

        asym = not spec.symmetric  # int4 or int8 in blocks with a float offset per block
        coded = spec.scale_bits is not None  # int4: scales (+ offsets) as 8-bit codes · a step per column
        shared = _SharedResult(make, (1 + (2 if asym else 1) * (2 if coded else 1)))
        code_type = _ONNX_CODES[spec.scheme]
        block = spec.group_size  # int4, int8 in blocks; None: int8 per channel, fp8 per tensor
        kp = -(-k // block) * block if block else k
        q = _lazy(name, code_type, (kp, n), shared.part("q", lambda qt, kp=kp: _codes(qt, kp)))
        scale_shape = (kp // block, n) if block else (n,) if spec.scheme == "int8" else ()
        consumers = [u.node for u in value.uses()]
        matmuls = [c for c in consumers if c.op_type == "MatMul"]
        first = matmuls[0]
        graph.initializers.pop(name)
        graph.register_initializer(q)
        new_nodes = []
        if coded:
            s = _decoded_table(graph, new_nodes, name + ".scale", scale_shape, compute, shared.part(
                "sc", lambda qt: qt.scale_codes), shared.part("ss", lambda qt: qt.scale_step), bias=128.0)
        else:
            s = _lazy(name + ".scale", compute, scale_shape, shared.part("s", lambda qt: qt.scale.astype(scale_np)))
            graph.register_initializer(s)
        attrs = {"axis": 0, "block_size": block} if block else {"axis": 1} if spec.scheme == "int8" else {}
        dq = ir.node("DequantizeLinear", [q, s], attrs, name=name + ".dequantize")
        new_nodes.append(dq)
        w_out = dq.outputs[0]
        w_out.name = name + ".dequantized"
        value.replace_all_uses_with(w_out)
        x = first.inputs[0]
        if spec.scheme == "fp8":
            if activation_amax is None or name not in activation_amax:
                raise ValueError(f"fp8 needs a calibrated activation scale for {name}")
            key = id(x)
            if key not in act_cache:
                sa = ir.Value(name=name + ".input_scale", type=ir.TensorType(compute), shape=ir.Shape([]),
                              const_value=ir.tensor(fp8_activation_scale(activation_amax[name], scale_np).astype(scale_np)))
                za = ir.Value(name=name + ".input_zero", type=ir.TensorType(ir.DataType.FLOAT8E4M3FN),
                              shape=ir.Shape([]),
                              const_value=ir.tensor(np.zeros((), ml_dtypes.float8_e4m3fn)))
                graph.register_initializer(sa)
                graph.register_initializer(za)
                qa = ir.node("QuantizeLinear", [x, sa, za], name=name + ".input_quantize")
                da = ir.node("DequantizeLinear", [qa.outputs[0], sa], name=name + ".input_dequantize")
                new_nodes += [qa, da]
                act_cache[key] = da.outputs[0]
            for mm in matmuls:
                mm.replace_input_with(0, act_cache[key])
        if kp != k:
            key = (id(x), kp)
            if key not in pad_cache:
                pads = ir.Value(name=name + ".input_pads", type=ir.TensorType(ir.DataType.INT64),
                                shape=ir.Shape([2]), const_value=ir.tensor(np.array([0, kp - k], np.int64)))
                axes = ir.Value(name=name + ".input_pad_axes", type=ir.TensorType(ir.DataType.INT64),
                                shape=ir.Shape([1]), const_value=ir.tensor(np.array([-1], np.int64)))
                graph.register_initializer(pads)
                graph.register_initializer(axes)
                pad = ir.node("Pad", [x, pads, None, axes], name=name + ".input_pad")
                new_nodes.append(pad)
                pad_cache[key] = pad.outputs[0]
            for mm in matmuls:
                mm.replace_input_with(0, pad_cache[key])
        graph.insert_before(first, new_nodes)
        if asym:
            _add_offset_term(graph, first, name, kp, n, block, compute, shared, sums_cache, coded)
    for name in replaced_names:
        old = graph.initializers[name]
        getter = replaced_floats

        def load(name=name, getter=getter, dtype=old.dtype.numpy()):
            return ir.tensor(np.ascontiguousarray(np.asarray(getter(name)).astype(dtype)))

        old.const_value = ir.LazyTensor(load, dtype=old.dtype, shape=old.shape, name=name)
    return stored


def _decoded_table(graph, new_nodes, name, shape, compute, codes, step, bias: float) -> ir.Value:
    """`scale_bits: 8`: a per-block table [G, n] stored as int8 codes [G, n] and a float32
    step per column [n], decoded in the graph from constants only (ONNX Runtime and TensorRT
    fold it at load / build time; the CPU lowering folds it itself: fold_decoded_tables):

        codes [G, n] int8 ─DequantizeLinear(step [n], axis=1)─(+ bias·step)─(Cast(graph dtype))─► table

    Scales take bias 128 (codes 1..255 stored as code − 128), offsets 0. Every value is
    exact in float32 (schemes.STEP_BITS); the Cast rounds once, as schemes.coded_params."""
    c = _lazy(name + "_codes", ir.DataType.INT8, shape, codes)
    st = _lazy(name + "_step", ir.DataType.FLOAT, shape[-1:], step)
    for v in (c, st):
        graph.register_initializer(v)
    nodes = [ir.node("DequantizeLinear", [c, st], {"axis": 1}, name=name + "_decode")]
    if bias:
        k = constant(name + "_bias", np.array(bias, np.float32))
        graph.register_initializer(k)
        offset = ir.node("Mul", [st, k], name=name + "_decode_bias")
        nodes += [offset, ir.node("Add", [nodes[0].outputs[0], offset.outputs[0]], name=name + "_decode_add")]
    if compute != ir.DataType.FLOAT:
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": compute}, name=name + "_decode_round"))
    for node in nodes:
        node.metadata_props[DECODE_MARK] = "1"
    new_nodes += nodes
    out = nodes[-1].outputs[0]
    out.name = name
    out.dtype, out.shape = compute, ir.Shape(list(shape))
    return out


def block_indicator(graph, new_nodes, name, k, block, compute) -> ir.Value:
    """The 0/1 indicator [k, G] of blocks of `block` rows (x·M = x summed per block), made
    from the identity [G, 1, G] (G² values stored, not k·G):

        eye [G, 1, G] ─Expand([G, block, G])─Reshape([k, G])─► M

    Constants only: ONNX Runtime and TensorRT fold it; so does the CPU lowering
    (`fold_decoded_tables`, the nodes carry its DECODE_MARK)."""
    g = k // block
    eye = constant(name + ".block_eye", np.eye(g, dtype=compute.numpy())[:, None, :])
    expand_to = constant(name + ".block_expand", np.array([g, block, g], np.int64))
    flat = constant(name + ".block_shape", np.array([k, g], np.int64))
    for v in (eye, expand_to, flat):
        graph.register_initializer(v)
    expand = ir.node("Expand", [eye, expand_to], name=name + ".block_indicator_expand")
    reshape = ir.node("Reshape", [expand.outputs[0], flat], name=name + ".block_indicator_reshape")
    for node in (expand, reshape):
        node.metadata_props[DECODE_MARK] = "1"
    new_nodes += [expand, reshape]
    out = reshape.outputs[0]
    out.name, out.dtype, out.shape = name + ".block_indicator", compute, ir.Shape([k, g])
    return out


def _add_offset_term(graph, matmul, name, k, n, block, compute, shared, sums_cache, coded=False):
    """
    x ─MatMul(x, indicator [k, G])─► xs [.., G] ─MatMul(xs, offset [G, n])─► c ─┐
    MatMul(x, W) ─► y ───────────────────────────────────────────────────────(+)─► y'
    (xs is made once per input x and block layout: `sums_cache`; `coded`: the offsets are
    8-bit codes decoded by `_decoded_table`)
    """
    g = k // block
    x = matmul.inputs[0]
    key = (id(x), k, block)
    new_nodes = []
    if key not in sums_cache:
        ind = block_indicator(graph, new_nodes, name, k, block, compute)
        sums = ir.node("MatMul", [x, ind], name=name + ".block_sums")
        new_nodes.append(sums)
        sums_cache[key] = sums.outputs[0]
    if coded:
        off = _decoded_table(graph, new_nodes, name + ".offset", (g, n), compute, shared.part(
            "oc", lambda qt: qt.offset_codes), shared.part("os", lambda qt: qt.offset_step), bias=0.0)
    else:
        off = _lazy(name + ".offset", compute, (g, n), shared.part("o", lambda qt: qt.offset.astype(compute.numpy())))
        graph.register_initializer(off)
    y = matmul.outputs[0]
    corr = ir.node("MatMul", [sums_cache[key], off], name=name + ".offset_product")
    add = ir.node("Add", [y, corr.outputs[0]], name=name + ".offset_add")
    new_nodes += [corr, add]
    out = add.outputs[0]
    was_output, y_name = y.is_graph_output(), y.name
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    add.replace_input_with(0, y)
    if was_output:  # an untied lm_head in a float32 graph: `logits` keeps its name
        y.name, out.name = f"{y_name}.before_offset", y_name
        out.type, out.shape = y.type, y.shape
    graph.insert_after(matmul, new_nodes)


def _codes(qt: QuantizedTensor, rows: int) -> np.ndarray:
    """Codes as stored: blocked codes padded with zero rows to `rows` (whole blocks)."""
    data = qt.data
    if rows > data.shape[0]:
        data = np.concatenate([data, np.zeros((rows - data.shape[0], data.shape[1]), data.dtype)])
    return data.astype(ml_dtypes.int4) if qt.scheme == "int4" else data


def _lazy(name: str, dtype: ir.DataType, shape, load) -> ir.Value:
    tensor = ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(list(shape)), name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)), const_value=tensor)
