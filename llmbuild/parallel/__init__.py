"""Tensor parallelism (recipe `parallel: {tp: N}`): per-rank graphs from sharding hints.

    models/<arch>/sharding.py   hints on HF weight names (column / row parallel, whole heads)
    hints.py                    Shard, ShardPlan: the arithmetic and the tp checks (no numpy)
    sharder.py                  RankSource: a rank's config, shapes and weight slices, streamed
    export.py                   rank graphs + `allreduce.<k>` markers after row-parallel MatMuls
    artifact.py                 rank<r>/ directories and the manifest's `parallel` section
    simulate.py                 all rank graphs merged into one ONNX graph, each marker a Sum

The executors for tp artifacts (the CPU simulation; one TensorRT worker process per GPU
with NCCL) are llmbuild/runtime/executors/tensor_parallel.py.

The engine side (DistCollective layers at the markers) is `llmbuild/engine/collectives.py`.
See docs/tensor-parallel.md.
"""
