"""The compile pipeline's tensor-parallel step: rank graphs into the artifact, and
the manifest's `parallel` section.

    <artifact>/
      rank0/model.onnx + model.onnx.data      rank r's graph and its weight share
      rank1/...
      engines/<backend>-<target>-rank<r>.engine

    manifest["parallel"] = {
      "tp": N,
      "per_rank": {"num_attention_heads": .., "num_key_value_heads": .., "intermediate_size": ..},
      "notes": [...],                         e.g. KV-head replication
      "weight_bytes": {"sharded": .., "replicated": .., "per_rank": [..]},
      "ranks": [{"rank", "graph", "weights", "weights_file_bytes"}],
      "collectives": [{"name": "allreduce.<k>", "op": "all_reduce", "reduce": "sum", "weight": ..}],
    }
"""

from __future__ import annotations

from llmbuild.parallel.hints import ShardPlan

def precision_itemsize(precision: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[precision]


def parallel_section(ranks: list[dict], plan: ShardPlan, config: dict, precision: str) -> dict:
    """The manifest's `parallel` section for saved rank graphs `ranks`
    ([{rank, dir, path, collectives}], from the compile pipeline)."""
    from llmbuild.graph.export import MODEL_FILE, WEIGHTS_FILE
    from llmbuild.models import spec_for

    spec = spec_for(config)
    shapes = spec.tensors(spec.dims(config))
    entries = []
    for r in ranks:
        rel = r["dir"].name
        entries.append({"rank": r["rank"], "graph": f"{rel}/{MODEL_FILE}", "weights": f"{rel}/{WEIGHTS_FILE}",
                        "weights_file_bytes": (r["dir"] / WEIGHTS_FILE).stat().st_size})
    collectives = ranks[0]["collectives"]
    if any(r["collectives"] != collectives for r in ranks):
        from llmbuild.errors import BuildError

        raise BuildError("the rank graphs disagree on their all-reduce points; the model's sharding hints "
                         "do not fit its graph")
    per_rank = plan.rank_config(config)
    return {
        "tp": plan.tp,
        "per_rank": {k: per_rank[k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size",
                                              "head_dim") if k in per_rank},
        "notes": plan.notes(),
        "weight_bytes": plan.weight_bytes(shapes, precision_itemsize(precision)),
        "ranks": entries,
        "collectives": collectives,
    }
