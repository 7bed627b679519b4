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

Python-only extensions (not in the C++ runtime; each is a no-op at its default, so
the steps above are unchanged when they are off):

0. Penalties, applied to the float32 logits before step 1 (so greedy sees them too):
   repetition_penalty r != 1 (HF/CTRL style) over every token id in the prompt and the
   output so far: a logit l becomes l / r if l > 0 else l * r; then, over the output
   tokens only, presence_penalty (subtracted once per distinct token) and
   frequency_penalty (subtracted once per occurrence), as in the OpenAI API.
6b. min_p > 0: after step 6, keep the candidates whose probability is >= min_p times
   the top candidate's probability, and renormalise.

Log-probabilities reported to the caller (`logprobs`) are those of the model's own
distribution, log_softmax(float64(logits)), before penalties and truncation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from llmbuild.runtime.requests import SAMPLING_FIELDS, RequestError, check_sampling

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
    # Python-only extensions (see the module docstring); defaults are no-ops.
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        # Every field type- and range-checked by the shared request layer (RequestError:
        # a UserError and a ValueError naming the field, its range and the value).
        for name, value in check_sampling({k: getattr(self, k) for k in SAMPLING_FIELDS}).items():
            object.__setattr__(self, name, value)  # plain int/float (numpy scalars, bools refused)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def sampling_params(**values):
    """A SamplingParams from keyword fields, every one checked."""
    return SamplingParams(**check_sampling(values))


def check_params(params: Any):
    """A SamplingParams (re-checked: a frozen dataclass can still be forged)."""
    if not isinstance(params, SamplingParams):
        raise RequestError("params", "a SamplingParams", params)
    check_sampling({k: getattr(params, k) for k in SAMPLING_FIELDS})
    return params


def apply_penalties(
    logits: np.ndarray, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> np.ndarray:
    """Step 0: the penalised copy of `logits` (the input itself when no penalty is set)."""
    if not params.penalized:
        return logits
    logits = np.array(logits, dtype=np.float32, copy=True)
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.fromiter((*prompt_ids, *output_ids), np.int64))
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0):
        ids, counts = np.unique(np.asarray(output_ids, np.int64), return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts
    return logits


def candidate_probabilities(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) of the candidates left after temperature/top-k/top-p/min-p."""
    x = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < x.size:
        # Same candidates and order as a full stable sort, without sorting the whole
        # vocabulary: everything > the k-th value, then ties at it by ascending id.
        kth = np.partition(x, x.size - params.top_k)[x.size - params.top_k]
        above = np.flatnonzero(x > kth)
        ties = np.flatnonzero(x == kth)[: params.top_k - above.size]
        pool = np.concatenate([above, ties])
        order = pool[np.argsort(-x[pool], kind="stable")]
    else:
        fast = _nucleus(x, params) if params.top_p < 1.0 else None
        if fast is not None:
            return fast
        order = np.argsort(-x, kind="stable")
    kept = x[order]
    p = np.exp(kept - kept[0])
    p /= p.sum()
    if params.top_p < 1.0:
        cum = np.cumsum(p)
        n = int(np.searchsorted(cum, params.top_p, side="left")) + 1
        order, p = order[:n], p[:n] / p[:n].sum()
    if params.min_p > 0.0:
        n = int(np.count_nonzero(p >= params.min_p * p[0]))
        order, p = order[:n], p[:n] / p[:n].sum()
    return order, p


def _nucleus(x: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps 3-6b for top_k = 0, top_p < 1 without sorting the whole vocabulary: the
    same candidates in the same order (ties by ascending id), found by sorting ever
    larger top groups (64, 512, ...) until their cumulative probability reaches top_p.
    The softmax denominator is summed over the whole vocabulary in id order rather
    than in sorted order, which changes probabilities only in the last bits. None when
    the nucleus is too large for this to pay (then the caller sorts everything)."""
    e = np.exp(x - x.max())
    total = e.sum()
    size = 64
    while size < x.size:
        kth = np.partition(x, x.size - size)[x.size - size]
        pool = np.flatnonzero(x >= kth)  # every tie of the boundary value is in
        order = pool[np.lexsort((pool, -x[pool]))]
        cum = np.cumsum(e[order]) / total
        if cum[-1] >= params.top_p:
            n = int(np.searchsorted(cum, params.top_p, side="left")) + 1
            order = order[:n]
            p = e[order] / total
            p /= p.sum()
            if params.min_p > 0.0:
                n = int(np.count_nonzero(p >= params.min_p * p[0]))
                order, p = order[:n], p[:n] / p[:n].sum()
            return order, p
        size *= 8
    return None


def sample(logits: np.ndarray, params: SamplingParams, rng: SplitMix64 | None) -> int:
    if params.greedy:
        return int(np.argmax(logits))
    ids, p = candidate_probabilities(logits, params)
    u = rng.uniform()
    index = int(np.searchsorted(np.cumsum(p), u, side="right"))
    return int(ids[min(index, ids.size - 1)])


def logprobs_of(logits: np.ndarray, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under log_softmax(float64(logits)), and the `top` most likely
    (id, logprob) pairs, most likely first (ties by ascending id)."""
    x = logits.astype(np.float64)
    m = x.max()
    log_z = m + np.log(np.exp(x - m).sum())
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        top = min(top, x.size)
        pool = np.argpartition(-x, top - 1)[:top]
        pool = pool[np.lexsort((pool, -x[pool]))]
        alternatives = [(int(i), float(x[i] - log_z)) for i in pool]
    return float(x[token] - log_z), alternatives
