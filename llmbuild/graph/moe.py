"""The routed-expert block: a router picks top-k of E experts per token and only the
picked experts' weights are read (opset 24 has no MoE operator; this is built from
Gather + batched MatMul, which TensorRT parses and ONNX Runtime runs).

Why gather the weights: a token's k experts are read as k [H, I] slices of the stacked
expert tensors ([E, H, I], Gather on axis 0), so a decode step over T tokens reads
T·k experts' bytes at most and never an unselected one (NaN in an unselected expert
cannot reach the output: tests/test_moe.py). The cost is in docs/architecture.md
("Mixture of experts").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from llmbuild.graph import annotations as ann
from llmbuild.graph import blocks
from llmbuild.graph.builder import GraphBuilder


@dataclass(frozen=True)
class ExpertWeights:
    """One sparse layer's expert tensors: HF names per expert, and the graph's stacked names."""

    router: str  # [E, H]
    gate: list[str]  # per expert [I, H]
    up: list[str]  # per expert [I, H]
    down: list[str]  # per expert [H, I]
    stacked: dict[str, str]  # "gate" | "up" | "down" -> initializer name of the stacked tensor


def stacked_weight(gb: GraphBuilder, source, name: str, experts: list[str], shape: tuple[int, int]) -> ir.Value:
    """Initializer `name` [E, in, out]: the per-expert HF weights [out, in], transposed and
    stacked in expert order (read lazily, one expert at a time, when the graph is saved)."""
    def load():
        first = source.load(experts[0])
        out = np.empty((len(experts), *shape), first.dtype)
        for e, expert in enumerate(experts):
            out[e] = first.T if e == 0 else source.load(expert).T
        return out

    return gb.weight(name, (len(experts), *shape), load)


def route(gb: GraphBuilder, source, x: ir.Value, router: str, *, hidden: int, experts: int, top_k: int,
          normalize: bool, layer: int) -> tuple[ir.Value, ir.Value]:
    """
    x [B,S,H] ─MatMul(router [H, E])─► logits [B,S,E] ─Cast(float32)─► Softmax ─► p
    p ─TopK(k)─► (w [B,S,k], idx [B,S,k])      (normalize: w ─Div(ReduceSum(w))─► w)
    w ─CastLike(x)─► weights

    HF's order (MixtralTopKRouter, Qwen*MoeTopKRouter): softmax over all E in float32,
    top-k, then renormalise (Mixtral always; Qwen when norm_topk_prob).
    """
    w_router = blocks.weight(gb, source, router, (hidden, experts), transpose=True)
    logits = gb.op("MatMul", [x, w_router])
    if gb.dtype != ir.DataType.FLOAT:
        logits = gb.op("Cast", [logits], {"to": ir.DataType.FLOAT})
    logits.name = f"moe.{layer}.router_logits"  # float32 [B, S, E]
    probs = gb.op("Softmax", [logits], {"axis": -1})
    k = gb.const(np.array([top_k], np.int64))
    top, idx = gb.tape.op_multi_out("TopK", [probs, k], {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
    if normalize:
        top = gb.op("Div", [top, gb.op("ReduceSum", [top, gb.const(np.array([-1], np.int64))], {"keepdims": 1})])
    top = gb.op("CastLike", [top, x])  # to the graph dtype (CastLike: the CPU lowering's float32
    # promotion keeps it float32, where a Cast to float16 would be refused)
    return top, idx


def routed_experts(gb: GraphBuilder, source, x: ir.Value, w: ExpertWeights, *, hidden: int, intermediate: int,
                   top_k: int, normalize: bool, layer: int) -> ir.Value:
    """
    x [B,S,H] ─route─► weights [B,S,k], idx [B,S,k]
    x ─Unsqueeze─► [B,S,1,1,H]
        MatMul(Gather(gate [E,H,I], idx) [B,S,k,H,I]) ─► g [B,S,k,1,I] ─┐
        MatMul(Gather(up   [E,H,I], idx) [B,S,k,H,I]) ─► u ─────────────┴─► silu(g)·u [B,S,k,1,I]
        ─MatMul(Gather(down [E,I,H], idx) [B,S,k,I,H])─► [B,S,k,1,H] ─Squeeze─► [B,S,k,H]
        ─Mul(weights [B,S,k,1])─ReduceSum(axis 2)─► y [B,S,H]

    Only the k experts each token picked are gathered (bytes read per token: k experts);
    the ReduceSum node carries the `llmbuild.moe` annotation (names of the router, the
    stacked and per-expert weights, the routing values) for the passes.
    """
    if x.name is None:  # the annotation names what the router reads
        x.name = f"moe.{layer}.input"
    weights, idx = route(gb, source, x, w.router, hidden=hidden, experts=len(w.gate), top_k=top_k,
                         normalize=normalize, layer=layer)
    gate = stacked_weight(gb, source, w.stacked["gate"], w.gate, (hidden, intermediate))
    up = stacked_weight(gb, source, w.stacked["up"], w.up, (hidden, intermediate))
    down = stacked_weight(gb, source, w.stacked["down"], w.down, (intermediate, hidden))
    x5 = gb.op("Unsqueeze", [x, gb.const(np.array([2, 3], np.int64))])  # [B, S, 1, 1, H]
    g = gb.op("MatMul", [x5, gb.op("Gather", [gate, idx], {"axis": 0})])  # [B, S, k, 1, I]
    u = gb.op("MatMul", [x5, gb.op("Gather", [up, idx], {"axis": 0})])  # [B, S, k, 1, I]
    act = blocks.silu_gate(gb, g, u)
    y = gb.op("MatMul", [act, gb.op("Gather", [down, idx], {"axis": 0})])  # [B, S, k, 1, H]
    y = gb.op("Squeeze", [y, gb.const(np.array([3], np.int64))])  # [B, S, k, H]
    y = gb.op("Mul", [y, gb.op("Unsqueeze", [weights, gb.const(np.array([-1], np.int64))])])
    y = gb.op("ReduceSum", [y, gb.const(np.array([2], np.int64))], {"keepdims": 0})  # [B, S, H]
    weights.name, idx.name = f"moe.{layer}.weights", f"moe.{layer}.experts"
    ann.annotate(y.producer(), ann.MOE, {
        "layer": layer, "parallel": "row", "experts": len(w.gate), "top_k": top_k, "normalize": normalize, "hidden": hidden,
        "intermediate": intermediate, "input": x.name, "router": w.router,
        "logits": f"moe.{layer}.router_logits", "weights": weights.name,
        "indices": idx.name, "stacked": dict(w.stacked),
        "expert_weights": {"gate": w.gate, "up": w.up, "down": w.down},
    })
    return y


def shared_expert_gate(gb: GraphBuilder, source, x: ir.Value, shared: ir.Value, name: str, *,
                       hidden: int) -> ir.Value:
    """
    x [B,S,H] ─MatMul(g [H, 1])─Sigmoid─► s [B,S,1] ─┐
    shared [B,S,H] ──────────────────────────────────┴─Mul─► s·shared     (Qwen2-MoE)
    """
    g = blocks.weight(gb, source, name, (hidden, 1), transpose=True)
    return gb.op("Mul", [gb.op("Sigmoid", [gb.op("MatMul", [x, g])]), shared])
