"""LlamaForCausalLM: GQA/MHA/MQA, tied or untied embeddings, default/linear/llama3 rope."""

from __future__ import annotations

from llmbuild.models.spec import (COLUMN_HEADS, COLUMN_KV_HEADS, COLUMN_MLP, ROW_HEADS, ROW_MLP, ArchitectureSpec,
                                  Linear, ScaleGroup)


class LlamaSpec(ArchitectureSpec):
    hf_class = "LlamaForCausalLM"
    graph_module = "llmbuild.models.llama.model"
    gguf_architectures = ("llama",)

    linears = (
        Linear("q", "self_attn.q_proj", "hidden", "q_width", COLUMN_HEADS),
        Linear("k", "self_attn.k_proj", "hidden", "kv_width", COLUMN_KV_HEADS),
        Linear("v", "self_attn.v_proj", "hidden", "kv_width", COLUMN_KV_HEADS),
        Linear("o", "self_attn.o_proj", "q_width", "hidden", ROW_HEADS),
        Linear("gate", "mlp.gate_proj", "hidden", "intermediate", COLUMN_MLP),
        Linear("up", "mlp.up_proj", "hidden", "intermediate", COLUMN_MLP),
        Linear("down", "mlp.down_proj", "intermediate", "hidden", ROW_MLP),
    )
    # AutoAWQ's get_layers_for_scaling for Llama (o_proj's input comes from attention:
    # nothing to fold a scale into, so it has no group).
    scale_groups = (
        ScaleGroup("attention_input", "norm", "input_layernorm", ("q", "k", "v")),
        ScaleGroup("mlp_input", "norm", "post_attention_layernorm", ("gate", "up")),
        ScaleGroup("down_input", "linear", "up", ("down",)),
    )
    gguf_layer_names = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }
    gguf_global_names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    gguf_permuted_roles = {"q": "heads", "k": "kv_heads"}

    def check_config(self, config: dict) -> list[str]:
        problems = super().check_config(config)
        if config.get("attention_bias") and not self.linear("q").bias:
            problems.append(f"attention_bias=true is not supported for {self.hf_class} yet")
        if config.get("mlp_bias"):
            problems.append(f"mlp_bias=true is not supported for {self.hf_class} yet")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            problems.append(f"hidden_act={act!r} is not supported (expected 'silu')")
        return problems
