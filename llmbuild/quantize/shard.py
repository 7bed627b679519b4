"""A tensor-parallel rank's part of a quantized weight: codes, scales and offsets of
the whole weight sliced along the weight's shard dimension (llmbuild.parallel hints), in
whole quantization groups.

Weights are in graph layout [in, out]: a column-parallel hint (HF dim 0, out features)
slices columns — every scheme's scales are per output column or per tensor, so any
column range is exact; a row-parallel hint (HF dim 1, in features) slices rows — int4's
groups run along the rows, so the rank's row range must start and end on a group
boundary (the end may be the last, short group).

    whole q [in, out], s [G, out] ──rows a..b (a, b multiples of g)──► q[a:b], s[a/g : ⌈b/g⌉]
                                  └─columns c..d──────────────────────► q[:, c:d], s[:, c:d]
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from llmbuild.errors import UserError


def _graph_axis(hint) -> int:
    """Graph-layout axis ([in, out]) of a hint's HF dim ([out, in])."""
    return 1 - hint.dim


def shard_graph_array(array: np.ndarray, plan, name: str, rank: int) -> np.ndarray:
    """Rank `rank`'s part of a float weight in graph layout (replicated: unchanged)."""
    hint = plan.hint(name)
    if hint is None or array.ndim != 2:
        return array
    a, b = plan.rank_range(hint, rank)
    index = [slice(None), slice(None)]
    index[_graph_axis(hint)] = slice(a, b)
    return np.ascontiguousarray(array[tuple(index)])


def shard_quantized(qt, plan, name: str, rank: int):
    """Rank `rank`'s part of QuantizedTensor `qt` of weight `name` (None passes through)."""
    hint = plan.hint(name) if qt is not None else None
    if hint is None:
        return qt
    a, b = plan.rank_range(hint, rank)
    if _graph_axis(hint) == 1:  # columns: per-column (or per-tensor) scales follow the columns
        per_column = qt.scale.ndim >= 1 and qt.scale.shape[-1] == qt.data.shape[1]
        return replace(
            qt, data=np.ascontiguousarray(qt.data[:, a:b]),
            scale=np.ascontiguousarray(qt.scale[..., a:b]) if per_column else qt.scale,
            offset=None if qt.offset is None else np.ascontiguousarray(qt.offset[..., a:b]),
            # int4 `scale_bits: 8`: the steps are per column too (per row block they do not change)
            scale_step=None if qt.scale_step is None else np.ascontiguousarray(qt.scale_step[a:b]),
            offset_step=None if qt.offset_step is None else np.ascontiguousarray(qt.offset_step[a:b]))
    rows = qt.data.shape[0]
    block = qt.block_size
    if not block:  # per-channel / per-tensor scales do not depend on the rows
        return replace(qt, data=np.ascontiguousarray(qt.data[a:b]))
    if a % block or (b % block and b != rows):
        raise UserError(
            f"{name}: tensor-parallel rank {rank} holds input rows {a}..{b} of {rows}, which do not start and end on "
            f"whole {qt.scheme} groups of {block}; choose a group_size that divides {b - a}")
    g0, g1 = a // block, -(-b // block)
    return replace(
        qt, data=np.ascontiguousarray(qt.data[a:b]), scale=np.ascontiguousarray(qt.scale[g0:g1]),
        offset=None if qt.offset is None else np.ascontiguousarray(qt.offset[g0:g1]))
