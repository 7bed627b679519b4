"""Tiny random-model shapes per registered architecture, for the family and conformance tests.

`TINY_CONFIGS[hf_class]` is a list of `tests.tiny.make_tiny_hf` keyword arguments (without
`arch`): `make_tiny_hf(dst, hf_class, **TINY_CONFIGS[hf_class][i])`. Each list covers the
family's variations (GQA/MQA, tied/untied, head_dim != hidden/heads where it has one).
"""

from __future__ import annotations

TINY_CONFIGS: dict[str, list[dict]] = {
    "Qwen2ForCausalLM": [
        dict(num_heads=4, num_kv_heads=2, hidden=64, tie=True, seed=21),  # GQA, tied (Qwen2.5-0.5B..3B)
        dict(num_heads=4, num_kv_heads=1, hidden=64, tie=False, seed=22),  # MQA, untied (7B and up)
        dict(num_heads=2, num_kv_heads=2, hidden=64, tie=False, seed=23, rope_theta=1000000.0),  # MHA, Qwen's base
    ],
    "Qwen3ForCausalLM": [
        # head_dim 32 with hidden 64 / 4 heads (q is 128 wide), as Qwen3-0.6B's 128 with 1024 / 16
        dict(num_heads=4, num_kv_heads=2, hidden=64, head_dim=32, tie=True, seed=31),
        dict(num_heads=4, num_kv_heads=1, hidden=64, head_dim=16, tie=False, seed=32),  # MQA, untied
        # MHA, head_dim 128 (what transformers assumes for a Qwen3 GGUF, so its GGUF loading can be compared)
        dict(num_heads=2, num_kv_heads=2, hidden=64, head_dim=128, tie=False, seed=33, rope_theta=1000000.0),
    ],
    "Phi3ForCausalLM": [
        # Phi-3.5-mini-like: LongRoPE (short factors below position 64, long from 64 on), GQA,
        # untied, with partial rotary 0.5 (16 of 32 dims)
        dict(num_heads=4, num_kv_heads=2, hidden=128, tie=False, seed=41, max_pos=256,
             rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                           "long_factor": [2.0 + 0.5 * i for i in range(8)], "original_max_position_embeddings": 64},
             extra_config={"partial_rotary_factor": 0.5, "original_max_position_embeddings": 64}),
        # Phi-4-mini-like: partial rotary 0.75 (48 of 64 dims, as its 96 of 128), MQA, tied
        dict(num_heads=4, num_kv_heads=1, hidden=256, tie=True, seed=42, extra_config={"partial_rotary_factor": 0.75}),
        # Phi-3-mini-like: full rotary, default rope, MHA, untied
        dict(num_heads=4, num_kv_heads=4, hidden=64, tie=False, seed=43),
    ],
}
