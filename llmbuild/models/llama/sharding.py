"""Tensor-parallel sharding hints of the Llama decoder (Megatron-style).

Attention: q/k/v split on output features by whole heads (column parallel), o_proj on
input features (row parallel, all-reduce after it). MLP: gate/up column parallel,
down_proj row parallel. Embeddings, norms and lm_head are replicated. Applied by
`llmbuild.parallel`; the graph code in model.py knows nothing of it.
"""

from __future__ import annotations

from llmbuild.parallel.hints import Shard

# HF weight name (after "model.layers.<i>.") -> hint. Anything else is replicated.
WEIGHTS = {
    "self_attn.q_proj.weight": Shard(dim=0, count="heads", block="head_dim"),
    "self_attn.k_proj.weight": Shard(dim=0, count="kv_heads", block="head_dim", replicate=True),
    "self_attn.v_proj.weight": Shard(dim=0, count="kv_heads", block="head_dim", replicate=True),
    "self_attn.o_proj.weight": Shard(dim=1, count="heads", block="head_dim"),
    "mlp.gate_proj.weight": Shard(dim=0, count="intermediate"),
    "mlp.up_proj.weight": Shard(dim=0, count="intermediate"),
    "mlp.down_proj.weight": Shard(dim=1, count="intermediate"),
}

# Named sizes used by the hints -> the HF config key a rank's config overrides.
CONFIG_KEYS = {
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
    "head_dim": "head_dim",
}


def sizes(config: dict) -> dict[str, int]:
    """The named sizes, read from the HF config as `LlamaDims.from_config` reads them
    (repeated here so that checking a tp needs no numpy/onnx import)."""
    heads = int(config["num_attention_heads"])
    return {
        "heads": heads,
        "kv_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        "intermediate": int(config["intermediate_size"]),
    }
