"""Qwen3MoeForCausalLM (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head q/k
RMSNorms, explicit head_dim) with routed experts in `mlp` (width `moe_intermediate_size`,
top-k probabilities renormalised when `norm_topk_prob`; the published models set it),
no shared expert; `mlp_only_layers` / `decoder_sparse_step` as Qwen2-MoE."""

from __future__ import annotations

from llmbuild.models.moe import Experts, RoutedExpertsSpec
from llmbuild.models.qwen3.spec import Qwen3Spec


class Qwen3MoeSpec(RoutedExpertsSpec, Qwen3Spec):
    hf_class = "Qwen3MoeForCausalLM"
    gguf_architectures = ("qwen3moe",)
    gguf_normalize_top_k = True  # llama.cpp's qwen3moe graph renormalises (transformers' GGUF default too)
    experts = Experts(module="mlp", gate="gate_proj", up="up_proj", down="down_proj",
                      experts_keys=("num_experts", "num_local_experts"),
                      intermediate_key="moe_intermediate_size", normalize="norm_topk_prob")
