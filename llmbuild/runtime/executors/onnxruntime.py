"""ONNX Runtime executor (CPU): the artifact's ONNX graph with an in-place KV cache.

Each layer's `past_*` input and `present_*` output are bound (IOBinding) to the same
preallocated buffer, so the cache update writes the new rows into it instead of
copying the whole cache every step. A pass over slots a..a+B-1 binds views of those
slots (the slot dimension is the buffers' leading one, so the views are contiguous
and no bytes move); one IOBinding per slot range is built once and reused, with a
preallocated logits buffer, so a step allocates nothing but its small token arrays.

By default the executor runs the graph lowered for the CPU (llmbuild.lowering.cpu:
ONNX Runtime's fused GroupQueryAttention, 16-bit weights promoted to float32): the
artifact's CPU-ready graph when it has one (written at compile, loaded as is;
llmbuild.lowering.cpu_graph), else the standard graph lowered in memory at load.
`cpu_lowering=False` runs the standard graph exactly as TensorRT would parse it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from llmbuild.graph import io
from llmbuild.runtime.executors.base import StepInputs, check_slots

log = logging.getLogger(__name__)

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def default_threads() -> int:
    """Physical cores available to this process (ONNX Runtime's own default), at most 8."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or available
    except Exception:  # noqa: BLE001 - psutil can fail in containers
        physical = available
    return max(1, min(available, physical, 8))


def session_options(threads: int | None, log_severity: int = 3, *, spinning: bool = False):
    """Session options tuned for decoding: one intra-op pool, sequential graph, all
    graph optimizations, denormals flushed (they appear in softmax tails and are slow),
    and intra-op workers that block instead of spinning between kernels (`spinning`:
    ONNX Runtime's default). A decode step is hundreds of short parallel kernels; where
    other processes share the cores, a spinning worker burns the time slice its own
    kernel's other half needs: on the shared 2-core machine of benchmarks/moe (load
    average ~25), 2-thread decode of the routed MoE went from 10.4 to 16.1 tok/s and of
    the dense-computed MoE from 3.8 to 5.2 (RESULTS.md); at 1 thread there is no worker."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = log_severity
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


class OnnxRuntimeExecutor:
    name = "onnxruntime"
    slot_ranges = True  # forward() may cover any contiguous range of cache slots

    def __init__(self, model_path: Path, *, num_layers: int, cache_len: int, batch_size: int = 1,
                 threads: int | None = None, cpu_lowering: bool | None = None, log_severity: int = 3,
                 cpu_graph: Path | None = None):
        """cpu_lowering: True = lowered graph or an error, False = the standard graph,
        None = lowered when the graph allows it (else the standard graph, logged).
        cpu_graph: the artifact's CPU-ready graph file (already lowered), used unless
        cpu_lowering is False. `graph_source` says which graph runs: "cpu_graph",
        "lowered at load" or "standard"."""
        import onnxruntime as ort

        self._ort = ort
        model_path = Path(model_path)
        opts = session_options(threads, log_severity)
        self.threads = opts.intra_op_num_threads
        self.lowered = False
        self.graph_source = "standard"
        source: str | bytes = str(model_path)
        if cpu_lowering is not False and cpu_graph is not None:
            source = str(cpu_graph)  # external data resolves relative to its folder
            self.lowered, self.graph_source = True, "cpu_graph"
        elif cpu_lowering is not False:
            from llmbuild.lowering.cpu import LoweringError, lowered_model_bytes

            try:
                source = lowered_model_bytes(model_path)
                # Weights stay in the artifact's external data file, read from there.
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                              str(model_path.parent))
                self.lowered, self.graph_source = True, "lowered at load"
            except LoweringError as e:
                if cpu_lowering:
                    raise
                log.warning("CPU lowering not applied (%s); running the standard graph (slower)", e)
        self.session = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = num_layers
        cache_in = inputs[io.past_key(0)]
        if cache_in.type not in _NP:
            raise RuntimeError(
                f"ONNX Runtime (CPU) cannot run a graph whose KV cache is {cache_in.type}; "
                "build a float32 or float16 artifact for CPU execution"
            )
        self.cache_dtype = _NP[cache_in.type]
        self.kv_heads, self.head_dim = int(cache_in.shape[1]), int(cache_in.shape[3])
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self.cache_len = cache_len
        self.batch_size = 0
        self.reset(batch_size)

    @property
    def cache_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    def reset(self, batch_size: int) -> None:
        """Fresh zeroed cache buffers for `batch_size` slots, bound as past and present."""
        shape = (batch_size, self.kv_heads, self.cache_len, self.head_dim)
        self._buffers = [np.zeros(shape, self.cache_dtype) for _ in range(2 * self.num_layers)]
        self._bindings: dict[tuple[int, int, int], tuple[object, np.ndarray | None]] = {}
        self.batch_size = batch_size

    def _binding(self, first_slot: int, batch: int, num_logits: int):
        key = (first_slot, batch, num_logits)
        cached = self._bindings.get(key)
        if cached is not None:
            return cached
        ort = self._ort
        binding = self.session.io_binding()
        # Logits first: get_outputs() lists outputs in binding order.
        logits = None
        if num_logits == 1:  # decode steps and prefill ends: a reusable output buffer
            logits = np.empty((batch, 1, self.vocab), np.float32)
            binding.bind_ortvalue_output(io.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        else:
            binding.bind_output(io.LOGITS, "cpu")
        for (past, present), buf in zip(io.cache_pairs(self.num_layers), self._buffers):
            value = ort.OrtValue.ortvalue_from_numpy(buf[first_slot : first_slot + batch])
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        if num_logits == 1:
            self._bindings[key] = (binding, logits)
        return binding, logits

    def forward(self, step: StepInputs, first_slot: int = 0) -> np.ndarray:
        """Logits [B, K, vocab] (a fresh array the caller may keep)."""
        check_slots(step, first_slot, self.batch_size)
        b, logits = self._binding(first_slot, step.input_ids.shape[0], step.logits_indices.shape[1])
        b.bind_cpu_input(io.INPUT_IDS, np.ascontiguousarray(step.input_ids, np.int64))
        b.bind_cpu_input(io.POSITION_IDS, np.ascontiguousarray(step.position_ids, np.int64))
        b.bind_cpu_input(io.WRITE_INDICES, np.ascontiguousarray(step.write_indices, np.int64))
        b.bind_cpu_input(io.LOGITS_INDICES, np.ascontiguousarray(step.logits_indices, np.int64))
        self.session.run_with_iobinding(b)
        if logits is not None:
            return logits.copy()
        return b.get_outputs()[0].numpy()

    def cache_arrays(self) -> list[np.ndarray]:
        """The live cache buffers (past/present alias), in cache_pairs order."""
        return self._buffers

    def close(self) -> None:
        self._bindings = {}
        self.session = None
