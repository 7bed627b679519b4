"""Per-expert quantization of the routed experts (llmbuild/graph/moe.py): each stacked
expert tensor [E, in, out] becomes codes [E, in_p, out] and scales [E, G, out] (each
expert its own scales, computed by the dense scheme on that expert's [in, out] matrix),
dequantized in the graph *before* the Gather by the routed indices:

    codes [E,in_p,out] int4|int8 ─┐
    scales [E,G,out] ─────────────┴─DequantizeLinear(axis=1, block_size)─► W [E,in_p,out]
    W ─Gather(idx [B,S,k])─► [B,S,k,in_p,out] ─┐
    a [B,S,k|1,1,in] ─(Pad to in_p)────────────┴─MatMul─► y [B,S,k,1,out]

Why not Gather(codes) ─► DequantizeLinear: ONNX opset 24's Gather does not take int4
(ONNX Runtime refuses the graph: "Type 'tensor(int4)' of input parameter ... of operator
(Gather) is invalid"), and TensorRT refuses a quantized constant that is not consumed
directly by a DequantizeLinear ("Quantized constant (codes) is only allowed before DQ"
for int8; "has datatype Int4 but is not consumed by ... IDequantizeLayer" for int4).
DequantizeLinear → Gather is what both accept; TensorRT-RTX keeps the weights quantized
in the engine (measured: 8 experts of [512, 512], int4 g32: a 1.37 MB engine against
4.5 MB for the fp16 weights; docs/architecture.md "Mixture of experts"). On the CPU the
lowering replaces the block with `com.microsoft.QMoE` where it can
(llmbuild/lowering/moe_quantized.py).

int8 per channel is one block spanning the expert's input rows (scales [E, 1, out],
block_size = in): per-axis DequantizeLinear takes only a 1-D scale, not one per expert.
Blocks that do not divide the input (int4 g128 over 64 rows) are padded with zero rows,
and the MatMul's activation with as many zero columns, as for dense linears.

Asymmetric int4 and int8 (w = s·q + o per block) add the offset term after the MatMul, with the
offsets gathered like the weights:

    a ─MatMul(indicator [in_p, G])─► sums [..,1,G] ─MatMul(Gather(offsets [E,G,out], idx))─► c ─┐
    MatMul(a, Gather(W)) ─► y ──────────────────────────────────────────────────────────────(+)─► y'

The router stays in the graph dtype (its logits pick which weights are read); fp8
leaves the experts unquantized (no per-expert fp8 activation scales).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from llmbuild.graph.annotations import MOE, nodes_with
from llmbuild.graph.builder import SOURCE_LOADER
from llmbuild.lowering.rewrite import constant
from llmbuild.quantize.graph import _lazy, _SharedResult, block_indicator
from llmbuild.quantize.expert_plan import PROJECTIONS, expert_stored_bytes
from llmbuild.quantize.plan import ModuleSpec
from llmbuild.quantize.schemes import QuantizedTensor

_CODES = {"int8": ir.DataType.INT8, "int4": ir.DataType.INT4}


@dataclass(frozen=True)
class StackedQuantized:
    """Codes + per-expert scales (+ offsets) of one stacked expert weight, as stored."""

    scheme: str  # "int4" | "int8"
    codes: np.ndarray  # int8 values [E, in_p, out] (in_p: rows padded to whole blocks)
    scale: np.ndarray  # float32 [E, G, out]
    offset: np.ndarray | None  # asymmetric int4/int8: [E, G, out]
    block: int  # rows per block (int8 per channel: in)
    rows: int  # the weight's input rows (in)
    per_channel: bool = False  # int8 per channel: one block of all rows, whatever they are

    def dequantize(self) -> np.ndarray:
        """[E, in, out] float32: what the graph computes with."""
        w = self.codes.astype(np.float32) * np.repeat(self.scale, self.block, axis=1)
        if self.offset is not None:
            w = w + np.repeat(self.offset, self.block, axis=1)
        return w[:, :self.rows]


def stack(parts: list[QuantizedTensor], rows: int) -> StackedQuantized:
    """Each expert's QuantizedTensor (the dense scheme's, [in, out]) → one StackedQuantized."""
    first = parts[0]
    block = first.block_size or rows  # int8 per channel: one block of all rows
    g = -(-rows // block)
    kp = g * block
    codes = np.zeros((len(parts), kp, first.data.shape[1]), np.int8)
    for e, qt in enumerate(parts):
        codes[e, :rows] = qt.data
    scale = np.stack([qt.scale.reshape(g, -1) for qt in parts]).astype(np.float32)
    offset = None if first.offset is None else np.stack([qt.offset for qt in parts]).astype(np.float32)
    return StackedQuantized(first.scheme, codes, scale, offset, block, rows, per_channel=first.block_size is None)


def quantize_stacked(spec: ModuleSpec, w: np.ndarray, scale_dtype=np.float16,
                     per_expert: dict[int, QuantizedTensor] | None = None) -> StackedQuantized:
    """Round-to-nearest of every expert of `w` [E, in, out] with `spec`'s scheme, except
    the experts in `per_expert` (calibrated: AWQ, GPTQ)."""
    scheme = spec.make()
    per_expert = per_expert or {}
    parts = [per_expert[e] if e in per_expert else scheme.quantize(np.asarray(w[e], np.float32), scale_dtype)
             for e in range(w.shape[0])]
    return stack(parts, w.shape[1])


def shard_stacked(sq: StackedQuantized, plan, expert_name: str, rank: int) -> StackedQuantized:
    """Rank `rank`'s part of the whole stacked weight's codes and scales, by the shard hint of
    its experts' HF weight `expert_name` (llmbuild.quantize.shard, per expert): gate/up split
    their output columns, down its input rows in whole groups (int8 per channel: any rows,
    its one block becoming the rank's rows)."""
    from llmbuild.errors import UserError

    hint = plan.hint(expert_name)
    if hint is None:
        return sq
    a, b = plan.rank_range(hint, rank)
    if hint.dim == 0:  # HF out features: the stacked tensor's columns
        return replace(sq, codes=sq.codes[:, :, a:b], scale=sq.scale[..., a:b],
                       offset=None if sq.offset is None else sq.offset[..., a:b])
    if sq.per_channel:  # the scales do not depend on the rows
        return replace(sq, codes=sq.codes[:, a:b], block=b - a, rows=b - a)
    if a % sq.block or (b % sq.block and b != sq.rows):
        raise UserError(f"{expert_name}: tensor-parallel rank {rank} holds expert input rows {a}..{b} of {sq.rows}, "
                        f"which do not start and end on whole {sq.scheme} groups of {sq.block}; choose a group_size "
                        f"that divides {b - a}")
    g0, g1 = a // sq.block, -(-b // sq.block)
    return replace(sq, codes=sq.codes[:, a:a + (g1 - g0) * sq.block], scale=sq.scale[:, g0:g1],
                   offset=None if sq.offset is None else sq.offset[:, g0:g1], rows=b - a)


def expert_blocks(model: ir.Model) -> list[dict]:
    """The `llmbuild.moe` annotations of `model`'s routed blocks, in layer order."""
    return [meta for _node, meta in nodes_with(list(model.graph), MOE)]


def stacked_expert_weights(model: ir.Model) -> dict[str, ir.Value]:
    """Stacked expert weight name -> its float initializer (3-D, read through a Gather)."""
    found = {}
    for meta in expert_blocks(model):
        for proj in PROJECTIONS:
            v = model.graph.initializers.get(meta["stacked"][proj])
            if v is not None and SOURCE_LOADER in v.meta and len(v.shape) == 3:
                found[v.name] = v
    return found


def quantize_experts_graph(model: ir.Model, plan: dict[str, ModuleSpec], *,
                           results: Callable[[str], StackedQuantized | None] = lambda name: None) -> dict[str, int]:
    """Rewrite the stacked expert weights of `model` in place following `plan`; returns
    weight name -> stored bytes. `results(name)` gives a calibrated StackedQuantized or
    None (round-to-nearest of the source weights here, on save)."""
    graph = model.graph
    weights = stacked_expert_weights(model)
    stored = {}
    pad_cache: dict[tuple[int, int], ir.Value] = {}
    sums_cache: dict[tuple[int, int, int], ir.Value] = {}
    for name, value in weights.items():
        spec = plan.get(name, ModuleSpec("none"))
        e, k, n = (int(d) for d in value.shape)
        compute = value.dtype
        scale_np = compute.numpy()
        stored[name] = expert_stored_bytes(spec, (e, k, n), compute.itemsize)
        if spec.scheme not in _CODES:
            continue
        loader = value.meta[SOURCE_LOADER]

        def make(name=name, loader=loader, spec=spec, scale_np=scale_np):
            sq = results(name)
            return sq if sq is not None else quantize_stacked(spec, np.asarray(loader(), np.float32), scale_np)

        asym = not spec.symmetric  # int4 or int8 in blocks with a float offset per block
        shared = _SharedResult(make, 3 if asym else 2)
        block = spec.group_size or k
        g = -(-k // block)
        kp = g * block
        codes_np = ml_dtypes.int4 if spec.scheme == "int4" else np.int8
        q = _lazy(name, _CODES[spec.scheme], (e, kp, n), shared.part("q", lambda sq, t=codes_np: sq.codes.astype(t)))
        s = _lazy(name + ".scale", compute, (e, g, n), shared.part("s", lambda sq, t=scale_np: sq.scale.astype(t)))
        gathers = [u.node for u in value.uses()]
        if not gathers or any(gn.op_type != "Gather" for gn in gathers):
            raise ValueError(f"stacked expert weight {name} is read by {[gn.op_type for gn in gathers]}, not a Gather")
        graph.initializers.pop(name)
        graph.register_initializer(q)
        graph.register_initializer(s)
        dq = ir.node("DequantizeLinear", [q, s], {"axis": 1, "block_size": block}, name=name + ".dequantize")
        dq.outputs[0].name = name + ".dequantized"
        value.replace_all_uses_with(dq.outputs[0])
        graph.insert_before(gathers[0], dq)
        for gather in gathers:
            for use in list(gather.outputs[0].uses()):
                mm = use.node
                if mm.op_type != "MatMul" or use.idx != 1:
                    raise ValueError(f"{name}: the gathered experts feed {mm.op_type}, not a MatMul")
                a = _padded_input(graph, mm, kp - k, name, pad_cache)
                if asym:
                    off = _lazy(name + ".offset", compute, (e, g, n),
                                shared.part("o", lambda sq, t=scale_np: sq.offset.astype(t)))
                    graph.register_initializer(off)
                    _add_expert_offsets(graph, mm, a, off, gather.inputs[1], kp, block, compute, name, sums_cache)
    return stored


def _padded_input(graph: ir.Graph, mm: ir.Node, pad: int, name: str, cache: dict) -> ir.Value:
    """The MatMul's activation, widened by `pad` zero columns (codes padded to whole blocks)."""
    a = mm.inputs[0]
    if not pad:
        return a
    key = (id(a), pad)
    if key not in cache:
        pads = constant(name + ".input_pads", np.array([0, pad], np.int64))
        axes = constant(name + ".input_pad_axes", np.array([-1], np.int64))
        for c in (pads, axes):
            graph.register_initializer(c)
        node = ir.node("Pad", [a, pads, None, axes], name=name + ".input_pad")
        graph.insert_before(mm, node)
        cache[key] = node.outputs[0]
    mm.replace_input_with(0, cache[key])
    return cache[key]


def _add_expert_offsets(graph, mm, a, offsets, idx, kp, block, compute, name, sums_cache) -> None:
    """
    a ─MatMul(indicator [kp, G])─► sums [..,1,G] ─MatMul(Gather(offsets, idx) [B,S,k,G,out])─► c ─┐
    mm: MatMul(a, W) ─► y ──────────────────────────────────────────────────────────────────(+)─► y'
    """
    g = kp // block
    key = (id(a), kp, block)
    nodes = []
    if key not in sums_cache:
        ind = block_indicator(graph, nodes, name, kp, block, compute)
        sums = ir.node("MatMul", [a, ind], name=name + ".block_sums")
        nodes.append(sums)
        sums_cache[key] = sums.outputs[0]
    gathered = ir.node("Gather", [offsets, idx], {"axis": 0}, name=name + ".offset_gather")
    corr = ir.node("MatMul", [sums_cache[key], gathered.outputs[0]], name=name + ".offset_product")
    nodes += [gathered, corr]
    graph.insert_before(mm, nodes)
    y = mm.outputs[0]
    add = ir.node("Add", [y, corr.outputs[0]], name=name + ".offset_add")
    y.replace_all_uses_with(add.outputs[0])
    add.replace_input_with(0, y)
    graph.insert_after(mm, add)
