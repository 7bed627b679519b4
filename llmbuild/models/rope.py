"""Rotary position embedding tables (cos/sin caches) for the supported rope types.

Computed in float64 at build time, following HF transformers' `ROPE_INIT_FUNCTIONS`.
"""

from __future__ import annotations

import math

import numpy as np

from llmbuild.errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")  # "su": longrope's older name


def inv_frequencies(config: dict, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim/2] after the config's rope scaling."""
    base = float(config.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)
    raise UserError(
        f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def cos_sin_tables(config: dict, head_dim: int, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_positions, head_dim/2] in float64 (`head_dim`: the rotated dims,
    less than a head's under partial rotary)."""
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) in ("longrope", "su"):
        return longrope_tables(config, head_dim, max_positions)
    inv_freq = inv_frequencies(config, head_dim)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    return np.cos(angles), np.sin(angles)


def longrope_tables(config: dict, dim: int, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """LongRoPE (Phi-3/3.5/4-mini): inverse frequencies divided per dimension by
    `short_factor` or `long_factor`, cos/sin scaled by the attention factor
    (sqrt(1 + ln(factor) / ln(original)), factor = max_position_embeddings / original).

    Which factor: HF's rotary recomputes the frequencies per forward pass from its largest
    position (long once max(position_ids) + 1 > original_max_position_embeddings, else
    short); cached keys keep the factor they were computed with. One table indexed by
    position (what both ONNX RotaryEmbedding and ONNX Runtime's GroupQueryAttention cos/sin
    caches express) holds one factor per row, so row p uses the factor HF uses for a pass
    whose last position is p: short for p < original, long from there on. That is HF's
    model exactly for every pass that stays below `original` and for every token decoded
    one per pass after it (HF's cached decoding; tested). It differs from HF in two cases:
    a single pass that crosses `original` (a prompt longer than it) gets short factors for
    its rows below it where HF uses long for the whole pass; and HF's `generate` for Phi-3
    drops its cache once a sequence crosses `original` and recomputes all positions with
    the long factors (re-prefilling then, with a per-sequence choice of table, is not
    implemented). An artifact whose max_seq_len <= original (e.g. Phi-3.5-mini built for
    4k) is HF exactly: it uses short factors only.
    """
    scaling = config.get("rope_scaling") or {}
    base = float(config.get("rope_theta", 10000.0))
    original = scaling.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    if not original:
        raise UserError("longrope rope scaling needs original_max_position_embeddings")
    original = int(original)
    factors = {}
    for key in ("short_factor", "long_factor"):
        values = scaling.get(key)
        if not isinstance(values, list) or len(values) != dim // 2:
            raise UserError(f"longrope rope scaling: {key} must list {dim // 2} numbers (rotary dims / 2), "
                            f"found {values if not isinstance(values, list) else f'{len(values)} values'}")
        factors[key] = np.asarray(values, dtype=np.float64)
    factor = scaling.get("factor") or float(config.get("max_position_embeddings") or original) / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    exponent = np.arange(0, dim, 2, dtype=np.float64) / dim
    positions = np.arange(max_positions, dtype=np.float64)[:, None]
    short = positions * (1.0 / (factors["short_factor"] * base**exponent))
    long = positions * (1.0 / (factors["long_factor"] * base**exponent))
    angles = np.where(positions < original, short, long)
    return np.cos(angles) * attention, np.sin(angles) * attention
