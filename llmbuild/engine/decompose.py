"""Attention layers TensorRT cannot take as one `Attention` node, rewritten into
primitive ONNX ops in the copy of the graph the engine stage parses (the artifact's
graph is unchanged). Each rewritten layer is recorded, with the reason, in the engine's
manifest entry (`decomposed_attention`).

TensorRT-RTX 1.7's ONNX parser refuses `softcap` ("Setting softcap is not supported in
TensorRT Attention"), so a soft-capped layer (Gemma 2) becomes:

    q [B,Hq,S,D] ─Reshape [B,Hkv,G,S,D]─┐
    K [B,Hkv,L,D] ─Unsqueeze(2)─Transpose─┴─MatMul─► ·scale ─► c·tanh(·/c) ─► Where(mask, ·, -inf)
        ─► Softmax(-1) ─MatMul(V [B,Hkv,1,L,D])─► [B,Hkv,G,S,D] ─Reshape─► [B,Hq,S,D]

    mask: the node's own boolean mask [B,1,S,L] (a windowed layer's is causal), else the
    causal mask of the pass: row j ≤ write_indices + s (which also excludes rows ≥ kv_len).

Softmax and the soft-cap run in float32 (Casts around them), as HF computes them.
"""

from __future__ import annotations

import json

import numpy as np

from llmbuild.graph.annotations import ATTENTION

REASON_SOFTCAP = "softcap: TensorRT's Attention layer has no soft-capping"


def decompose_for_tensorrt(model) -> list[dict]:
    """Rewrite, in place, the Attention nodes of `model` (onnx.ModelProto) that TensorRT
    cannot parse; returns [{"layer", "reason"}] for the manifest."""
    from onnx import helper

    graph = model.graph
    records = []
    new_nodes = []
    causal_mask: dict[str, str] = {}  # (write_indices, kv_len) -> causal mask value name
    counter = [0]

    def name(base: str) -> str:
        counter[0] += 1
        return f"trt.{base}.{counter[0]}"

    def const(array: np.ndarray) -> str:
        from onnx import numpy_helper

        n = name("const")
        graph.initializer.append(numpy_helper.from_array(np.asarray(array), n))
        return n

    def node(op: str, inputs: list[str], **attrs) -> str:
        out = name(op.lower())
        new_nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    producers = {o: n for n in graph.node for o in n.output}
    for n in list(graph.node):
        if n.op_type != "Attention" or n.domain not in ("", "ai.onnx"):
            new_nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        cap = float(attrs.get("softcap", 0.0))
        if not cap:
            new_nodes.append(n)
            continue
        meta = next((json.loads(p.value) for p in n.metadata_props if p.key == ATTENTION), None)
        if meta is None:
            raise ValueError(f"{n.name}: soft-capped Attention without an {ATTENTION} annotation")
        heads, kv_heads, head_dim = int(meta["heads"]), int(meta["kv_heads"]), int(meta["head_dim"])
        group = heads // kv_heads
        q, k, v = n.input[:3]
        mask = n.input[3] if len(n.input) > 3 else ""
        kv_len = n.input[6] if len(n.input) > 6 else ""
        if not mask:
            # causal mask of the pass from kv_len and the cache length (as blocks.window_mask)
            scatter = producers[k]  # TensorScatter(past_key, k, write_indices)
            write_indices = scatter.input[2]
            key = f"{write_indices}|{kv_len}"
            if key not in causal_mask:
                zero, one = const(np.array(0, np.int64)), const(np.array(1, np.int64))
                cache_len = node("Squeeze", [node("Shape", [k], start=2, end=3), const(np.array([0], np.int64))])
                rows = node("Range", [zero, cache_len, one])
                s_len = node("ReduceMax", [node("Sub", [kv_len, write_indices])], keepdims=0)
                steps = node("Range", [zero, s_len, one])
                q_rows = node("Add", [node("Unsqueeze", [write_indices, const(np.array([1], np.int64))]), steps])
                q_rows = node("Unsqueeze", [q_rows, const(np.array([1, 3], np.int64))])
                causal_mask[key] = node("LessOrEqual", [rows, q_rows])  # [B, 1, S, L]
            mask = causal_mask[key]
        f32 = 1  # onnx.TensorProto.FLOAT
        q5 = node("Reshape", [q, const(np.array([0, kv_heads, group, -1, head_dim], np.int64))])  # [B,Hkv,G,S,D]
        k5 = node("Unsqueeze", [k, const(np.array([2], np.int64))])  # [B,Hkv,1,L,D]
        v5 = node("Unsqueeze", [v, const(np.array([2], np.int64))])
        kt = node("Transpose", [k5], perm=[0, 1, 2, 4, 3])  # [B,Hkv,1,D,L]
        scores = node("Cast", [node("MatMul", [q5, kt])], to=f32)  # [B,Hkv,G,S,L]
        scores = node("Mul", [scores, const(np.array(float(meta["scale"]), np.float32))])
        c = const(np.array(cap, np.float32))
        scores = node("Mul", [node("Tanh", [node("Div", [scores, c])]), c])
        mask5 = node("Unsqueeze", [mask, const(np.array([2], np.int64))])  # [B,1,1,S,L]
        scores = node("Where", [mask5, scores, const(np.array(-np.inf, np.float32))])
        probs = node("Softmax", [scores], axis=-1)
        dtype = _value_dtype(graph, v)
        if dtype != f32:
            probs = node("Cast", [probs], to=dtype)
        out5 = node("MatMul", [probs, v5])  # [B,Hkv,G,S,D]
        new_nodes.append(helper.make_node("Reshape", [out5, const(np.array([0, heads, -1, head_dim], np.int64))],
                                          [n.output[0]], name=f"trt.attention.{meta['layer']}"))
        records.append({"layer": meta["layer"], "reason": REASON_SOFTCAP})
    if records:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return records


def _value_dtype(graph, name: str) -> int:
    """Element type of a graph value: the KV cache inputs/outputs carry it."""
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    # present_value.<i> are graph outputs; anything else: the cache dtype of the first past input
    for vi in graph.input:
        if vi.name.startswith("past_value"):
            return vi.type.tensor_type.elem_type
    return 1
