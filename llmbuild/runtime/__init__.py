"""Runtimes: load an artifact and generate text (ONNX Runtime on CPU, TensorRT on GPU)."""

from llmbuild.runtime.generator import Generation, Request, TokenLogprob
from llmbuild.runtime.model import LoadedModel, load
from llmbuild.runtime.sampling import SamplingParams

__all__ = ["Generation", "LoadedModel", "Request", "SamplingParams", "TokenLogprob", "load"]
