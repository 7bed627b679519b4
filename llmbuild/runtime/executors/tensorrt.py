"""TensorRT executor (NVIDIA GPU): the artifact's engine with an in-place KV cache.

Runs with either TensorRT flavour (`tensorrt_rtx` or `tensorrt`, chosen by the engine's
backend in the manifest) and `cuda-python` for device memory. Every I/O tensor of the
manifest's contract gets a device buffer sized for the profile maxima; each `present_*`
output is bound to the address of its `past_*` input (the contract's aliases), so the
KV-cache update happens in place. It needs a GPU and cannot run on a CPU-only machine;
everything it decides without one lives in pure functions tested on the CPU:

    binding_plan(entry)      one device buffer per I/O tensor, sized for the profile maxima;
                             present_* share their past_* buffer
    plan_step(entry, ...)    for one pass: the optimization profile (engine.profiles.select_
                             profile), every input's shape, and the cache addresses as
                             (buffer, byte offset): a pass over slots a..a+B-1 points
                             past/present at slot a of each cache buffer with batch B, so a
                             prompt is prefilled alone, without padding, like on ONNX Runtime

A pass then is: host->device copies of the four small inputs, `execute_async_v3` on
the executor's stream, one device->host copy of the logits. Decode steps can run as
CUDA graphs (`cuda_graphs=True`): TensorRT-RTX captures them itself
(IRuntimeConfig.cuda_graph_strategy = WHOLE_GRAPH_CAPTURE, per shape); with `tensorrt`
the executor captures one graph per (profile, slot range) on the second step of that
shape and replays it, the inputs being copied into the same device buffers first.
"""

from __future__ import annotations

import ctypes
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


@dataclass(frozen=True)
class StepPlan:
    profile: int
    shapes: dict[str, tuple[int, ...]]  # every input tensor's shape for this pass
    offsets: dict[str, tuple[str, int]]  # cache tensor -> (buffer it lives in, byte offset)
    logits_shape: tuple[int, ...]


def slot_bytes(binding: Binding) -> int:
    """Bytes of one cache slot ([kv_heads, cache_len, head_dim]) of a cache buffer."""
    return int(np.prod(binding.max_shape[1:])) * binding.dtype.itemsize


def plan_step(engine_entry: dict, plan: list[Binding], *, batch: int, seq: int, num_logits: int,
              first_slot: int, slots: int) -> StepPlan:
    """Profile, shapes and cache addresses of one pass (no GPU needed). Anything the
    engine cannot take raises UserError here, never a TensorRT shape failure."""
    from llmbuild.engine.profiles import select_profile

    by_name = {b.name: b for b in plan}
    cache_max = by_name[io.past_key(0)].max_shape[0]
    if slots > cache_max:
        raise UserError(f"{slots} cache slots requested; the engine's profiles allow at most {cache_max}")
    if first_slot < 0 or first_slot + batch > slots:
        raise UserError(f"a pass over {batch} sequence(s) from slot {first_slot} does not fit {slots} slots")
    profile_index = select_profile(engine_entry, batch, seq, num_logits)
    profile = engine_entry["profiles"][profile_index]
    shapes = {io.INPUT_IDS: (batch, seq), io.POSITION_IDS: (batch, seq), io.WRITE_INDICES: (batch,),
              io.LOGITS_INDICES: (batch, num_logits)}
    offsets = {}
    for b in plan:
        owner = b.alias_of or b.name
        if not owner.startswith("past_"):
            continue
        offsets[b.name] = (owner, first_slot * slot_bytes(by_name[owner]))
        if b.alias_of is None:
            shape = (batch, *b.max_shape[1:])
            lo, _, hi = profile[b.name]
            if not all(l <= d <= h for l, d, h in zip(lo, shape, hi)):
                raise UserError(f"{b.name} {shape} is outside profile {profile_index} ({lo} .. {hi})")
            shapes[b.name] = shape
    vocab = by_name[io.LOGITS].max_shape[2]
    return StepPlan(profile_index, shapes, offsets, (batch, num_logits, vocab))


def _check(result):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return result[1] if isinstance(result, tuple) and len(result) == 2 else result


class TensorRTExecutor:  # pragma: no cover - needs an NVIDIA GPU
    name = "tensorrt"
    slot_ranges = True

    def __init__(self, directory: Path, manifest: dict, engine_index: int = 0, *, batch_size: int = 1,
                 cuda_graphs: bool = True):
        from llmbuild.engine.backends import import_backend
        from llmbuild.engine.compat import apply_weight_streaming, check_engine_compatible

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
        check_engine_compatible(trt, entry, directory / entry["file"], runtime=self.runtime)  # version, GPU
        self.engine = self.runtime.deserialize_cuda_engine((directory / entry["file"]).read_bytes())
        if self.engine is None:
            raise UserError(
                f"{entry['file']}: TensorRT could not load this engine (built with {entry['backend']} "
                f"{entry['trt_version']} for {entry.get('targets')}); rebuild it for this GPU/TensorRT"
            )
        apply_weight_streaming(self.engine, entry)  # the recipe's budget, if built with weight streaming
        # TensorRT-RTX captures CUDA graphs itself; `tensorrt` gets them from _launch().
        self.native_graphs = cuda_graphs and hasattr(trt, "CudaGraphStrategy")
        self.manual_graphs = cuda_graphs and not self.native_graphs
        if self.native_graphs:
            config = self.engine.create_runtime_config()
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.plan = binding_plan(entry)
        self.buffers: dict[str, int] = {}
        for b in self.plan:
            if b.alias_of is None:
                self.buffers[b.name] = _check(cudart.cudaMalloc(b.nbytes))
        # Page-locked host staging for the small inputs and the logits (async copies).
        self.host: dict[str, np.ndarray] = {}
        self._host_ptrs: list[int] = []
        for b in self.plan:
            if b.name in (io.INPUT_IDS, io.POSITION_IDS, io.WRITE_INDICES, io.LOGITS_INDICES, io.LOGITS):
                ptr = _check(cudart.cudaMallocHost(b.nbytes))
                self._host_ptrs.append(ptr)
                self.host[b.name] = np.ctypeslib.as_array((ctypes.c_byte * b.nbytes).from_address(ptr)).view(b.dtype)
        for name in (io.INPUT_IDS, io.POSITION_IDS, io.WRITE_INDICES, io.LOGITS_INDICES, io.LOGITS):
            self.context.set_tensor_address(name, self.buffers[name])
        self.num_layers = manifest["model"]["num_layers"]
        self.cache_len = manifest["limits"]["max_seq_len"]
        self._profile = -1
        self._range: tuple[int, int] | None = None
        self._graphs: dict[tuple, object] = {}  # (profile, first_slot, batch) -> cudaGraphExec_t
        self._seen: set[tuple] = set()
        self.batch_size = 0
        self.reset(batch_size)

    def reset(self, batch_size: int) -> None:
        plan_step(self.entry, self.plan, batch=1, seq=1, num_logits=1, first_slot=0, slots=batch_size)  # checks
        for b in self.plan:
            if b.name.startswith("past_"):
                _check(self.cudart.cudaMemsetAsync(self.buffers[b.name], 0, b.nbytes, self.stream))
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        self.batch_size = batch_size

    def _bind(self, sp: StepPlan, first_slot: int, batch: int) -> None:
        if sp.profile != self._profile:
            if not self.context.set_optimization_profile_async(sp.profile, self.stream):
                raise RuntimeError(f"TensorRT refused optimization profile {sp.profile}")
            self._profile, self._range = sp.profile, None
        for name, shape in sp.shapes.items():
            self.context.set_input_shape(name, shape)
        if self._range != (first_slot, batch):  # cache addresses move only with the slot range
            for name, (owner, offset) in sp.offsets.items():
                self.context.set_tensor_address(name, self.buffers[owner] + offset)
            self._range = (first_slot, batch)

    def forward(self, step: StepInputs, first_slot: int = 0) -> np.ndarray:
        cudart = self.cudart
        batch, seq = step.input_ids.shape
        sp = plan_step(self.entry, self.plan, batch=batch, seq=seq, num_logits=step.logits_indices.shape[1],
                       first_slot=first_slot, slots=self.batch_size)
        self._bind(sp, first_slot, batch)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, array in ((io.INPUT_IDS, step.input_ids), (io.POSITION_IDS, step.position_ids),
                            (io.WRITE_INDICES, step.write_indices), (io.LOGITS_INDICES, step.logits_indices)):
            staged = self.host[name][: array.size]
            staged[:] = np.asarray(array, np.int64).ravel()
            _check(cudart.cudaMemcpyAsync(self.buffers[name], staged.ctypes.data, staged.nbytes, h2d, self.stream))
        self._launch((sp.profile, first_slot, batch), decode=seq == 1)
        count = int(np.prod(sp.logits_shape))
        out = self.host[io.LOGITS][:count]
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[io.LOGITS], out.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return out.reshape(sp.logits_shape).astype(np.float32, copy=True)

    def _launch(self, key: tuple, decode: bool) -> None:
        cudart = self.cudart
        graph = self._graphs.get(key)
        if graph is not None:
            _check(cudart.cudaGraphLaunch(graph, self.stream))
            return
        capture = self.manual_graphs and decode and key in self._seen  # 1st run warms up, 2nd captures
        if capture:
            _check(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        ok = self.context.execute_async_v3(self.stream)
        if capture:
            captured = _check(cudart.cudaStreamEndCapture(self.stream))
            if ok:
                self._graphs[key] = _check(cudart.cudaGraphInstantiate(captured, 0))
                _check(cudart.cudaGraphLaunch(self._graphs[key], self.stream))
            cudart.cudaGraphDestroy(captured)
        if not ok:
            raise RuntimeError("TensorRT execution failed")
        if decode:
            self._seen.add(key)

    def close(self) -> None:
        for graph in self._graphs.values():
            self.cudart.cudaGraphExecDestroy(graph)
        self._graphs = {}
        for ptr in self.buffers.values():
            self.cudart.cudaFree(ptr)
        for ptr in self._host_ptrs:
            self.cudart.cudaFreeHost(ptr)
        self.buffers, self._host_ptrs, self.host = {}, [], {}
