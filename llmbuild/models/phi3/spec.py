"""Phi3ForCausalLM (Phi-3/3.5-mini, Phi-4-mini): the Llama decoder with fused source tensors,
LongRoPE and partial rotary.

Fused tensors, split at source read. HF stores `self_attn.qkv_proj` [q_width + 2 kv_width,
hidden] (rows: q, then k, then v) and `mlp.gate_up_proj` [2 intermediate, hidden] (gate, then
up; HF's `chunk(2)`); llama.cpp (`phi3`) keeps them fused as `attn_qkv` / `ffn_up`. The
source is read through `llmbuild.source.split.SplitSource`, which serves each fused tensor
as the row blocks named here (`self_attn.q_proj` ... `mlp.up_proj`), so everything after
the source sees Llama's seven linears:
- tensor parallelism: a fused qkv weight cut into tp contiguous row blocks would give rank 0
  all of q and none of v; split, q/k/v are each cut in whole heads and gate/up each in
  intermediate blocks by the ordinary hints (no segment-aware sharder needed);
- AWQ/GPTQ: the scale groups are Llama's (input_layernorm -> q, k, v; post_attention_layernorm
  -> gate, up; up -> down). Quantization groups run along input features, so splitting rows
  changes no group, and gate and up stay separate for the down_input group, whose scale
  folds into up's output columns only (fused, that fold would also scale gate's);
- the CPU lowering fuses q/k/v and gate/up again (one MatMul + Split; packed qkv into
  GroupQueryAttention), so the split costs nothing at run time.

Rotary: `partial_rotary_factor` (Phi-4-mini 0.75: 96 of 128 dims) rotates the first
rotary_dim dims of each head (ONNX RotaryEmbedding's `rotary_embedding_dim`); LongRoPE
(`rope_scaling.type` `longrope`/`su`) in llmbuild.models.rope (which factor at which position).

Refused: `sliding_window` smaller than max_position_embeddings (Phi-3-mini-4k's 2047: HF
masks to the window, this graph attends to everything); Phi-3.5/Phi-4-mini set a window
larger than their context, which never cuts.
"""

from __future__ import annotations

from llmbuild.models.llama.spec import LlamaSpec


class Phi3Spec(LlamaSpec):
    hf_class = "Phi3ForCausalLM"
    gguf_architectures = ("phi3",)

    # fused HF module -> the row blocks (module, named size) it is read as, in order
    fused_tensors = {
        "self_attn.qkv_proj": (("self_attn.q_proj", "q_width"), ("self_attn.k_proj", "kv_width"),
                               ("self_attn.v_proj", "kv_width")),
        "mlp.gate_up_proj": (("mlp.gate_proj", "intermediate"), ("mlp.up_proj", "intermediate")),
    }
    gguf_layer_names = {**LlamaSpec.gguf_layer_names, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
    gguf_permuted_roles = {}
    gguf_derived = (*LlamaSpec.gguf_derived, "rope_factors_long.weight", "rope_factors_short.weight")

    def check_config(self, config: dict) -> list[str]:
        problems = super().check_config(config)
        window, positions = config.get("sliding_window"), config.get("max_position_embeddings")
        if window is not None and (not isinstance(positions, int) or window < positions):
            problems.append(f"sliding_window={window} (< max_position_embeddings={positions}) is not supported; "
                            "only Phi-3 models whose window is null or covers the whole context can be built")
        return problems
