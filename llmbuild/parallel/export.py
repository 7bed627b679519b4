"""Per-rank ONNX graphs with their all-reduce points marked.

Rank r's graph is the architecture's own graph code run on `RankSource` (fewer heads,
a narrower MLP, sliced weights). Then every linear the graph blocks annotated as row
parallel (`llmbuild.linear` with "parallel": "row", from the spec's hints), and every
routed-expert block (`llmbuild.moe`, each expert split by its width), gets an
all-reduce marker after it:

    attn ──MatMul(o_proj[r])──► allreduce.<k>.partial ──Identity "allreduce.<k>"──► allreduce.<k> ──► Add(residual)

The marker is an ONNX `Identity` node named `allreduce.<k>` (metadata
`llmbuild.collective = all_reduce_sum`), k counting in graph order. Consumers of the
partial sum read the marker's output, so one place in each rank graph stands for
"the sum over all ranks of this tensor":

  * engine (`llmbuild.engine.collectives`): after parsing, the marker layer's input
    feeds an `ALL_REDUCE/SUM` DistCollective layer that replaces it;
  * CPU (`llmbuild.parallel.simulate`): the N rank graphs side by side in one ONNX
    graph, each marker replaced by one `Sum` over the ranks' partials.

A rank graph run alone on ONNX Runtime computes only its partial sums: use the
simulator (the runtime does so for tp > 1 artifacts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from llmbuild.graph.annotations import LINEAR, MOE, annotation

from llmbuild.parallel.sharder import RankSource, ShardPlan

MARKER_PREFIX = "allreduce."
COLLECTIVE_KEY = "llmbuild.collective"
ALL_REDUCE_SUM = "all_reduce_sum"
META_TP = "llmbuild.tp"
META_RANK = "llmbuild.rank"
META_POINTS = "llmbuild.allreduce_points"
def rank_dir(rank: int) -> str:
    return f"rank{rank}"


def marker_name(k: int) -> str:
    return f"{MARKER_PREFIX}{k}"


def mark_allreduce_points(model: ir.Model) -> list[dict]:
    """Insert an `allreduce.<k>` marker after every row-parallel linear (its MatMul's
    `llmbuild.linear` annotation says `"parallel": "row"`); returns the collective plan
    [{name, op, reduce, weight}] in graph order."""
    graph = model.graph
    points = []
    for node in list(graph):
        meta = annotation(node, LINEAR) or annotation(node, MOE)  # routed experts: their sum is partial
        if meta is None or meta.get("parallel") != "row":
            continue
        name = marker_name(len(points))
        partial = node.outputs[0]
        partial.name = f"{name}.partial"
        reduced = ir.Value(name=name, type=partial.type, shape=partial.shape)
        partial.replace_all_uses_with(reduced)
        marker = ir.node("Identity", [partial], outputs=[reduced], name=name,
                         metadata_props={COLLECTIVE_KEY: ALL_REDUCE_SUM})
        graph.insert_after(node, marker)
        points.append({"name": name, "op": "all_reduce", "reduce": "sum",
                       "weight": meta["weight"] if "weight" in meta else f"moe.{meta['layer']}"})
    model.metadata_props[META_POINTS] = json.dumps([p["name"] for p in points])
    return points
