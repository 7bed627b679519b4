"""Config values a decoder graph can be built from: positive integer sizes that divide
as the attention needs, finite positive floats. Checked when a source is opened and,
as recipe errors at `model.source`, by `validate` (which reads the config then).

A negative `rope_theta` compiles into NaN rotary tables and a negative `rms_norm_eps`
into a norm ONNX Runtime's fused kernel refuses at load: both are refused here, before
any work. Imports nothing heavy.
"""

from __future__ import annotations

import math
import numbers

POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings")
POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps")
# Bounds that no real model reaches and that keep a lying config from asking for
# terabytes before the first tensor is read.
MAX_SIZE = 1 << 22  # hidden, intermediate, vocab, head_dim, positions
MAX_LAYERS = 4096


def config_problems(cfg: dict) -> list[str]:
    """Every problem with the config's sizes and constants, as `key: message` strings."""
    problems: list[str] = []
    ints: dict[str, int] = {}
    for key in POSITIVE_INTS:
        if key not in cfg or (cfg[key] is None and key in ("head_dim", "max_position_embeddings")):
            if key not in ("head_dim", "max_position_embeddings", "num_key_value_heads"):
                problems.append(f"{key}: missing from the model config")
            continue
        value = cfg[key]
        high = MAX_LAYERS if key == "num_hidden_layers" else MAX_SIZE
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= high:
            problems.append(f"{key}: expected an integer in [1, {high}], found {value!r}")
        else:
            ints[key] = int(value)
    for key in POSITIVE_FLOATS:
        value = cfg.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                or value <= 0):
            problems.append(f"{key}: expected a finite number > 0, found {value!r}")
    heads, kv = ints.get("num_attention_heads"), ints.get("num_key_value_heads")
    if heads and kv and heads % kv:
        problems.append(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    hidden, head_dim = ints.get("hidden_size"), ints.get("head_dim")
    if heads and hidden and "head_dim" not in ints and hidden % heads:
        problems.append(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})"
                        " when the config gives no head_dim")
    if head_dim and head_dim % 2:
        problems.append(f"head_dim ({head_dim}) must be even (rotary embedding rotates pairs)")
    return problems
