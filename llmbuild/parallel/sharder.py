"""The generic sharder: a rank's view of a model source, driven by the model's hints.

    ModelSource (lazy, HF names)
        │
        ▼
    RankSource(source, plan, rank)
        config  the model config with this rank's head / KV-head / MLP counts, so the
                architecture's plain graph code builds the rank's (smaller) decoder
        info()  per-rank shapes
        load()  source.load(name) ──► slice of whole blocks per hint ──► contiguous copy
                (the full tensor is dropped at once: one tensor in flight, never the model)

Nothing is read until the rank graph is saved, one weight at a time; ranks are
written one after another, so peak memory is about one rank's in-flight window plus
the largest single tensor, not N copies of the model.
"""

from __future__ import annotations

import numpy as np

from llmbuild.parallel.hints import ShardPlan


class RankSource:
    """Rank `rank`'s view of `source`: the rank's config, shapes and weight slices."""

    def __init__(self, source, plan: ShardPlan, rank: int):
        if not 0 <= rank < plan.tp:
            raise ValueError(f"rank {rank} out of range for tp={plan.tp}")
        self.source, self.plan, self.rank = source, plan, rank
        self.config = plan.rank_config(source.config)
        self.path = source.path

    def names(self) -> list[str]:
        return self.source.names()

    def info(self, name: str):
        info = self.source.info(name)
        return type(info)(self.plan.rank_shape(name, tuple(info.shape), self.rank), info.dtype)

    def load(self, name: str) -> np.ndarray:
        return rank_tensor(self.plan, name, self.source.load(name), self.rank)

    def __contains__(self, name: str) -> bool:
        return name in self.source


def rank_tensor(plan: ShardPlan, name: str, array: np.ndarray, rank: int) -> np.ndarray:
    """Rank `rank`'s part of the full HF tensor `array` (a contiguous copy)."""
    hint = plan.hint(name)
    if hint is None:
        return array
    start, stop = plan.rank_range(hint, rank)
    index = [slice(None)] * array.ndim
    index[hint.dim] = slice(start, stop)
    return np.ascontiguousarray(array[tuple(index)])
