"""Tensor parallelism on the CPU: the N rank graphs run together on ONNX Runtime.

The rank graphs are placed side by side in one ONNX graph (nothing is recomputed or
re-derived: every node and weight is the rank graph's own) and each all-reduce marker
becomes the collective it stands for, a `Sum` over the ranks' partial outputs:

    input_ids, position_ids, write_indices, logits_indices   (shared by every rank)
        │                    │                      │
    rank0/… nodes        rank1/… nodes   …      rank<N-1>/… nodes      (own weights, own KV cache
        │ allreduce.k.partial │                      │                  rank<r>/past_key.<i>)
        └──────────────► Sum "allreduce.k" ◄─────────┘
                             │
        ┌────────────────────┼──────────────────────┐
    rank0/… (next layer)   rank1/…                rank<N-1>/…
        │
      logits  (rank 0's; the other ranks compute the same replicated head, which is pruned)

One ONNX Runtime session, one `run` per step: the Sum nodes are the coordinator that
adds the marked partial outputs between the ranks. Weights stay in each rank's
external-data file (the merged graph refers to `rank<r>/model.onnx.data`). The executor
running that session is llmbuild.runtime.executors.tensor_parallel.TensorParallelSimulator;
the accuracy gate (llmbuild.eval.runners) runs the merged graph as well.
"""

from __future__ import annotations

from pathlib import Path

from llmbuild.graph import io
from llmbuild.parallel.export import COLLECTIVE_KEY, rank_dir

SHARED_INPUTS = (io.INPUT_IDS, io.POSITION_IDS, io.WRITE_INDICES, io.LOGITS_INDICES)


def rank_name(rank: int, name: str) -> str:
    return f"{rank_dir(rank)}/{name}"


def _is_marker(node) -> bool:
    return node.op_type == "Identity" and any(
        p.key == COLLECTIVE_KEY for p in node.metadata_props
    )


def merged_model(artifact_dir: Path, graph_files: list[str]):
    """One ModelProto running all rank graphs, all-reduce points as Sum nodes.

    `graph_files` are the rank graphs relative to `artifact_dir`; external weights are
    referred to relative to `artifact_dir` (load it with that folder as the session's
    external-initializer folder).
    """
    import onnx
    from onnx import helper

    artifact_dir = Path(artifact_dir)
    ranks = [onnx.load(str(artifact_dir / f), load_external_data=False) for f in graph_files]
    first = ranks[0]
    shared = set(SHARED_INPUTS)
    nodes, initializers, inputs, outputs = [], [], [], []
    partials: dict[str, list[str]] = {}  # marker name -> partial per rank
    for r, m in enumerate(ranks):
        g = m.graph
        subdir = Path(graph_files[r]).parent
        markers = {n.output[0] for n in g.node if _is_marker(n)}

        def rename(name: str) -> str:
            if not name or name in shared or name in markers or (r == 0 and name == io.LOGITS):
                return name
            return rank_name(r, name)

        for n in g.node:
            if _is_marker(n):
                partials.setdefault(n.output[0], []).append(rename(n.input[0]))
                continue
            n.input[:] = [rename(x) for x in n.input]
            n.output[:] = [rename(x) for x in n.output]
            n.name = rank_name(r, n.name or f"node{len(nodes)}")
            nodes.append(n)
        for t in g.initializer:
            t.name = rename(t.name)
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = (subdir / entry.value).as_posix()
            initializers.append(t)
        for v in g.input:
            if v.name in shared:
                if r == 0:
                    inputs.append(v)
            else:
                v.name = rename(v.name)
                inputs.append(v)
        for v in g.output:
            if v.name == io.LOGITS:
                if r == 0:
                    outputs.append(v)  # the other ranks' (identical) logits are pruned
            else:
                v.name = rename(v.name)
                outputs.append(v)
    for name, parts in partials.items():
        if len(parts) != len(ranks):
            raise ValueError(f"all-reduce point {name} is in {len(parts)} of {len(ranks)} rank graphs")
        nodes.append(helper.make_node("Sum", parts, [name], name=name))
    nodes, initializers = _prune(nodes, initializers, [v.name for v in outputs])
    graph = helper.make_graph(_topological(nodes, {v.name for v in inputs} | {t.name for t in initializers}),
                              f"{first.graph.name}-tp{len(ranks)}", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=list(first.opset_import), producer_name="llmbuild")
    model.ir_version = first.ir_version
    return model


def _prune(nodes, initializers, outputs):
    """Only the nodes and initializers the outputs depend on."""
    producer = {o: n for n in nodes for o in n.output}
    needed, stack, keep = set(), list(outputs), set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(x for x in node.input if x)
    return [n for n in nodes if id(n) in keep], [t for t in initializers if t.name in needed]


def _topological(nodes, available: set[str]):
    """Nodes in an order where each input is produced before use (ONNX requires it)."""
    available = set(available)
    ordered, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(not x or x in available for x in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"cycle or missing input in the merged graph near {rest[0].name}")
        pending = rest
    return ordered
