"""Sharding hints on weights, and the one piece of arithmetic that applies them.

A model declares, next to its graph code (`models/<arch>/sharding.py`), a table
`HF weight name suffix -> Shard(...)`; weights not in the table are replicated. A hint
names the dimension to split in the HF layout [out_features, in_features] and the
whole blocks it is made of, so that heads are never cut in half:

    q_proj [Hq*D, H]   Shard(dim=0, count="heads", block="head_dim")      column parallel
    o_proj [H, Hq*D]   Shard(dim=1, count="heads", block="head_dim")      row parallel
                        └─ partial sums: its MatMul's output is an all-reduce point

Rank r of tp gets blocks [r*n/tp, (r+1)*n/tp) of the n blocks. With `replicate=True`
(the KV heads) a count smaller than tp is allowed when tp is a multiple of it: each
block is then copied to tp/n consecutive ranks (rank r holds block r*n//tp), which
is where the query heads of rank r look for their keys and values under GQA.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Split weight dimension `dim` (HF layout: 0 = out features, 1 = in features)
    into tp parts made of whole blocks: `count` blocks of `block` rows each (both
    named sizes of the architecture; block None = single rows)."""

    dim: int
    count: str
    block: str | None = None
    replicate: bool = False  # count < tp allowed if tp % count == 0 (blocks copied)

    @property
    def row_parallel(self) -> bool:
        """Split on input features: each rank computes a partial sum of the output."""
        return self.dim == 1


def blocks_of_rank(n: int, tp: int, rank: int, *, replicate: bool) -> tuple[int, int]:
    """[first, end) block indices that `rank` holds when n blocks are split tp ways."""
    if n % tp == 0:
        per = n // tp
        return rank * per, (rank + 1) * per
    if replicate and n < tp and tp % n == 0:
        block = rank * n // tp
        return block, block + 1
    raise ValueError(f"{n} blocks cannot be split over {tp} ranks")


def count_problem(name: str, n: int, tp: int, replicate: bool) -> str | None:
    """Why `n` blocks named `name` cannot be split tp ways, or None if they can."""
    if n % tp == 0:
        return None
    if replicate and n < tp and tp % n == 0:
        return None
    if replicate:
        return (f"tp={tp} must divide {name}={n}, or be a multiple of it"
                f" (then each KV head is replicated on tp/{name} ranks)")
    return f"tp={tp} does not divide {name}={n}"


def replication_note(name: str, n: int, tp: int) -> str | None:
    """A sentence explaining block replication when tp > n, else None."""
    if n < tp and tp % n == 0:
        return (f"{name}={n} < tp={tp}: each rank holds 1 of them, every one replicated on "
                f"{tp // n} ranks (KV cache per rank: 1 head)")
    return None
