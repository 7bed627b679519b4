"""ONNX Runtime executor (CPU): the artifact's ONNX graph with an in-place KV cache.

Each layer's `past_*` input and `present_*` output are bound (IOBinding) to the same
preallocated buffer, so `TensorScatter` writes the new rows into it instead of
copying the whole cache every step.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmbuild.graph import io
from llmbuild.runtime.executors.base import StepInputs

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxRuntimeExecutor:
    name = "onnxruntime"

    def __init__(self, model_path: Path, *, num_layers: int, cache_len: int, batch_size: int = 1,
                 threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self._ort = ort
        self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
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
        self.cache_len = cache_len
        self.batch_size = 0
        self.reset(batch_size)

    def reset(self, batch_size: int) -> None:
        """Fresh zeroed cache buffers for `batch_size` slots, bound as past and present."""
        ort = self._ort
        shape = (batch_size, self.kv_heads, self.cache_len, self.head_dim)
        self._buffers = [np.zeros(shape, self.cache_dtype) for _ in range(2 * self.num_layers)]
        self._values = [ort.OrtValue.ortvalue_from_numpy(b) for b in self._buffers]
        self.binding = self.session.io_binding()
        self.binding.bind_output(io.LOGITS, "cpu")  # first output: get_outputs()[0]
        for (past, present), value in zip(io.cache_pairs(self.num_layers), self._values):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
        self.batch_size = batch_size

    def forward(self, step: StepInputs) -> np.ndarray:
        if step.input_ids.shape[0] != self.batch_size:
            raise ValueError(f"batch {step.input_ids.shape[0]} != cache slots {self.batch_size}")
        b = self.binding
        b.bind_cpu_input(io.INPUT_IDS, np.ascontiguousarray(step.input_ids, np.int64))
        b.bind_cpu_input(io.POSITION_IDS, np.ascontiguousarray(step.position_ids, np.int64))
        b.bind_cpu_input(io.WRITE_INDICES, np.ascontiguousarray(step.write_indices, np.int64))
        b.bind_cpu_input(io.LOGITS_INDICES, np.ascontiguousarray(step.logits_indices, np.int64))
        b.bind_output(io.LOGITS, "cpu")  # re-bound: its shape changes between steps
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    def cache_arrays(self) -> list[np.ndarray]:
        """The live cache buffers (past/present alias), in cache_pairs order."""
        return self._buffers

    def close(self) -> None:
        self.binding = None
        self.session = None
