"""Qwen2MoeForCausalLM (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) with
routed experts in `mlp` (width `moe_intermediate_size`; top-k probabilities renormalised
only when `norm_topk_prob`, default false) plus a shared expert every token runs
(width `shared_expert_intermediate_size`), scaled by sigmoid(x · shared_expert_gate).
Layers in `mlp_only_layers`, and those with (i + 1) % decoder_sparse_step != 0, keep
the dense MLP of width `intermediate_size`."""

from __future__ import annotations

from llmbuild.models.moe import Experts, RoutedExpertsSpec
from llmbuild.models.qwen2.spec import Qwen2Spec


class Qwen2MoeSpec(RoutedExpertsSpec, Qwen2Spec):
    hf_class = "Qwen2MoeForCausalLM"
    gguf_architectures = ("qwen2moe",)
    gguf_normalize_top_k = False  # llama.cpp's qwen2moe graph does not renormalise
    experts = Experts(module="mlp", gate="gate_proj", up="up_proj", down="down_proj",
                      experts_keys=("num_experts", "num_local_experts"),
                      intermediate_key="moe_intermediate_size", normalize="norm_topk_prob")
    shared_expert = True

    def check_config(self, config: dict) -> list[str]:
        problems = super().check_config(config)
        if config.get("qkv_bias") is False:
            problems.append("qkv_bias=false is not supported for Qwen2MoeForCausalLM (its graph has q/k/v biases)")
        return problems
