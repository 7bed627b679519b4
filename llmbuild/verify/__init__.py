"""Numerical verification of an artifact's ONNX graph (ONNX Runtime, CPU) against
HF transformers (torch, CPU) on the same token sequences."""

from llmbuild.verify.compare import DEFAULT_PROMPTS, Thresholds, default_thresholds, verify_artifact

__all__ = ["DEFAULT_PROMPTS", "Thresholds", "default_thresholds", "verify_artifact"]
