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
        dict(num_heads=2, num_kv_heads=2, hidden=64, tie=False, seed=33, rope_theta=1000000.0),  # MHA
    ],
}
