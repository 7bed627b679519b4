"""What each backend can be asked for, checked without importing TensorRT.

The recipe schema calls these checks so that a setting a backend does not support is a
recipe problem (with its file:line:column) before any work starts; `build_engine`
calls them again for callers that bypass the recipe. One message per mismatch, the
same in both places.

    tensorrt-rtx   compute_capabilities (sm75 .. sm121, or current), optimization_level,
                   workspace_limit_mib, weight_streaming
    tensorrt       hardware_compatibility, optimization_level, workspace_limit_mib,
                   tiling_optimization_level, l2_limit_for_tiling_kib, strongly_typed,
                   weight_streaming

Checked with TensorRT-RTX 1.7.1 on this machine: the optimization level changes the
ahead-of-time build (level 0 disables GEMM fusions and tries one tactic), a workspace
limit can make a build fail, WEIGHT_STREAMING builds; tiling settings leave no trace in
the build log, so they are offered for `tensorrt` only.
"""

from __future__ import annotations

import difflib

# Compute capabilities TensorRT-RTX compiles for (its ComputeCapability enum, 1.7).
RTX_COMPUTE_CAPABILITIES = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
CURRENT = "current"
# What TensorRT-RTX builds for when no compute capability is set: one portable engine
# for Ampere and later ("8.0, 8.6, 8.9, 12.0, and later"); Turing must be asked for.
RTX_DEFAULT_TARGETS = ("sm80", "sm86", "sm89", "sm120")
# GPUs TensorRT-RTX does not target, and what they are, for the error message.
NOT_RTX = {
    "sm70": "Volta, V100",
    "sm72": "Xavier",
    "sm87": "Jetson Orin",
    "sm90": "Hopper, H100/H200",
    "sm100": "Blackwell datacenter, B200/GB200",
    "sm101": "Jetson Thor",
    "sm103": "Blackwell Ultra, B300",
    "sm110": "Jetson Thor",
}
# recipe value -> TensorRT HardwareCompatibilityLevel member
HARDWARE_COMPATIBILITY = {
    "none": "NONE",
    "ampere+": "AMPERE_PLUS",
    "same-compute-capability": "SAME_COMPUTE_CAPABILITY",
}
# recipe value -> TensorRT TilingOptimizationLevel member
TILING_LEVELS = {"none": "NONE", "fast": "FAST", "moderate": "MODERATE", "full": "FULL"}

# Options only one backend has: option -> (that backend, why the other has none).
BACKEND_ONLY = {
    "compute_capabilities": (
        "tensorrt-rtx",
        "the tensorrt backend builds for the GPU of the build machine; use "
        "hardware_compatibility: ampere+ for an engine that also runs on other Ampere or later GPUs",
    ),
    "hardware_compatibility": (
        "tensorrt",
        "TensorRT-RTX engines run on the compute capabilities they are built for "
        "(compute_capabilities; default: one portable engine for sm80, sm86, sm89, sm120 and later)",
    ),
    "tiling_optimization_level": (
        "tensorrt",
        "TensorRT-RTX's ahead-of-time build does not use tiling settings",
    ),
    "l2_limit_for_tiling_kib": (
        "tensorrt",
        "TensorRT-RTX's ahead-of-time build does not use tiling settings",
    ),
}

# Engine-entry keys with their defaults (the recipe schema has the same fields).
DEFAULTS = {
    "compute_capabilities": None,
    "hardware_compatibility": None,
    "optimization_level": None,
    "workspace_limit_mib": None,
    "tiling_optimization_level": None,
    "l2_limit_for_tiling_kib": None,
    "strongly_typed": True,
    "weight_streaming": False,
    "weight_streaming_budget_mib": None,
}


def backend_option_problem(backend: str, key: str, value) -> str | None:
    """Why `key: value` is not a setting of `backend`, or None if it is."""
    if value is None or value == DEFAULTS.get(key):
        return None
    if key in BACKEND_ONLY:
        owner, why = BACKEND_ONLY[key]
        if backend != owner:
            return f"{key} is a {owner} setting, not available for backend {backend}: {why}"
    if key == "strongly_typed" and value is False and backend == "tensorrt-rtx":
        return (
            "strongly_typed: false is not available for backend tensorrt-rtx: TensorRT-RTX "
            "networks are always strongly typed (the graph's dtypes are the engine's)"
        )
    return None


def compute_capability_problem(value: str, others: list[str]) -> str | None:
    """Why `value` (lower-cased) is not a TensorRT-RTX target, or None."""
    if value == CURRENT:
        if len(others) > 1:
            return "compute capability 'current' (the build machine's GPU) cannot be combined with others"
        return None
    if value in RTX_COMPUTE_CAPABILITIES:
        return None
    valid = ", ".join(RTX_COMPUTE_CAPABILITIES)
    if value in NOT_RTX:
        return (
            f"{value} ({NOT_RTX[value]}) is not a TensorRT-RTX target; TensorRT-RTX builds for "
            f"{valid} (or current); for this GPU use backend: tensorrt"
        )
    close = difflib.get_close_matches(value, [*RTX_COMPUTE_CAPABILITIES, CURRENT], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown compute capability {value!r}; TensorRT-RTX builds for {valid} (or current){hint}"


# Engine precisions: TensorRT's fused attention needs 16-bit Q/K/V (see build.check_precision).
ENGINE_PRECISIONS = ("float16", "bfloat16")
# Targets without bfloat16 kernels (TensorRT-RTX support matrix: Turing has FP16 only).
NO_BFLOAT16 = {"sm75": "Turing"}


def precision_problem(precision: str) -> str | None:
    """Why no engine can be built at `precision`, or None."""
    if precision in ENGINE_PRECISIONS:
        return None
    return (
        f"engines need precision float16 or bfloat16, found {precision}: the fused attention kernels "
        "TensorRT uses need 16-bit Q/K/V; use `engines: []` for a CPU-only (ONNX Runtime) artifact"
    )


def precision_target_problem(precision: str, compute_capabilities: list[str] | None) -> tuple[int, str] | None:
    """(index, why) of the first target that cannot run `precision`, or None."""
    if precision != "bfloat16":
        return None
    for i, cc in enumerate(normalize_compute_capabilities(list(compute_capabilities or []))):
        if cc in NO_BFLOAT16:
            return i, (f"{cc} ({NO_BFLOAT16[cc]}) has no bfloat16 kernels in TensorRT-RTX; build {cc} "
                       "engines at precision float16")
    return None


def normalize_compute_capabilities(values: list[str]) -> list[str]:
    """`SM86` -> `sm86`, `8.6` -> `sm86` (the forms people write)."""
    out = []
    for v in values:
        v = v.strip().lower()
        if v.replace(".", "", 1).isdigit() and "." in v:
            major, minor = v.split(".")
            v = f"sm{major}{minor}"
        out.append(v)
    return out


def option_problems(backend: str, options: dict) -> list[str]:
    """Every problem with an engine entry's options for `backend` (for build_engine)."""
    problems = []
    for key, value in options.items():
        if key not in DEFAULTS:
            problems.append(f"unknown engine option {key!r}; valid: {', '.join(DEFAULTS)}")
            continue
        problem = backend_option_problem(backend, key, value)
        if problem:
            problems.append(problem)
    ccs = options.get("compute_capabilities")
    if ccs is not None and backend == "tensorrt-rtx":
        if not ccs:
            problems.append("compute_capabilities is empty; leave it out for the portable default")
        ccs = normalize_compute_capabilities(list(ccs))
        for i, cc in enumerate(ccs):
            problem = compute_capability_problem(cc, ccs)
            if problem is None and cc in ccs[:i]:
                problem = f"compute capability {cc} is listed twice"
            if problem:
                problems.append(problem)
    hwc = options.get("hardware_compatibility")
    if hwc is not None and hwc not in HARDWARE_COMPATIBILITY:
        problems.append(f"hardware_compatibility {hwc!r}: choose one of {', '.join(HARDWARE_COMPATIBILITY)}")
    tiling = options.get("tiling_optimization_level")
    if tiling is not None and tiling not in TILING_LEVELS:
        problems.append(f"tiling_optimization_level {tiling!r}: choose one of {', '.join(TILING_LEVELS)}")
    if options.get("weight_streaming_budget_mib") is not None and not options.get("weight_streaming"):
        problems.append("weight_streaming_budget_mib is set but weight_streaming is false")
    if options.get("weight_streaming") and options.get("strongly_typed") is False:
        problems.append("weight_streaming needs a strongly typed network (strongly_typed: true)")
    return problems


def target_label(backend: str, options: dict) -> str:
    """The engine's target in its file name: `portable`, `sm86-sm89`, `native`, `ampere-plus`."""
    if backend == "tensorrt-rtx":
        ccs = options.get("compute_capabilities")
        return "-".join(normalize_compute_capabilities(list(ccs))) if ccs else "portable"
    hwc = options.get("hardware_compatibility") or "none"
    return {"none": "native", "ampere+": "ampere-plus", "same-compute-capability": "same-cc"}[hwc]
