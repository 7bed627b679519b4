"""Non-finite logits are a failure, never a pass: NaN compares false with every
threshold (`nan > 0.5` is False), so a graph whose logits are all NaN would otherwise
"pass" with max |Δlogit| 0.0. Verification and the accuracy gate check here first."""

from __future__ import annotations

import numpy as np


def first_non_finite(logits: np.ndarray) -> tuple[int, int] | None:
    """(position, vocabulary index) of the first non-finite value of [positions, vocab]
    logits, or None when all are finite."""
    bad = ~np.isfinite(np.asarray(logits))
    if not bad.any():
        return None
    bad = bad.reshape(-1, bad.shape[-1])
    row = int(np.flatnonzero(bad.any(-1))[0])
    return row, int(np.flatnonzero(bad[row])[0])


def non_finite_message(where: str, logits: np.ndarray, hit: tuple[int, int]) -> str:
    flat = np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1])
    count = int((~np.isfinite(flat)).any(-1).sum())
    value = flat[hit]
    return (f"non-finite logits ({value}) from {where}: first at position {hit[0]} (vocabulary index {hit[1]}), "
            f"{count} of {flat.shape[0]} positions affected; check the model config (rope_theta, rms_norm_eps) "
            "and the weights for NaN/inf")
