"""What a node means, written by the graph blocks into ONNX node metadata and read by
the passes (CPU lowering, quantization, tensor-parallel marking, lm_head untying), so
that no pass has to recognise a model by its node sequence or tensor names.

Keys (`NodeProto.metadata_props`, values JSON):

    llmbuild.linear     on a linear's MatMul (or Gemm):
                        {"weight": HF weight name, "role": "q"|"k"|...|"lm_head", "layer": i|null,
                         "parallel": "column"|"row"|null, "tied": bool (lm_head on the embedding)}
    llmbuild.attention  on an attention core's `Attention` node:
                        {"layer", "heads", "kv_heads", "head_dim", "scale", "window", "softcap",
                         "q", "k", "v":  names of the [B, S, heads, head_dim] values rotary reads
                                         (after per-head q/k norms, when the model has them),
                         "rotary": {"cos", "sin", "position_ids", "dim"} | null}
                        "window": sliding window (HF's: a token sees itself and window - 1 before
                        it; the node's attn_mask is `window_mask.<window>`) | null;
                        "softcap": attention logit soft-cap (0 = none)
    llmbuild.norm       on a normalization: {"weight": HF name, "layer": i|null, "offset": 0|1}
                        (scale = offset + weight; Gemma's norms have offset 1)
    llmbuild.scale_group  on the node whose output feeds a scale group's linears
                        (a norm, or the Mul of a gated MLP):
                        {"name", "kind": "norm"|"linear", "source": HF weight name that absorbs 1/s,
                         "linears": [HF weight names], "layer": i}
    llmbuild.moe        on a routed-expert block's final ReduceSum (llmbuild/graph/moe.py):
                        {"layer", "parallel": "row" (the output is a partial sum when the experts'
                         width is split over ranks), "experts": E, "top_k", "normalize": renormalised top-k, "hidden",
                         "intermediate": an expert's width, "input": the value the router reads,
                         "router": HF name [E, H] (never a llmbuild.linear: it stays unquantized),
                         "logits": the router's float32 logits [B, S, E] (before the Softmax),
                         "weights", "indices": names of the routing values [B, S, k],
                         "stacked": {"gate"|"up"|"down": initializer [E, in, out]},
                         "expert_weights": {"gate"|"up"|"down": [HF name of expert e's weight]}}

Annotations survive `ir.save` / `onnx.load` (node metadata is part of the ONNX file).
"""

from __future__ import annotations

import json
from typing import Any

LINEAR = "llmbuild.linear"
ATTENTION = "llmbuild.attention"
NORM = "llmbuild.norm"
SCALE_GROUP = "llmbuild.scale_group"
MOE = "llmbuild.moe"


def annotate(node, key: str, value: dict[str, Any]) -> None:
    """Set annotation `key` on an onnx_ir node."""
    node.metadata_props[key] = json.dumps(value, sort_keys=True)


def annotation(node, key: str) -> dict[str, Any] | None:
    """Annotation `key` of an onnx_ir node or an onnx NodeProto, or None."""
    props = node.metadata_props
    if isinstance(props, dict):
        raw = props.get(key)
    else:  # NodeProto: repeated StringStringEntryProto
        raw = next((p.value for p in props if p.key == key), None)
    return None if raw is None else json.loads(raw)


def nodes_with(graph, key: str) -> list[tuple[Any, dict[str, Any]]]:
    """(node, annotation) for every node of `graph` (onnx_ir graph or GraphProto) carrying `key`."""
    nodes = graph.node if hasattr(graph, "node") else graph
    found = []
    for node in nodes:
        a = annotation(node, key)
        if a is not None:
            found.append((node, a))
    return found
