"""Will this engine load here? Checked before TensorRT deserializes it.

    check_engine_compatible(trt, entry, engine_path, runtime=runtime)

compares the manifest's engine entry with the machine: the TensorRT flavour and version
that built it (engines only load with the same release) and the GPU's compute
capability against the engine's targets; where the backend has a header check
(TensorRT-RTX `Runtime.get_engine_validity`), its verdict and diagnostics are used as
well. The runtime thus refuses a mismatched engine with a message that says what to
rebuild, instead of failing inside TensorRT. `apply_weight_streaming` sets the weight
budget of an engine built with weight streaming.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

from llmbuild.engine.options import NOT_RTX, RTX_COMPUTE_CAPABILITIES
from llmbuild.errors import UserError

log = logging.getLogger(__name__)

MIB = 1 << 20


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", str(version))[:3])


def sm_name(major: int, minor: int) -> str:
    return f"sm{major}{minor}"


def sm_tuple(name: str) -> tuple[int, int] | None:
    """`sm86` -> (8, 6), `sm120` -> (12, 0); None for anything else (`current`)."""
    m = re.fullmatch(r"sm(\d+)(\d)", name.lower())
    return (int(m.group(1)), int(m.group(2))) if m else None


def current_compute_capability() -> str | None:
    """The first GPU's compute capability (`sm86`), or None without a GPU."""
    try:
        from cuda.bindings import runtime as cudart

        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            return sm_name(props.major, props.minor)
    except Exception:  # noqa: BLE001 - no cuda-python or no driver: try nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or "." not in out[0]:
        return None
    major, minor = out[0].split(".", 1)
    return sm_name(int(major), int(minor))


def runs_on(entry: dict, device_cc: str) -> tuple[bool, str]:
    """Whether an engine entry's targets include a GPU of compute capability `device_cc`,
    and a description of what the engine targets."""
    targets = entry.get("targets") or {}
    ccs = [c.lower() for c in targets.get("compute_capabilities") or []]
    device = sm_tuple(device_cc)
    if entry.get("backend") == "tensorrt-rtx":
        if targets.get("source", "").startswith("tensorrt-rtx default"):
            # The portable engine: 8.0, 8.6, 8.9, 12.0 "and later" RTX-class GPUs.
            ok = device is not None and device >= (8, 0) and device_cc not in NOT_RTX
            return ok, "a portable TensorRT-RTX engine (sm80, sm86, sm89, sm120 and later RTX GPUs)"
        return device_cc in ccs, ", ".join(ccs)
    level = targets.get("hardware_compatibility") or "none"
    if level == "ampere+":
        return device is not None and device >= (8, 0), "Ampere or later GPUs (hardware_compatibility ampere+)"
    built = [c for c in ccs if sm_tuple(c)]
    if not built:  # build GPU unknown: nothing to compare
        return True, "the build GPU"
    return device_cc in built, f"{', '.join(built)} (the build GPU; hardware_compatibility {level})"


def compatibility_problems(entry: dict, *, trt_module: str, trt_version: str, device_cc: str | None) -> list[str]:
    """What stops `entry`'s engine from loading with this TensorRT and GPU (pure)."""
    problems = []
    built_module, built_version = entry.get("trt_module"), entry.get("trt_version")
    if built_module and built_module != trt_module:
        problems.append(f"it was built with {built_module}, but this runtime uses {trt_module}")
    elif built_version and version_tuple(built_version) != version_tuple(trt_version):
        problems.append(
            f"it was built with {built_module or trt_module} {built_version}, but this machine has "
            f"{trt_version}; engines only load with the TensorRT release that built them"
        )
    if device_cc is not None:
        ok, what = runs_on(entry, device_cc)
        if not ok:
            major_minor = sm_tuple(device_cc)
            cc = f"{major_minor[0]}.{major_minor[1]}" if major_minor else "?"
            hint = ""
            if entry.get("backend") == "tensorrt-rtx" and device_cc in RTX_COMPUTE_CAPABILITIES:
                hint = f"; rebuild with compute_capabilities: [{device_cc}]"
            elif entry.get("backend") == "tensorrt-rtx":
                hint = "; TensorRT-RTX does not run on this GPU: build with backend: tensorrt"
            problems.append(f"this GPU is {device_cc} (compute capability {cc}), the engine targets {what}{hint}")
    return problems


def _validity_problems(trt: ModuleType, runtime, header: bytes) -> list[str]:
    """TensorRT-RTX's own header check (`Runtime.get_engine_validity`), where it exists."""
    if runtime is None or not hasattr(runtime, "get_engine_validity"):
        return []
    validity, diagnostics = runtime.get_engine_validity(header)
    if validity == trt.EngineValidity.VALID:
        return []
    flags = [name.lower().replace("_", " ") for name, member in trt.EngineInvalidityDiagnostics.__members__.items()
             if int(diagnostics) & int(member)]
    if validity == trt.EngineValidity.SUBOPTIMAL:
        log.warning("%s reports this engine as suboptimal on this GPU: %s", trt.__name__, ", ".join(flags) or "-")
        return []
    reason = ", ".join(flags) if flags else "no diagnostics (is there an NVIDIA GPU and driver?)"
    return [f"{trt.__name__} {trt.__version__} reports the engine invalid on this machine: {reason}"]


def check_engine_compatible(
    trt: ModuleType, entry: dict, engine_path: Path, *, runtime=None, device_cc: str | None = None
) -> None:
    """Raise a UserError saying why `entry`'s engine cannot load here, before TensorRT tries.

    device_cc defaults to this machine's first GPU; `runtime` (a trt.Runtime) enables the
    backend's header check where it has one.
    """
    device_cc = device_cc or current_compute_capability()
    problems = compatibility_problems(entry, trt_module=trt.__name__, trt_version=trt.__version__, device_cc=device_cc)
    if not problems and runtime is not None and hasattr(runtime, "get_engine_validity"):
        size = int(getattr(runtime, "engine_header_size", 0) or 0)
        with open(engine_path, "rb") as f:
            header = f.read(size) if size > 0 else f.read()
        problems += _validity_problems(trt, runtime, header)
    if problems:
        raise UserError(
            f"engine {entry.get('file', engine_path)} cannot run here: " + "; ".join(problems)
            + ". Rebuild the artifact on/for this machine (llmbuild compile)"
        )


def weight_streaming_budget(entry: dict) -> int | None:
    """Bytes of streamable weights to keep on the GPU: the recipe's budget, or None for
    TensorRT's automatic budget. None also when the engine does not stream weights."""
    ws = entry.get("weight_streaming") or {}
    if not ws.get("enabled"):
        return None
    mib = ws.get("budget_mib")
    return int(mib) * MIB if mib is not None else None


def apply_weight_streaming(engine, entry: dict) -> int | None:
    """Set `engine.weight_streaming_budget_v2` for an engine built with weight streaming;
    returns the budget in bytes (None when the engine keeps all weights on the GPU)."""
    ws = entry.get("weight_streaming") or {}
    if not ws.get("enabled"):
        return None
    budget = weight_streaming_budget(entry)
    if budget is None:
        budget = int(engine.get_weight_streaming_automatic_budget())
    budget = min(budget, int(engine.streamable_weights_size))
    engine.weight_streaming_budget_v2 = budget
    return budget
