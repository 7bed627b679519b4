"""Numerical verification of an artifact's ONNX graph (ONNX Runtime, CPU) against
HF transformers (torch, CPU) on the same token sequences."""

from llmbuild.verify.compare import DEFAULT_PROMPTS, Thresholds, default_thresholds, verify_artifact, verify_what_runs

__all__ = ["DEFAULT_PROMPTS", "Thresholds", "default_thresholds", "verify_artifact", "verify_what_runs"]
