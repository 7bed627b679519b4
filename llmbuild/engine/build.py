"""ONNX decoder graph → serialized TensorRT engine, written once for both TensorRT flavours.

    model.onnx (+ model.onnx.data)
        │  pin cache_len = max_seq_len (KV_CACHE_UPDATE needs a static cache length)
        ▼
    OnnxParser ──► INetworkDefinition ──► describe_network() ── the I/O contract
        │                                       │ cache_aliases() checks past/present pairs
        ▼                                       ▼
    IBuilderConfig: profiles_from_limits() (prefill + decode), targets, builder options
                    (options.py), progress monitor
        │
        ▼
    build_serialized_network ──► <engine>.tmp ──os.replace──► <engine>

The I/O contract recorded in the manifest is read from the parsed network, not from
the ONNX: it is what the engine will really expose, and it must be known without a
GPU (deserializing an engine needs one).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

from llmbuild.engine.backends import apply_builder_options, get_backend, import_backend
from llmbuild.engine.options import DEFAULTS as OPTION_DEFAULTS
from llmbuild.engine.options import option_problems, target_label
from llmbuild.engine.profiles import (  # noqa: F401 - re-exported
    OPT_SEQ_LEN,
    PROFILE_NAMES,
    Profile,
    Shape,
    check_limits,
    profiles_from_limits,
)
from llmbuild.errors import BuildError, UserError
from llmbuild.graph import io

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, steps done, steps in phase)

ENGINE_PRECISIONS = ("float16", "bfloat16")
# The graph's dtype for each engine precision, as TensorRT DataType names.
_PRECISION_TRT = {"float16": "HALF", "bfloat16": "BF16"}
# TensorRT DataType name -> numpy-style name (bfloat16/float8 as ml_dtypes spells them).
_DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
    "INT4": "int4",
    "FP4": "float4_e2m1fn",
}
# -- parsing -----------------------------------------------------------------------------


@dataclass
class ParsedNetwork:
    """A parsed network and what must outlive it (the parser owns the weights)."""

    trt: ModuleType
    logger: object
    builder: object
    network: object
    parser: object
    decomposed_attention: list = field(default_factory=list)  # llmbuild.engine.decompose records
    recorder: object = None  # make_error_recorder: the builder's (and network's) errors

    @property
    def errors(self) -> list[str]:
        return [] if self.recorder is None else list(self.recorder.messages)


_LOGGERS: dict[str, object] = {}  # one per TensorRT module: a process keeps the first logger it gives TensorRT


def make_logger(trt: ModuleType):
    """The TensorRT logger of this process. TensorRT calls it for every message — about
    32,000 VERBOSE ones for SmolLM2-135M — and a Python logger takes the GIL for each:
    with Python work beside the build (compile's verification thread) every call waits
    for that thread to yield it, which slowed the engine build by seconds
    (benchmarks/compile_smollm2.md). So unless `logging` listens to this module at INFO
    (TensorRT's warnings) or DEBUG (the rest), the logger is TensorRT's own C++ one, set
    to print errors only (on stdout); the builder's errors reach BuildError through an
    error recorder (make_error_recorder), which TensorRT calls only for errors.
    TensorRT keeps the first logger given in a process (a later builder's is ignored, with
    a warning): this one is made once per TensorRT module and reused."""
    if trt.__name__ in _LOGGERS:
        return _LOGGERS[trt.__name__]
    if not log.isEnabledFor(logging.INFO):
        logger = trt.Logger(trt.Logger.ERROR)
    else:
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    log.debug("%s", msg)  # reported through BuildError (the error recorder)
                elif severity == trt.ILogger.WARNING:
                    log.info("%s", msg)
                else:
                    log.debug("%s", msg)

        logger = Logger()
    _LOGGERS[trt.__name__] = logger
    return logger


def make_error_recorder(trt: ModuleType):
    """A trt.IErrorRecorder keeping the errors of one build (`messages`) for BuildError:
    with a recorder set, TensorRT reports its errors there instead of to the logger."""

    class Recorder(trt.IErrorRecorder):
        def __init__(self):
            trt.IErrorRecorder.__init__(self)
            self.recorded: list = []  # (ErrorCode, description)

        @property
        def messages(self) -> list[str]:
            return [desc for _, desc in self.recorded]

        def clear(self):
            self.recorded.clear()

        def get_error_code(self, index):
            return self.recorded[index][0]

        def get_error_desc(self, index):
            return self.recorded[index][1]

        def has_overflowed(self):
            return False

        def num_errors(self):
            return len(self.recorded)

        def report_error(self, code, desc):
            self.recorded.append((code, desc))
            log.debug("%s", desc)
            return False  # not fatal by our decision: TensorRT goes on as it would without a recorder

    return Recorder()


def _pinned_model_bytes(onnx_path: Path, cache_len: int, decomposed: list | None = None) -> bytes:
    """The ONNX model (weights left external) with the symbolic cache_len dim set, and
    the attention layers TensorRT cannot parse decomposed (llmbuild.engine.decompose;
    their records are appended to `decomposed`).

    TensorRT's KV_CACHE_UPDATE layer (from TensorScatter) needs a static cache length:
    "The KV cache tensor must have a static sequence length dimension". The graph keeps
    cache_len symbolic (ONNX Runtime does not care); the engine fixes it to max_seq_len.
    Bytes that do not decode as ONNX go to the parser unchanged, which reports them.
    """
    import onnx
    from google.protobuf.message import DecodeError

    data = onnx_path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except DecodeError:
        return data
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == io.CACHE_LEN:
                dim.ClearField("dim_param")
                dim.dim_value = cache_len
    from llmbuild.engine.decompose import decompose_for_tensorrt

    records = decompose_for_tensorrt(model)
    if decomposed is not None:
        decomposed.extend(records)
    return model.SerializeToString()


def graph_max_seq_len(onnx_path: Path) -> int | None:
    """Positions the graph's rotary tables cover (metadata written by graph.export)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:
        return None
    meta = {p.key: p.value for p in model.metadata_props}
    value = meta.get("llmbuild.max_seq_len")
    return int(value) if value and value.isdigit() else None


def parse_onnx(
    trt: ModuleType, onnx_path: Path, *, cache_len: int, strongly_typed_flag: bool = False
) -> ParsedNetwork:
    """Parse the decoder graph into a fresh network; all parser errors in one BuildError."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BuildError(f"ONNX model not found: {onnx_path}")
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    recorder = make_error_recorder(trt)
    builder.error_recorder = recorder  # (set after the network: one that inherits it crashes TensorRT-RTX 1.7 when freed)
    parser = trt.OnnxParser(network, logger)
    # parse(bytes, path): path resolves the external weights (model.onnx.data) next to it.
    decomposed: list[dict] = []
    if not parser.parse(_pinned_model_bytes(onnx_path, cache_len, decomposed), path=str(onnx_path)):
        raise BuildError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(_parser_errors(parser)))
    return ParsedNetwork(trt, logger, builder, network, parser, decomposed, recorder)


def _parser_errors(parser) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = f"node {e.node_name()!r} ({e.node_operator()}, #{e.node()})" if e.node() >= 0 else "model"
        errors.append(f"{where}: {e.code().name}: {e.desc()}")
    return errors or ["(the parser gave no reason)"]


# -- the I/O contract ---------------------------------------------------------------------


def dtype_name(dtype) -> str:
    return _DTYPE_NAMES.get(dtype.name, dtype.name.lower())


def describe_network(network) -> list[dict]:
    """Inputs then outputs of a parsed network: name, mode, dtype, shape (-1 = dynamic)."""
    described = []
    tensors = [("input", network.get_input(i)) for i in range(network.num_inputs)]
    tensors += [("output", network.get_output(i)) for i in range(network.num_outputs)]
    for mode, t in tensors:
        described.append({"name": t.name, "mode": mode, "dtype": dtype_name(t.dtype), "shape": [int(d) for d in t.shape]})
    return described


def cache_aliases(described: list[dict], num_layers: int) -> dict[str, str]:
    """present_* output -> past_* input it may alias, checked against the network."""
    by_name = {t["name"]: t for t in described}
    found_layers = sum(1 for t in described if t["mode"] == "input" and t["name"].startswith("past_key."))
    problems = []
    if found_layers != num_layers:
        problems.append(f"network has {found_layers} past_key.* inputs, expected num_layers={num_layers}")
    aliases = {}
    for past, present in io.cache_pairs(num_layers):
        p, q = by_name.get(past), by_name.get(present)
        if p is None or p["mode"] != "input":
            problems.append(f"cache input {past} missing")
        elif q is None or q["mode"] != "output":
            problems.append(f"cache output {present} missing")
        elif p["dtype"] != q["dtype"] or p["shape"][1:] != q["shape"][1:] or len(p["shape"]) != 4:
            problems.append(f"{present} {q['dtype']}{q['shape']} cannot alias {past} {p['dtype']}{p['shape']}")
        else:
            aliases[present] = past
    if problems:
        raise BuildError("KV-cache inputs and outputs do not pair up:\n  " + "\n  ".join(problems))
    return aliases


def _check_network(described: list[dict], precision: str, profile_names: set[str]) -> None:
    problems = []
    want = _DTYPE_NAMES[_PRECISION_TRT[precision]]
    for t in described:
        if t["name"].startswith(("past_", "present_")) and t["dtype"] != want:
            problems.append(f"{t['name']} is {t['dtype']}, but the engine precision is {precision}")
    inputs = {t["name"] for t in described if t["mode"] == "input"}
    for name in sorted(inputs - profile_names):
        problems.append(f"network input {name} has no optimization profile (not in the graph I/O contract)")
    for name in sorted(profile_names - inputs):
        problems.append(f"network has no input {name}")
    if problems:
        raise BuildError("the ONNX graph does not match the engine's I/O contract:\n  " + "\n  ".join(problems))


# -- precision -------------------------------------------------------------------------------


def check_precision(precision: str) -> None:
    if precision == "float32":
        raise UserError(
            "engine precision float32 is not supported: the fused attention kernels that "
            "TensorRT uses for the graph's Attention op need 16-bit Q/K/V (an fp32 graph fails "
            "with 'Attention operation was not supported by a dedicated kernel'). Use "
            "precision float16 or bfloat16, or set `engines: []` to produce a CPU-only fp32 "
            "artifact (ONNX Runtime)."
        )
    if precision not in ENGINE_PRECISIONS:
        raise UserError(f"engine precision {precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)}")


# -- progress ----------------------------------------------------------------------------------


def make_progress_monitor(trt: ModuleType, progress: Progress | None):
    """A trt.IProgressMonitor forwarding (phase, done, total) to `progress`.

    An exception raised by `progress` (e.g. KeyboardInterrupt) cancels the build and is
    re-raised by build_engine. TensorRT may call from several threads.
    """

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.lock = threading.Lock()
            self.steps: dict[str, int] = {}
            self.error: BaseException | None = None

        def _report(self, phase: str, done: int) -> bool:
            if self.error is not None:
                return False
            if progress is None:
                return True
            try:
                progress(phase, done, self.steps.get(phase, 0))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller after the build
                self.error = e
                return False
            return True

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:
                self.steps[phase_name] = int(num_steps)
                self._report(phase_name, 0)

        def step_complete(self, phase_name, step):
            with self.lock:
                return self._report(phase_name, int(step) + 1)

        def phase_finish(self, phase_name):
            with self.lock:
                self._report(phase_name, self.steps.get(phase_name, 0))
                self.steps.pop(phase_name, None)

    return Monitor()


# -- the build -----------------------------------------------------------------------------------


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    backend: str,
    precision: str,
    limits: dict,
    num_layers: int,
    targets: list[str] | None = None,
    options: dict | None = None,
    progress: Progress | None = None,
) -> dict:
    """Build and serialize one engine; returns its manifest entry.

    targets: compute capabilities such as ["sm86", "sm89"] (tensorrt-rtx only), the same
    as options["compute_capabilities"]. None keeps the backend's default: TensorRT-RTX's
    portable engine for sm80/86/89/120 and later, or the build GPU for tensorrt.
    options: the recipe's engine-entry settings (llmbuild.engine.options.DEFAULTS keys:
    hardware_compatibility, optimization_level, workspace_limit_mib, weight_streaming...).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    options = _resolve_options(backend, targets, options)
    check_precision(precision)
    batch, input_len, seq_len, _ = check_limits(limits)
    graph_len = graph_max_seq_len(onnx_path)
    if graph_len is not None and seq_len > graph_len:
        raise UserError(
            f"limits.max_seq_len={seq_len} exceeds the {graph_len} positions the graph "
            f"{onnx_path} was built for (its rotary tables)"
        )
    spec = get_backend(backend)
    trt = import_backend(backend)
    strongly_typed_flag = spec.strongly_typed_flag and options["strongly_typed"]
    weak_precision_flag = _weak_typing_flag(trt, backend, precision) if not options["strongly_typed"] else None

    start = time.perf_counter()
    parsed = parse_onnx(trt, onnx_path, cache_len=seq_len, strongly_typed_flag=strongly_typed_flag)
    from llmbuild.engine.collectives import collectives_for

    parallel = collectives_for(parsed, onnx_path)  # tensor parallelism: ALL_REDUCE at marked points
    described = describe_network(parsed.network)
    aliases = cache_aliases(described, num_layers)
    cache = next(t for t in described if t["name"] == io.past_key(0))
    kv_heads, head_dim = cache["shape"][1], cache["shape"][3]
    profiles = profiles_from_limits(limits, num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim)
    _check_network(described, precision, set(profiles[0]))

    config = parsed.builder.create_builder_config()
    for profile in profiles:
        trt_profile = parsed.builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            trt_profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(trt_profile) < 0:
            raise BuildError(f"TensorRT rejected optimization profile {profile}: {parsed.errors}")
    recorded_targets = spec.set_targets(trt, config, options["compute_capabilities"], options["hardware_compatibility"])
    applied = apply_builder_options(trt, config, options)
    if weak_precision_flag is not None:
        config.set_flag(weak_precision_flag)
        applied["strongly_typed"] = False
    monitor = make_progress_monitor(trt, progress)
    config.progress_monitor = monitor

    serialized = parsed.builder.build_serialized_network(parsed.network, config)
    if monitor.error is not None:
        raise monitor.error
    if serialized is None:
        raise BuildError(
            f"{backend} could not build an engine from {onnx_path}:\n  "
            + "\n  ".join(parsed.errors or ["(no error was logged)"])
        )
    digest, size = _write_atomically(serialized, engine_path)
    del serialized
    seconds = time.perf_counter() - start

    io_entries = []
    for t in described:
        entry = dict(t)
        if t["mode"] == "input":
            entry["profile_shapes"] = [[list(s) for s in p[t["name"]]] for p in profiles]
        io_entries.append(entry)
    return {
        "backend": backend,
        "trt_module": trt.__name__,
        "trt_version": trt.__version__,
        "file": engine_path.name,
        "sha256": digest,
        "bytes": size,
        "build_seconds": round(seconds, 3),
        "precision": precision,
        "label": target_label(backend, options),
        "profile_names": list(PROFILE_NAMES),
        "profiles": [{name: [list(s) for s in shapes] for name, shapes in p.items()} for p in profiles],
        "io": io_entries,
        "aliases": aliases,
        "targets": recorded_targets,
        "builder_options": applied,
        "weight_streaming": {
            "enabled": bool(options["weight_streaming"]),
            "budget_mib": options["weight_streaming_budget_mib"],
        },
        "decomposed_attention": parsed.decomposed_attention,
        **parallel,
    }


def _resolve_options(backend: str, targets: list[str] | None, options: dict | None) -> dict:
    """Every engine option with its default filled in; UserError listing every setting
    `backend` does not support (the recipe schema reports the same, with positions)."""
    given = dict(options or {})
    if targets is not None:
        given["compute_capabilities"] = list(targets)
    problems = option_problems(backend, given)
    if problems:
        raise UserError(f"engine backend {backend}: " + "; ".join(problems))
    resolved = {**OPTION_DEFAULTS, **given}
    if resolved["compute_capabilities"] is not None:
        from llmbuild.engine.options import CURRENT, normalize_compute_capabilities

        resolved["compute_capabilities"] = normalize_compute_capabilities(resolved["compute_capabilities"])
        if resolved["compute_capabilities"] == [CURRENT]:
            from llmbuild.engine.compat import current_compute_capability

            if current_compute_capability() is None:
                raise UserError(
                    "compute capability 'current' means the GPU of the build machine, and this machine "
                    "has none (no CUDA device, nvidia-smi not found); name the targets instead, e.g. "
                    "compute_capabilities: [sm86, sm89], or leave them out for the portable default"
                )
    return resolved


def _weak_typing_flag(trt: ModuleType, backend: str, precision: str):
    """The builder flag that lets a weakly typed network (strongly_typed: false) run in
    the engine precision; TensorRT 11 has no weak typing."""
    name = {"float16": "FP16", "bfloat16": "BF16"}[precision]
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise UserError(
            f"strongly_typed: false is not available with {trt.__name__} {trt.__version__}: its "
            "networks are always strongly typed"
        )
    return flag


def _write_atomically(data, path: Path) -> tuple[str, int]:
    """Write to a temporary sibling, then rename: never a half-written engine at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    view = memoryview(data)
    try:
        with open(tmp, "wb") as f:
            f.write(view)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return hashlib.sha256(view).hexdigest(), view.nbytes
