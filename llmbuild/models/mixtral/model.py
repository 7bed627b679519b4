"""The mixture-of-experts decoder (Mixtral, Qwen2-MoE, Qwen3-MoE): the Llama decoder
(models/llama/model.py: attention as the family's spec says) whose sparse layers'
feed-forward is routed experts (llmbuild/graph/moe.py), plus the shared expert when
the model has one; dense layers (`mlp_only_layers`, `decoder_sparse_step`) keep
Llama's MLP.

    h2 [B,S,H] ─┬─► routed_experts (router ─► top-k ─► the k picked experts) ───────┐
                └─► shared expert: down(silu(gate(h2))·up(h2)) · sigmoid(h2 · g) ─(+)─► y
                                                                        (Qwen2-MoE)
"""

from __future__ import annotations

from llmbuild.graph import blocks, moe
from llmbuild.graph.builder import GraphBuilder
from llmbuild.models.llama import model as llama


def build(gb: GraphBuilder, spec, config: dict, source, max_seq_len: int) -> None:
    d = spec.dims(config)

    def mlp(gb, linear, h2, layer):
        if layer not in d.sparse_layers:
            return llama.dense_mlp(gb, linear, h2, layer)
        p = spec.layer_prefix(layer)
        per = spec.expert_weights(d, layer)
        weights = moe.ExpertWeights(
            router=f"{p}{spec.experts.router}.weight", gate=per["gate"], up=per["up"], down=per["down"],
            stacked={proj: f"{p}{spec.experts.stacked(proj)}.weight" for proj in per})
        y = moe.routed_experts(gb, source, h2, weights, hidden=d.hidden, intermediate=d.moe_intermediate,
                               top_k=d.top_k, normalize=d.normalize, layer=layer)  # [B, S, H]
        groups = {}
        if d.shared_intermediate:
            act = blocks.silu_gate(gb, linear(h2, layer, "shared_gate"), linear(h2, layer, "shared_up"))
            shared = moe.shared_expert_gate(gb, source, h2, linear(act, layer, "shared_down"),
                                            f"{p}{spec.shared_gate}.weight", hidden=d.hidden)
            y = gb.op("Add", [y, shared])
            groups["shared_down_input"] = act
        return y, groups

    llama.build(gb, spec, config, source, max_seq_len, mlp=mlp, scale_groups=lambda i: spec.layer_scale_groups(d, i))
