"""TensorRT flavours that can build an engine, keyed by the recipe's backend name.

Both flavours share one Python API (`Builder`, `OnnxParser`, `IBuilderConfig`, ...);
only the module name and a few small behaviours differ. The build flow is written
once against that API and receives the imported module; the differences live here,
as fields and small functions of a `Backend`:

    tensorrt-rtx   module tensorrt_rtx   builds ahead of time on a CPU; the engine's
                                         target compute capabilities are chosen at build
                                         time (SM75 .. SM121, no datacenter SM90/SM100)
    tensorrt       module tensorrt       builds on (and for) the GPU it runs on; covers
                                         H100/H200/B200; hardware_compatibility widens it

Which recipe settings each backend takes is decided in `options.py` (no TensorRT import);
`apply_builder_options` applies the shared ones (optimization level, workspace limit,
tiling, weight streaming) to an IBuilderConfig of either module.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from llmbuild.engine import options as options_mod
from llmbuild.errors import UserError


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # importable Python module
    pip: str  # what to install when the module is missing
    min_version: tuple[int, ...]
    # The network needs NetworkDefinitionCreationFlag.STRONGLY_TYPED. TensorRT-RTX (like
    # TensorRT 11) is always strongly typed and ignores the deprecated flag; TensorRT 10.x
    # needs it, or it builds a weakly typed fp32 network.
    strongly_typed_flag: bool
    # Applies the requested targets to an IBuilderConfig and returns what to record.
    set_targets: Callable[..., dict]  # (trt, config, targets, hardware_compatibility) -> record
    # Distributions whose version is the module's `__version__` (installed_version reads
    # it without importing the module); the first one installed counts.
    dists: tuple[str, ...] = ()


# -- compute-capability targets ------------------------------------------------------

# What TensorRT-RTX builds for when no compute capability is set (num_compute_capabilities
# stays 0): one portable engine for Ampere and later ("8.0, 8.6, 8.9, 12.0, and later",
# TensorRT-RTX docs, CPU-only AOT engines). Turing (sm75) must be asked for explicitly.
RTX_DEFAULT_TARGETS = list(options_mod.RTX_DEFAULT_TARGETS)


def _rtx_set_targets(trt: ModuleType, config, targets: list[str] | None, hardware_compatibility=None) -> dict:
    """Compute capabilities the engine is compiled for, via IBuilderConfig (TensorRT-RTX).

    targets=None keeps TensorRT-RTX's default portable set. "current" (the GPU of this
    machine) is accepted but needs a GPU at build time.
    """
    if hardware_compatibility not in (None, "none"):
        raise UserError(
            options_mod.backend_option_problem("tensorrt-rtx", "hardware_compatibility", hardware_compatibility)
        )
    if targets is None:
        return {"compute_capabilities": list(RTX_DEFAULT_TARGETS), "source": "tensorrt-rtx default (portable)",
                "hardware_compatibility": None}
    choices = {name.lower(): member for name, member in trt.ComputeCapability.__members__.items() if name != "NONE"}
    wanted = options_mod.normalize_compute_capabilities(list(targets))
    unknown = [t for t in wanted if t not in choices]
    if unknown or not wanted:
        raise UserError(
            f"engine targets {targets!r}: unknown or empty; valid compute capabilities for "
            f"tensorrt-rtx {trt.__version__}: {', '.join(sorted(choices))}"
        )
    if "current" in wanted and len(wanted) > 1:
        raise UserError("engine target 'current' cannot be combined with other targets")
    config.num_compute_capabilities = len(wanted)
    for index, target in enumerate(wanted):
        if not config.set_compute_capability(choices[target], index):
            raise UserError(f"tensorrt-rtx rejected engine target {target!r}")
    recorded = [config.get_compute_capability(i).name.lower() for i in range(config.num_compute_capabilities)]
    if recorded == ["current"]:
        from llmbuild.engine.compat import current_compute_capability

        recorded = [current_compute_capability() or "current"]
    # hardware_compatibility: not a TensorRT-RTX setting ("setHardwareCompatibilityLevel()
    # is unsupported in TensorRT-RTX"); its engines run on the compute capabilities above.
    return {"compute_capabilities": recorded, "source": "requested", "hardware_compatibility": None}


def _gpu_set_targets(trt: ModuleType, config, targets: list[str] | None, hardware_compatibility=None) -> dict:
    """TensorRT compiles for the GPU it builds on; `hardware_compatibility` widens that
    to other GPUs (ampere+: every Ampere or later GPU, same-compute-capability)."""
    if targets is not None:
        raise UserError(options_mod.backend_option_problem("tensorrt", "compute_capabilities", list(targets)))
    level = hardware_compatibility or "none"
    if level not in options_mod.HARDWARE_COMPATIBILITY:
        raise UserError(
            f"hardware_compatibility {level!r}: choose one of {', '.join(options_mod.HARDWARE_COMPATIBILITY)}"
        )
    member = options_mod.HARDWARE_COMPATIBILITY[level]
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, member)
    from llmbuild.engine.compat import current_compute_capability

    build_gpu = current_compute_capability()
    return {"compute_capabilities": [build_gpu or "current"], "source": "build GPU", "hardware_compatibility": level}


def apply_builder_options(trt: ModuleType, config, options: dict) -> dict:
    """Builder settings of an engine entry (options.py) applied to an IBuilderConfig;
    returns the settings as recorded in the manifest (only what was set)."""
    applied = {}
    if options.get("optimization_level") is not None:
        config.builder_optimization_level = int(options["optimization_level"])
        applied["optimization_level"] = config.builder_optimization_level
    if options.get("workspace_limit_mib") is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options["workspace_limit_mib"]) << 20)
        applied["workspace_limit_mib"] = int(options["workspace_limit_mib"])
    if options.get("tiling_optimization_level") is not None:
        level = options_mod.TILING_LEVELS[options["tiling_optimization_level"]]
        config.tiling_optimization_level = getattr(trt.TilingOptimizationLevel, level)
        applied["tiling_optimization_level"] = options["tiling_optimization_level"]
    if options.get("l2_limit_for_tiling_kib") is not None:
        config.l2_limit_for_tiling = int(options["l2_limit_for_tiling_kib"]) << 10
        applied["l2_limit_for_tiling_kib"] = int(options["l2_limit_for_tiling_kib"])
    if options.get("weight_streaming"):
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
        applied["weight_streaming"] = True
    return applied


BACKENDS: dict[str, Backend] = {
    "tensorrt-rtx": Backend(
        name="tensorrt-rtx",
        module="tensorrt_rtx",
        pip="tensorrt-rtx-cu13",
        min_version=(1, 7),
        strongly_typed_flag=False,
        set_targets=_rtx_set_targets,
        dists=("tensorrt-rtx-cu13", "tensorrt-rtx-cu12", "tensorrt-rtx"),
    ),
    "tensorrt": Backend(
        name="tensorrt",
        module="tensorrt",
        pip="tensorrt (TensorRT >= 10.15, from NVIDIA's index)",
        min_version=(10, 15),
        strongly_typed_flag=True,
        set_targets=_gpu_set_targets,
    ),
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"unknown engine backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def import_backend(name: str) -> ModuleType:
    """Import the backend's TensorRT module, or say which package to install."""
    backend = get_backend(name)
    try:
        trt = importlib.import_module(backend.module)
    except ImportError as e:
        raise UserError(
            f"engine backend {name!r} needs the Python module {backend.module!r}, which is not "
            f"importable ({e}); install it with: pip install {backend.pip}"
        ) from None
    found = _version_tuple(getattr(trt, "__version__", "0"))
    if found < backend.min_version:
        need = ".".join(map(str, backend.min_version))
        raise UserError(
            f"engine backend {name!r} needs {backend.module} >= {need}, found {trt.__version__}; "
            f"install: pip install {backend.pip}"
        )
    return trt


def installed_version(name: str) -> tuple[str, str]:
    """(module name, version) of a backend's TensorRT package, as import_backend would
    find them (and the same UserError when it is missing or too old), read from the
    distribution's metadata when one of `Backend.dists` is installed: importing TensorRT
    loads its libraries (half a second), which a compile that reuses its engines does not
    need. Without such a distribution, the module is imported."""
    import importlib.util
    from importlib import metadata

    backend = get_backend(name)
    if importlib.util.find_spec(backend.module) is None:
        import_backend(name)  # raises the UserError that names the package
    for dist in backend.dists:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if _version_tuple(version) < backend.min_version:
            import_backend(name)  # raises the UserError "needs >= ..."
        return backend.module, version
    trt = import_backend(name)
    return trt.__name__, trt.__version__


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])
