"""ONNX Runtime executor (CPU): the artifact's ONNX graph with an in-place KV cache.

Each layer's `past_*` input and `present_*` output are bound (IOBinding) to the same
preallocated buffer, so the cache update writes the new rows into it instead of
copying the whole cache every step. A pass over slots a..a+B-1 binds views of those
slots (the slot dimension is the buffers' leading one, so the views are contiguous
and no bytes move). Decode steps reuse one IOBinding per slot range, built once, whose
inputs and logits are preallocated arrays bound once: a step writes its token ids and
positions into them and copies the logits out, and creates no ORT value.

By default the executor runs the graph lowered for the CPU (llmbuild.lowering.cpu:
ONNX Runtime's fused GroupQueryAttention, 16-bit weights promoted to float32): the
artifact's CPU-ready graph when it has one (written at compile, loaded as is;
llmbuild.lowering.cpu_graph), else the standard graph lowered in memory at load.
`cpu_lowering=False` runs the standard graph exactly as TensorRT would parse it.

On a lowered graph, passes of at most `kernels.MAX_ROWS` rows (decode steps) run on a
second session whose MatMulNBits nodes use llmbuild's own CPU kernels when their library is
built and the CPU can run them (llmbuild.runtime.kernels); both sessions read one copy of
the weights and bind the same cache buffers. `kernels` says which ran decode steps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from llmbuild.graph import io
from llmbuild.runtime import kernels
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


def session_options(threads: int | None, log_severity: int = 3, *, spinning: bool = True):
    """Session options tuned for decoding: one intra-op pool, sequential graph, all
    graph optimizations, denormals flushed (they appear in softmax tails and are slow).
    `spinning`: whether the pool's workers spin between kernels (ONNX Runtime's default)
    or block. A decode step is hundreds of short parallel kernels; where more threads are
    runnable than there are cores, a spinning worker burns the time slice its kernel's
    other half needs (benchmarks/moe/RESULTS.md and benchmarks/quantization/RESULTS.md
    measure both); on cores the process has to itself, spinning saves the wake-up."""
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


class _Binding(NamedTuple):
    session: object  # the onnxruntime.InferenceSession it binds
    binding: object  # onnxruntime.IOBinding
    logits: np.ndarray | None  # the bound logits output (one logit per row)
    inputs: dict[str, np.ndarray] | None  # the bound input arrays (decode steps)


class OnnxRuntimeExecutor:
    name = "onnxruntime"
    slot_ranges = True  # forward() may cover any contiguous range of cache slots

    def __init__(self, model_path: Path, *, num_layers: int, cache_len: int, batch_size: int = 1,
                 threads: int | None = None, cpu_lowering: bool | None = None, log_severity: int = 3,
                 cpu_graph: Path | None = None, profile: str | None = None, spinning: bool = True,
                 cpu_kernels: bool | None = None):
        """cpu_lowering: True = lowered graph or an error, False = the standard graph,
        None = lowered when the graph allows it (else the standard graph, logged).
        cpu_graph: the artifact's CPU-ready graph file (already lowered), used unless
        cpu_lowering is False. `graph_source` says which graph runs: "cpu_graph",
        "lowered at load" or "standard". profile: a file prefix; ONNX Runtime then records
        every node's run time (`end_profiling()` writes the JSON trace and returns its path).
        spinning: see session_options. cpu_kernels: True = decode steps on llmbuild's CPU
        kernels or an error (KernelsUnavailable), False = ONNX Runtime's kernels only, None =
        llmbuild's where they can run (else logged at debug level)."""
        import onnxruntime as ort

        self._ort = ort
        model_path = Path(model_path)

        def options(prefix: str | None):
            opts = session_options(threads, log_severity, spinning=spinning)
            if prefix:
                opts.enable_profiling = True
                opts.profile_file_prefix = prefix
            return opts

        opts = options(profile)
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
        folder = Path(source).parent if isinstance(source, str) else model_path.parent
        decode = self._llmbuild_kernels(source, folder, cpu_kernels) if self.lowered and cpu_kernels is not False else None
        self._shared = {}
        if decode is not None:  # both sessions read one copy of the weights
            source, decode_bytes, library, arrays, swapped = decode
            self._shared = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
            dopts = options(f"{profile}-decode" if profile else None)
            for o in (opts, dopts):
                o.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
                for name, value in self._shared.items():
                    o.add_initializer(name, value)
                # Two pools: each stops spinning when its Run() returns, or its workers would
                # spin on (ONNX Runtime: up to ~2^20 pauses) through the other session's passes.
                o.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
        self._decode_session = self.session
        self.kernels = "onnxruntime"
        if decode is not None:
            try:
                dopts.register_custom_ops_library(str(library))
                self._decode_session = ort.InferenceSession(decode_bytes, sess_options=dopts,
                                                            providers=["CPUExecutionProvider"])
                self.kernels = f"llmbuild ({swapped} MatMulNBits nodes, passes of <= {kernels.MAX_ROWS} rows)"
            except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own Fail/InvalidGraph types
                if cpu_kernels:
                    raise
                log.warning("llmbuild CPU kernels not used: ONNX Runtime refused them (%s)", e)
        # passes of at most this many rows (batch x tokens) run on the decode session
        self._max_rows = kernels.MAX_ROWS if self._decode_session is not self.session else 0
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

    @staticmethod
    def _llmbuild_kernels(source: str | bytes, folder: Path, required: bool | None):
        """(graph bytes, decode graph bytes, kernel library, shared weight arrays, nodes
        swapped) when llmbuild's kernels can run this graph's MatMulNBits nodes, else None (or
        KernelsUnavailable if required). Both graphs read the shared arrays."""
        import onnx

        try:
            library = kernels.library()
        except kernels.KernelsUnavailable as e:
            if required:
                raise
            # a library the user named but that cannot run is worth a warning; an unbuilt one is not
            asked = os.environ.get(kernels.ENV, "").lower() not in ("", *kernels.OFF)
            (log.warning if asked else log.debug)("llmbuild CPU kernels not used: %s", e)
            return None
        model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source, load_external_data=False)
        swapped = kernels.swap_matmulnbits(model)
        if not swapped:
            if required:
                raise kernels.KernelsUnavailable("the graph has no MatMulNBits node llmbuild's kernels compute")
            return None
        arrays = kernels.shared_initializers(model, folder)
        arrays |= kernels.share_casts(model, arrays)
        decode = model.SerializeToString()
        for node in model.graph.node:  # the same graph with ONNX Runtime's MatMulNBits
            if node.domain == kernels.DOMAIN:
                node.domain = "com.microsoft"
        kept = [o for o in model.opset_import if o.domain != kernels.DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
        return model.SerializeToString(), decode, library, arrays, swapped

    @property
    def cache_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    def reset(self, batch_size: int) -> None:
        """Fresh zeroed cache buffers for `batch_size` slots, bound as past and present."""
        shape = (batch_size, self.kv_heads, self.cache_len, self.head_dim)
        self._buffers = [np.zeros(shape, self.cache_dtype) for _ in range(2 * self.num_layers)]
        self._bindings: dict[tuple[int, int, bool, bool], _Binding] = {}
        self.batch_size = batch_size

    def _binding(self, first_slot: int, batch: int, tokens: int, num_logits: int) -> _Binding:
        """The IOBinding of a pass over slots first_slot..+batch: the cache views bound as
        past and present. Passes with one logit per row (decode steps, prefill ends) keep
        theirs, with a preallocated logits output; decode steps (one token per row) also
        have their inputs in preallocated arrays bound once: a step only writes its token
        ids and positions into them."""
        decode = tokens == 1 and num_logits == 1
        few_rows = batch * tokens <= self._max_rows  # these passes run on the decode session
        key = (first_slot, batch, decode, few_rows)
        if num_logits == 1 and key in self._bindings:
            return self._bindings[key]
        ort = self._ort
        session = self._decode_session if few_rows else self.session
        binding = session.io_binding()
        # Logits first: get_outputs() lists outputs in binding order.
        logits = inputs = None
        if num_logits == 1:
            logits = np.empty((batch, 1, self.vocab), np.float32)
            binding.bind_ortvalue_output(io.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        else:
            binding.bind_output(io.LOGITS, "cpu")
        if decode:
            inputs = {io.INPUT_IDS: np.zeros((batch, 1), np.int64), io.POSITION_IDS: np.zeros((batch, 1), np.int64),
                      io.WRITE_INDICES: np.zeros(batch, np.int64), io.LOGITS_INDICES: np.zeros((batch, 1), np.int64)}
            for name, array in inputs.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        for (past, present), buf in zip(io.cache_pairs(self.num_layers), self._buffers):
            value = ort.OrtValue.ortvalue_from_numpy(buf[first_slot : first_slot + batch])
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        bound = _Binding(session, binding, logits, inputs)
        if num_logits == 1:
            self._bindings[key] = bound
        return bound

    def forward(self, step: StepInputs, first_slot: int = 0) -> np.ndarray:
        """Logits [B, K, vocab] (a fresh array the caller may keep)."""
        check_slots(step, first_slot, self.batch_size)
        (batch, tokens), num_logits = step.input_ids.shape, step.logits_indices.shape[1]
        bound = self._binding(first_slot, batch, tokens, num_logits)
        b = bound.binding
        for name, value in ((io.INPUT_IDS, step.input_ids), (io.POSITION_IDS, step.position_ids),
                            (io.WRITE_INDICES, step.write_indices), (io.LOGITS_INDICES, step.logits_indices)):
            if bound.inputs is not None:  # in place: the arrays are bound
                bound.inputs[name][...] = value
            else:
                b.bind_cpu_input(name, np.ascontiguousarray(value, np.int64))
        bound.session.run_with_iobinding(b)
        if bound.logits is not None:
            return bound.logits.copy()
        return b.get_outputs()[0].numpy()

    def cache_arrays(self) -> list[np.ndarray]:
        """The live cache buffers (past/present alias), in cache_pairs order."""
        return self._buffers

    def end_profiling(self) -> str:
        """Stop ONNX Runtime's profiler (see `profile`); the trace file's path (the decode
        session's when decode steps ran on llmbuild's kernels; the other's is logged)."""
        path = self.session.end_profiling()
        if self._decode_session is not self.session:
            log.info("profile of the passes on ONNX Runtime's kernels: %s", path)
            path = self._decode_session.end_profiling()
        return path

    def close(self) -> None:
        self._bindings = {}
        self.session = self._decode_session = None
        self._shared = {}
