"""MixtralForCausalLM: Mistral's decoder (sliding window when the config sets one) with
every layer's MLP replaced by routed experts (`block_sparse_moe`): 8 SwiGLU experts
(`w1` gate, `w3` up, `w2` down), top-2, the two probabilities renormalised to sum 1
(HF's MixtralTopKRouter: softmax, top-k, divide by their sum). No shared expert."""

from __future__ import annotations

from llmbuild.models.mistral.spec import MistralSpec
from llmbuild.models.moe import Experts, RoutedExpertsSpec


class MixtralSpec(RoutedExpertsSpec, MistralSpec):
    hf_class = "MixtralForCausalLM"
    gguf_architectures = ()  # llama.cpp writes Mixtral as `llama` + `llama.expert_count` (config_from_gguf)
    experts = Experts(module="block_sparse_moe", gate="w1", up="w3", down="w2", experts_keys=("num_local_experts",),
                      intermediate_key="intermediate_size", normalize=True)

    @property
    def gguf_layer_names(self) -> dict[str, str]:
        """llama.cpp names the router `ffn_gate_inp` (what it loads); the converter vendored in
        llama-cpp-python 0.3.16 writes Mixtral's `block_sparse_moe.gate` as `ffn_gate` (its
        tensor map lists that HF name under both), which a Mixtral file cannot mean otherwise
        (it has no dense MLP): both read as the router, `ffn_gate_inp` first."""
        names = {"ffn_gate_inp": self.experts.router, **super().gguf_layer_names}
        names["ffn_gate"] = self.experts.router
        return names
