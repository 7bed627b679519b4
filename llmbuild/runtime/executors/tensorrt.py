"""TensorRT executor (NVIDIA GPU): the artifact's engine with an in-place KV cache.

Runs with either TensorRT flavour (`tensorrt_rtx` or `tensorrt`, chosen by the engine's
backend in the manifest) and `cuda-python` for device memory. Every I/O tensor of the
manifest's contract gets a device buffer sized for the profile maxima; each `present_*`
output is bound to the address of its `past_*` input (the contract's aliases), so the
KV-cache update happens in place. It needs a GPU and cannot run on a CPU-only machine;
everything it computes without one (the binding plan) lives in `binding_plan`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmbuild.errors import UserError
from llmbuild.graph import io
from llmbuild.runtime.executors.base import StepInputs


def gpu_available() -> bool:
    """True when an NVIDIA driver answers (nvidia-smi present); no CUDA import needed."""
    return shutil.which("nvidia-smi") is not None


@dataclass(frozen=True)
class Binding:
    name: str
    dtype: np.dtype
    max_shape: tuple[int, ...]  # allocation size
    alias_of: str | None  # output bound to this input's buffer

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.max_shape)) * self.dtype.itemsize


def binding_plan(engine_entry: dict) -> list[Binding]:
    """Device buffers for one engine, from the manifest's I/O contract (no GPU needed)."""
    aliases = engine_entry.get("aliases", {})
    contract = {t["name"]: t for t in engine_entry["io"]}
    inputs = [t for t in engine_entry["io"] if t["mode"] == "input"]
    max_dims = {}
    for t in inputs:
        maxima = [max(p[2][d] for p in t["profile_shapes"]) for d in range(len(t["shape"]))]
        max_dims[t["name"]] = tuple(maxima)
    batch = max_dims[io.INPUT_IDS][0]
    num_logits = max_dims[io.LOGITS_INDICES][1]
    plan = []
    for t in engine_entry["io"]:
        name = t["name"]
        if t["mode"] == "input":
            shape = max_dims[name]
        elif name in aliases:
            if aliases[name] not in contract:
                raise UserError(f"engine contract: {name} aliases unknown input {aliases[name]}")
            shape = max_dims[aliases[name]]
        else:  # logits [batch, num_logits, vocab]
            shape = tuple(batch if i == 0 else num_logits if i == 1 else d for i, d in enumerate(t["shape"]))
        if any(d < 0 for d in shape):
            raise UserError(f"engine contract: cannot size buffer for {name} {shape}")
        plan.append(Binding(name, np.dtype(t["dtype"]), tuple(shape), aliases.get(name)))
    return plan


def _check(result):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return result[1] if isinstance(result, tuple) and len(result) == 2 else result


class TensorRTExecutor:  # pragma: no cover - needs an NVIDIA GPU
    name = "tensorrt"

    def __init__(self, directory: Path, manifest: dict, engine_index: int = 0):
        from llmbuild.engine.backends import import_backend

        if not manifest["engines"]:
            raise UserError("this artifact has no engines (engines: []); use backend='onnxruntime'")
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise UserError("the TensorRT executor needs cuda-python: pip install cuda-python") from None
        entry = manifest["engines"][engine_index]
        trt = import_backend(entry["backend"])
        self.trt, self.cudart, self.entry = trt, cudart, entry
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((directory / entry["file"]).read_bytes())
        if self.engine is None:
            raise UserError(
                f"{entry['file']}: TensorRT could not load this engine (built with {entry['backend']} "
                f"{entry['trt_version']} for {entry.get('targets')}); rebuild it for this GPU/TensorRT"
            )
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.plan = binding_plan(entry)
        self.buffers: dict[str, int] = {}
        for b in self.plan:
            if b.alias_of is None:
                self.buffers[b.name] = _check(cudart.cudaMalloc(b.nbytes))
        for b in self.plan:
            if b.alias_of is not None:
                self.buffers[b.name] = self.buffers[b.alias_of]
        for name, ptr in self.buffers.items():
            self.context.set_tensor_address(name, ptr)
        self.num_layers = manifest["model"]["num_layers"]
        self.cache_len = manifest["limits"]["max_seq_len"]
        self.batch_size = 0
        self.reset(1)

    def reset(self, batch_size: int) -> None:
        for b in self.plan:
            if b.name.startswith("past_"):
                _check(self.cudart.cudaMemsetAsync(self.buffers[b.name], 0, b.nbytes, self.stream))
        self.batch_size = batch_size

    def forward(self, step: StepInputs) -> np.ndarray:
        cudart = self.cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        host = {
            io.INPUT_IDS: step.input_ids, io.POSITION_IDS: step.position_ids,
            io.WRITE_INDICES: step.write_indices, io.LOGITS_INDICES: step.logits_indices,
        }
        for name, array in host.items():
            array = np.ascontiguousarray(array, np.int64)
            self.context.set_input_shape(name, array.shape)
            _check(cudart.cudaMemcpyAsync(self.buffers[name], array.ctypes.data, array.nbytes, h2d, self.stream))
        for b in self.plan:
            if b.name.startswith("past_"):
                self.context.set_input_shape(b.name, (self.batch_size, *b.max_shape[1:]))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        logits_binding = next(b for b in self.plan if b.name == io.LOGITS)
        shape = (step.input_ids.shape[0], step.logits_indices.shape[1], logits_binding.max_shape[2])
        out = np.empty(shape, logits_binding.dtype)
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[io.LOGITS], out.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        for name, ptr in self.buffers.items():
            if not any(b.name == name and b.alias_of for b in self.plan):
                self.cudart.cudaFree(ptr)
        self.buffers = {}
