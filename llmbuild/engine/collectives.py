"""All-reduce layers for tensor-parallel rank graphs, inserted after ONNX parsing.

The ONNX parser has no collective op. A rank graph (`llmbuild.parallel.export`) marks
each all-reduce point with an `Identity` node named `allreduce.<k>`; the parser turns
it into an IIdentityLayer of that name. Each one is replaced here:

    before:  partial ──IIdentityLayer "allreduce.k"──► t ──► consumers
    after:   partial ──IDistCollectiveLayer(ALL_REDUCE, SUM, num_ranks=N) "allreduce.k" ──► consumers
             (the identity layer is left without consumers; the builder drops it)

Consumers are rewired with `ILayer.set_input`. (Graph inputs standing for the
reduced tensors would need `remove_tensor` on a network input, which fails the
builder's sanity check for dynamic shapes in TensorRT-RTX 1.7; a marker layer does not.)
"""

from __future__ import annotations

import json
from pathlib import Path

from llmbuild.errors import BuildError
from llmbuild.parallel.export import META_POINTS, META_RANK, META_TP


def rank_metadata(onnx_path: Path) -> dict | None:
    """{tp, rank, points} of a rank graph, None for an unsharded graph."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if META_TP not in meta:
        return None
    return {"tp": int(meta[META_TP]), "rank": int(meta.get(META_RANK, "0")),
            "points": json.loads(meta.get(META_POINTS, "[]"))}


def insert_collectives(trt, network, points: list[str], num_ranks: int) -> list[dict]:
    """Replace each marker layer named in `points` by an ALL_REDUCE/SUM DistCollective
    layer; returns what was inserted, in `points` order (for the manifest)."""
    layers = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in points:
            layers[layer.name] = layer
    missing = [p for p in points if p not in layers]
    if missing:
        raise BuildError(f"all-reduce markers not found in the parsed network: {', '.join(missing)}")
    consumers: dict[str, list[tuple[object, int]]] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            if t is not None:
                consumers.setdefault(t.name, []).append((layer, j))
    inserted = []
    for name in points:
        marker = layers[name]
        if marker.type != trt.LayerType.IDENTITY or marker.num_inputs != 1:
            raise BuildError(f"all-reduce marker {name} parsed as {marker.type.name}, expected an identity layer")
        source, old = marker.get_input(0), marker.get_output(0)
        collective = network.add_dist_collective(
            source, trt.CollectiveOperation.ALL_REDUCE, trt.ReduceOperation.SUM, -1, None
        )
        if collective is None:
            raise BuildError(f"TensorRT could not create the all-reduce layer for {name}")
        collective.num_ranks = num_ranks
        marker.name = f"{name}.marker"
        collective.name = name
        reduced = collective.get_output(0)
        users = consumers.get(old.name, [])
        old.name = f"{name}.unreduced"
        reduced.name = name
        for layer, j in users:
            layer.set_input(j, reduced)
        if old.is_network_output:
            raise BuildError(f"all-reduce point {name} is a network output; it must feed the graph")
        inserted.append({
            "name": name, "layer": collective.name, "type": collective.type.name, "op": "all_reduce",
            "reduce": "sum", "num_ranks": collective.num_ranks, "input": source.name, "consumers": len(users),
        })
    return inserted


def collectives_for(parsed, onnx_path: Path) -> dict:
    """The engine stage's one call: insert the rank graph's collectives (if any) into
    the parsed network; returns the manifest fields ({} for an unsharded graph)."""
    meta = rank_metadata(onnx_path)
    if meta is None:
        return {}
    inserted = insert_collectives(parsed.trt, parsed.network, meta["points"], meta["tp"])
    decomposable = allow_decomposed_attention(parsed.trt, parsed.network)
    return {"rank": meta["rank"], "num_ranks": meta["tp"], "collectives": inserted,
            "attention_decomposable": decomposable}


def allow_decomposed_attention(trt, network) -> int:
    """Mark every attention of a rank network decomposable; returns how many.

    A rank has 1/tp of the query heads, and TensorRT-RTX 1.7.1 has no dedicated
    one-token (decode profile) attention kernel for fewer than 4 query heads (measured:
    1, 2 and 3 heads fail with "Attention operation was not supported by a dedicated
    kernel"; 4, 5, 8, 9 build). Decomposable lets the builder fall back to plain
    layers where no fused kernel exists.
    """
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = trt.IAttentionOutputLayer  # the TensorRT Python idiom for a layer's own API
            layer.attention.decomposable = True
            count += 1
    return count
