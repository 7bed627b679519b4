"""Runtimes: load an artifact and generate text (ONNX Runtime on CPU, TensorRT on GPU)."""

from llmbuild.runtime.model import LoadedModel, load

__all__ = ["LoadedModel", "load"]
