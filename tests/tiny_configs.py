"""Tiny random-model configs per registered architecture, for the family tests and the
conformance suite: `TINY_CONFIGS[hf_class]` is a list of HF config kwargs (several shapes
each: GQA/MQA, tied/untied, head_dim ≠ hidden/heads, windows smaller than the prompt,
soft-caps that change the logits). Build one with `tests.tiny.make_tiny_from_config`.

Sizes keep head_dim a multiple of 16 (the CPU lowering's GroupQueryAttention needs it)
and vocab 256 (the tiny character tokenizer of tests/tiny.py). `initializer_range` is
large enough that attention logits reach the soft-caps and greedy generation does not
collapse into one repeated token.
"""

_COMMON = dict(vocab_size=256, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=None)

TINY_CONFIGS: dict[str, list[dict]] = {
    # Mistral with a sliding window much shorter than prompt + 64 new tokens.
    "MistralForCausalLM": [
        dict(_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, sliding_window=8, tie_word_embeddings=False, initializer_range=0.2),
        dict(_COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, sliding_window=5, tie_word_embeddings=True,
             initializer_range=0.2),  # MQA, D ≠ H/heads
    ],
    "Gemma2ForCausalLM": [
        dict(_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, sliding_window=6, attn_logit_softcapping=0.5,
             final_logit_softcapping=1.0, query_pre_attn_scalar=24, tie_word_embeddings=True,
             initializer_range=0.05),  # tied: a larger init lets the ×√hidden embedding repeat the last token
        dict(_COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, head_dim=32, sliding_window=4, attn_logit_softcapping=3.0,
             final_logit_softcapping=2.0, query_pre_attn_scalar=32, tie_word_embeddings=False,
             initializer_range=0.2),  # MQA, untied, D ≠ H/heads
    ],
    "Gemma3ForCausalLM": [
        dict(_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
             layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
             tie_word_embeddings=True, initializer_range=0.05),
        dict(_COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, sliding_window=5, query_pre_attn_scalar=32,
             layer_types=["full_attention", "sliding_attention"],
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                              "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
             tie_word_embeddings=False, initializer_range=0.2),  # MQA, untied, D ≠ H/heads
    ],
}


# Families whose tests build tiny models with `tests.tiny.make_tiny_hf` (its keyword
# arguments, without `arch`): `make_tiny_hf(dst, hf_class, **TINY_SHAPES[hf_class][i])`.
TINY_SHAPES: dict[str, list[dict]] = {
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
