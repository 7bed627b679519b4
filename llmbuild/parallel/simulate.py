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
external-data file (the merged graph refers to `rank<r>/model.onnx.data`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmbuild.graph import io
from llmbuild.parallel.export import COLLECTIVE_KEY, rank_dir
from llmbuild.runtime.executors.base import StepInputs, check_slots

SHARED_INPUTS = (io.INPUT_IDS, io.POSITION_IDS, io.WRITE_INDICES, io.LOGITS_INDICES)
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


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


class TensorParallelSimulator:
    """Executor for a tp > 1 artifact on ONNX Runtime (CPU): all ranks in one session,
    each rank's KV cache bound in place (IOBinding), all-reduce as Sum."""

    name = "onnxruntime-tp"
    slot_ranges = True  # forward() may cover any contiguous range of cache slots

    def __init__(self, artifact_dir: Path, graph_files: list[str], *, num_layers: int, cache_len: int,
                 batch_size: int = 1, threads: int | None = None):
        import onnxruntime as ort

        self.tp = len(graph_files)
        model = merged_model(artifact_dir, graph_files)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(artifact_dir))
        self._ort = ort
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        del model
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = num_layers
        cache_in = inputs[rank_name(0, io.past_key(0))]
        if cache_in.type not in _NP:
            raise RuntimeError(f"ONNX Runtime (CPU) cannot run a graph whose KV cache is {cache_in.type}")
        self.cache_dtype = _NP[cache_in.type]
        self.kv_heads, self.head_dim = int(cache_in.shape[1]), int(cache_in.shape[3])
        self.cache_len = cache_len
        self.batch_size = 0
        self.reset(batch_size)

    def cache_names(self) -> list[tuple[str, str]]:
        return [(rank_name(r, p), rank_name(r, q)) for r in range(self.tp) for p, q in io.cache_pairs(self.num_layers)]

    def reset(self, batch_size: int) -> None:
        """Fresh zeroed cache buffers (every rank's) for `batch_size` slots."""
        shape = (batch_size, self.kv_heads, self.cache_len, self.head_dim)
        self._buffers = [np.zeros(shape, self.cache_dtype) for _ in self.cache_names()]
        self.batch_size = batch_size

    def forward(self, step: StepInputs, first_slot: int = 0) -> np.ndarray:
        """Logits [B, K, vocab] of a pass over cache slots first_slot .. first_slot+B-1;
        each rank's past/present bound in place to that range of its buffers."""
        check_slots(step, first_slot, self.batch_size)
        ort = self._ort
        batch = step.input_ids.shape[0]
        b = self.session.io_binding()
        b.bind_output(io.LOGITS, "cpu")
        for (past, present), buf in zip(self.cache_names(), self._buffers):
            value = ort.OrtValue.ortvalue_from_numpy(buf[first_slot : first_slot + batch])
            b.bind_ortvalue_input(past, value)
            b.bind_ortvalue_output(present, value)
        b.bind_cpu_input(io.INPUT_IDS, np.ascontiguousarray(step.input_ids, np.int64))
        b.bind_cpu_input(io.POSITION_IDS, np.ascontiguousarray(step.position_ids, np.int64))
        b.bind_cpu_input(io.WRITE_INDICES, np.ascontiguousarray(step.write_indices, np.int64))
        b.bind_cpu_input(io.LOGITS_INDICES, np.ascontiguousarray(step.logits_indices, np.int64))
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    def cache_arrays(self) -> list[np.ndarray]:
        """Live cache buffers, rank by rank, each in cache_pairs order."""
        return self._buffers

    def close(self) -> None:
        self.session = None
