"""Engine stage: the ONNX decoder graph → a serialized TensorRT engine + its manifest entry.

    from llmbuild.engine import build_engine
    entry = build_engine(onnx_path, engine_path, backend="tensorrt-rtx", precision="float16",
                         limits={...}, num_layers=30, options={"compute_capabilities": ["sm89"]})

Modules: backends (the two TensorRT flavours), options (what each backend supports,
checked without TensorRT), profiles (prefill/decode optimization profiles and
`select_profile`), build (parse → configure → build), cache (content-addressed engine
cache), compat (will an engine load on this machine?). The TensorRT module
(`tensorrt_rtx` or `tensorrt`) is imported only when a build or a check runs.
"""

from llmbuild.engine.backends import BACKENDS, Backend, import_backend
from llmbuild.engine.build import build_engine, describe_network, parse_onnx, profiles_from_limits
from llmbuild.engine.compat import apply_weight_streaming, check_engine_compatible
from llmbuild.engine.profiles import PROFILE_NAMES, select_profile

__all__ = [
    "BACKENDS",
    "PROFILE_NAMES",
    "Backend",
    "apply_weight_streaming",
    "build_engine",
    "check_engine_compatible",
    "describe_network",
    "import_backend",
    "parse_onnx",
    "profiles_from_limits",
    "select_profile",
]
