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
