"""Engine stage: the ONNX decoder graph → a serialized TensorRT engine + its manifest entry.

    from llmbuild.engine import build_engine
    entry = build_engine(onnx_path, engine_path, backend="tensorrt-rtx", precision="float16",
                         limits={...}, num_layers=30)

The TensorRT module (`tensorrt_rtx` or `tensorrt`) is imported only when a build runs.
"""

from llmbuild.engine.backends import BACKENDS, Backend, import_backend
from llmbuild.engine.build import build_engine, describe_network, parse_onnx, profiles_from_limits

__all__ = ["BACKENDS", "Backend", "build_engine", "describe_network", "import_backend", "parse_onnx", "profiles_from_limits"]
