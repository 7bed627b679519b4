"""Token sampling, specified exactly so that the C++ runtime draws the same tokens.

Given float32 logits over the vocabulary and parameters (temperature, top_k, top_p):

1. temperature == 0: greedy, the index of the first maximum.
2. x = float64(logits) / temperature.
3. Candidates sorted by x descending, ties by ascending token id (a stable sort).
4. top_k > 0: keep the first top_k candidates.
5. p = softmax(x) over the kept candidates, in float64 (x - max, exp, divide by sum).
6. top_p < 1: keep the shortest prefix whose cumulative probability is >= top_p
   (at least one candidate) and renormalise.
7. u = next uniform double of the request's RNG; the token is the first candidate whose
   cumulative probability exceeds u (the last one if rounding leaves none).

RNG: SplitMix64 seeded with the request's 64-bit seed; each sampled token consumes one
draw, `uniform = (next_u64 >> 11) * 2**-53`. Greedy steps consume no draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed: int):
        self.state = seed & _MASK

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def uniform(self) -> float:
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def candidate_probabilities(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) of the candidates left after temperature/top-k/top-p."""
    x = logits.astype(np.float64) / params.temperature
    order = np.argsort(-x, kind="stable")
    if 0 < params.top_k < order.size:
        order = order[: params.top_k]
    kept = x[order]
    p = np.exp(kept - kept[0])
    p /= p.sum()
    if params.top_p < 1.0:
        cum = np.cumsum(p)
        n = int(np.searchsorted(cum, params.top_p, side="left")) + 1
        order, p = order[:n], p[:n] / p[:n].sum()
    return order, p


def sample(logits: np.ndarray, params: SamplingParams, rng: SplitMix64 | None) -> int:
    if params.greedy:
        return int(np.argmax(logits))
    ids, p = candidate_probabilities(logits, params)
    u = rng.uniform()
    index = int(np.searchsorted(np.cumsum(p), u, side="right"))
    return int(ids[min(index, ids.size - 1)])
