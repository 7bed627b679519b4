"""Qwen3ForCausalLM: Qwen2's decoder without the q/k/v biases, with a per-head RMSNorm of q
and k (weights [head_dim], `self_attn.q_norm` / `k_norm`) before rotary, and an explicit
`head_dim` that need not be hidden / heads (Qwen3-0.6B: 1024 / 16 heads, head_dim 128).

The head norms are not AWQ scale-group sources: they normalise q/k after the projections,
so no linear reads their output (the groups are Llama's: input_layernorm -> q/k/v,
post_attention_layernorm -> gate/up, up -> down). Tensor parallelism replicates them
(one weight shared by every head). llama.cpp (`qwen3`): `blk.<i>.attn_{q,k}_norm`, q/k
rows unpermuted. `attention_bias: true` is refused (no published Qwen3 sets it).
"""

from __future__ import annotations

from llmbuild.models.llama.spec import LlamaSpec
from llmbuild.models.qwen2.spec import Qwen2Spec


class Qwen3Spec(Qwen2Spec):
    hf_class = "Qwen3ForCausalLM"
    gguf_architectures = ("qwen3",)
    linears = LlamaSpec.linears
    head_norms = ("self_attn.q_norm", "self_attn.k_norm")
