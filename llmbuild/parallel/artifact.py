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

import hashlib
from pathlib import Path
from typing import Callable

from llmbuild.parallel.hints import ShardPlan

QUANTIZATION_UNSUPPORTED = (
    "parallel.tp > 1 cannot be combined with quantization yet (quantized weights are made from the "
    "whole model's tensors and calibration; the rank graphs are not quantized): remove `quantization:` "
    "or set parallel.tp to 1"
)


def precision_itemsize(precision: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[precision]


def weight_bytes(config: dict, tp: int, precision: str) -> dict:
    """Weight bytes per rank for `llmbuild plan`: 1/tp of the sharded weights plus the
    replicated ones (embeddings, norms, lm_head), in the compute precision."""
    from llmbuild.models import spec_for

    spec = spec_for(config)
    plan = ShardPlan.for_config(config, tp)
    plan.check()
    shapes = spec.tensors(spec.dims(config))
    return plan.weight_bytes(shapes, precision_itemsize(precision))


def export_ranks(
    source, tp: int, stage: Path, precision: str, max_seq_len: int,
    progress: Callable[[int, int], None] | None = None, quantization: dict | None = None,
) -> dict:
    """Write every rank's graph into `stage`; returns {paths, graph, parallel, graph_hash}
    where `graph` and `parallel` are manifest entries (graph: rank 0's contract)."""
    if quantization:
        from llmbuild.errors import UserError

        raise UserError(QUANTIZATION_UNSUPPORTED)
    from llmbuild.artifact import file_sha256
    from llmbuild.graph.export import MODEL_FILE, WEIGHTS_FILE
    from llmbuild.models import spec_for
    from llmbuild.parallel.export import rank_dir, save_rank_models

    plan = ShardPlan.for_config(source.config, tp)
    plan.check()
    ranks = save_rank_models(source, plan, stage, precision, max_seq_len, progress=progress)
    spec = spec_for(source.config)
    shapes = spec.tensors(spec.dims(source.config))
    digest = hashlib.sha256()
    entries = []
    for r in ranks:
        rel = rank_dir(r["rank"])
        data = r["dir"] / WEIGHTS_FILE
        digest.update((file_sha256(r["path"]) + file_sha256(data)).encode())
        entries.append({"rank": r["rank"], "graph": f"{rel}/{MODEL_FILE}", "weights": f"{rel}/{WEIGHTS_FILE}",
                        "weights_file_bytes": data.stat().st_size})
    collectives = ranks[0]["collectives"]
    if any(r["collectives"] != collectives for r in ranks):
        from llmbuild.errors import BuildError

        raise BuildError("the rank graphs disagree on their all-reduce points; the model's sharding hints "
                         "do not fit its graph")
    per_rank = plan.rank_config(source.config)
    parallel = {
        "tp": tp,
        "per_rank": {k: per_rank[k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size",
                                              "head_dim") if k in per_rank},
        "notes": plan.notes(),
        "weight_bytes": plan.weight_bytes(shapes, precision_itemsize(precision)),
        "ranks": entries,
        "collectives": collectives,
    }
    return {"paths": [r["path"] for r in ranks], "parallel": parallel, "graph_hash": digest.hexdigest(),
            "graph": {"file": entries[0]["graph"], "weights": entries[0]["weights"],
                      "ranks": [e["graph"] for e in entries]}}
