"""Executors for tensor-parallel artifacts (manifest `parallel.tp` > 1).

    onnxruntime  all rank graphs in one CPU session (llmbuild.parallel.simulate merges
                 them, each all-reduce marker a Sum): TensorParallelSimulator
    tensorrt     one worker process per GPU, each running its rank's engine with an
                 NCCL communicator handed to its execution context:

        parent (generator, sampling)                worker r = 0 .. N-1 (GPU r)
          ncclGetUniqueId ──────── id ──────────────►  cudaSetDevice(r); ncclCommInitRank(N, id, r)
                                                       TensorRTExecutor(rank r's engine)
                                                       context.set_communicator(comm)
          forward(step) ───────── step ─────────────►  execute (DistCollective all-reduces
          logits ◄──────────────── rank 0's logits ──   run between the N engines)

`llmbuild run ARTIFACT` and `llmbuild.load(ARTIFACT)` pick this automatically: a
tp = N artifact uses GPUs 0..N-1 (`CUDA_VISIBLE_DEVICES` selects others). Every rank
must execute every step (NCCL collectives block until all ranks join), which the
parent guarantees by sending each step to all workers.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from llmbuild.errors import UserError
from llmbuild.graph import io
from llmbuild.parallel.simulate import merged_model, rank_name
from llmbuild.runtime.executors.base import StepInputs, check_slots

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _parallel(manifest: dict) -> dict:
    return manifest.get("parallel") or {"tp": 1}


def open_parallel_executor(directory: Path, manifest: dict, backend: str, threads: int | None):
    tp = _parallel(manifest)["tp"]
    if backend == "auto":
        backend = "tensorrt" if manifest["engines"] and gpu_count() >= tp else "onnxruntime"
    if backend == "tensorrt":
        return MultiRankTensorRTExecutor(directory, manifest)
    ranks = [r["graph"] for r in _parallel(manifest)["ranks"]]
    return TensorParallelSimulator(directory, ranks, num_layers=manifest["model"]["num_layers"],
                                   cache_len=manifest["limits"]["max_seq_len"], threads=threads)


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


def gpu_count() -> int:
    """NVIDIA GPUs visible to this process (0 without a driver)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


def engine_index(manifest: dict, rank: int, backend: str | None = None) -> int:
    """Index in manifest["engines"] of rank `rank`'s engine (first backend listed)."""
    backend = backend or manifest["engines"][0]["backend"]
    for i, e in enumerate(manifest["engines"]):
        if e["backend"] == backend and e.get("rank", 0) == rank:
            return i
    raise UserError(f"artifact has no {backend} engine for rank {rank}")


# -- NCCL through ctypes (libnccl.so.2 from the nvidia-nccl-cu* wheel or the system) --------


class _NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]  # NCCL_UNIQUE_ID_BYTES


def _libnccl():  # pragma: no cover - needs NCCL
    candidates = ["libnccl.so.2", "libnccl.so"]
    try:
        import nvidia.nccl  # the nvidia-nccl-cu12/cu13 wheel

        candidates.insert(0, str(Path(next(iter(nvidia.nccl.__path__))) / "lib" / "libnccl.so.2"))
    except ImportError:
        pass
    for name in candidates:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise UserError("tensor-parallel TensorRT execution needs NCCL: pip install nvidia-nccl-cu13")


def nccl_unique_id() -> bytes:  # pragma: no cover - needs NCCL
    uid = _NcclUniqueId()
    if _libnccl().ncclGetUniqueId(ctypes.byref(uid)) != 0:
        raise RuntimeError("ncclGetUniqueId failed")
    return bytes(uid.internal)


def nccl_communicator(unique_id: bytes, nranks: int, rank: int):  # pragma: no cover - needs GPUs
    """ncclCommInitRank for this process's current device, as the PyCapsule that
    IExecutionContext.set_communicator takes."""
    lib = _libnccl()
    uid = _NcclUniqueId()
    ctypes.memmove(uid.internal, unique_id, 128)
    comm = ctypes.c_void_p()
    lib.ncclCommInitRank.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, _NcclUniqueId, ctypes.c_int]
    if lib.ncclCommInitRank(ctypes.byref(comm), nranks, uid, rank) != 0:
        raise RuntimeError(f"ncclCommInitRank failed on rank {rank}")
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new_capsule(comm, None, None)


def _worker(directory: str, manifest: dict, rank: int, unique_id: bytes, conn):  # pragma: no cover - GPUs
    try:
        from cuda.bindings import runtime as cudart

        from llmbuild.runtime.executors.tensorrt import TensorRTExecutor

        cudart.cudaSetDevice(rank)
        tp = _parallel(manifest)["tp"]
        executor = TensorRTExecutor(Path(directory), manifest, engine_index(manifest, rank))
        if not executor.context.set_communicator(nccl_communicator(unique_id, tp, rank)):
            raise RuntimeError(f"rank {rank}: set_communicator failed")
        conn.send(("ready", None))
        while True:
            command, payload = conn.recv()
            if command == "forward":
                arrays, first_slot = payload
                logits = executor.forward(StepInputs(*arrays), first_slot)
                conn.send(("ok", logits if rank == 0 else None))
            elif command == "reset":
                executor.reset(payload)
                conn.send(("ok", None))
            else:
                executor.close()
                conn.send(("ok", None))
                return
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"rank {rank}: {type(e).__name__}: {e}"))


class MultiRankTensorRTExecutor:  # pragma: no cover - needs tp NVIDIA GPUs
    """The Executor interface over N worker processes, one engine and GPU each."""

    name = "tensorrt-tp"
    slot_ranges = True  # passed on to every rank's TensorRTExecutor

    def __init__(self, directory: Path, manifest: dict):
        tp = _parallel(manifest)["tp"]
        if gpu_count() < tp:
            raise UserError(f"this artifact is tensor parallel over {tp} GPUs; {gpu_count()} visible")
        unique_id = nccl_unique_id()
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(tp):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(str(directory), manifest, rank, unique_id, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self._gather()
        self.cache_len = manifest["limits"]["max_seq_len"]
        self.batch_size = 0
        self.reset(1)

    def _gather(self):
        replies = [c.recv() for c in self.conns]
        errors = [payload for status, payload in replies if status == "error"]
        if errors:
            self.close()
            raise RuntimeError("; ".join(errors))
        return replies[0][1]

    def _all(self, command, payload=None):
        for c in self.conns:
            c.send((command, payload))
        return self._gather()

    def reset(self, batch_size: int) -> None:
        self._all("reset", batch_size)
        self.batch_size = batch_size

    def forward(self, step: StepInputs, first_slot: int = 0) -> np.ndarray:
        arrays = (step.input_ids, step.position_ids, step.write_indices, step.logits_indices)
        return self._all("forward", (arrays, first_slot))

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("close", None))
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=30)
        self.conns, self.procs = [], []
