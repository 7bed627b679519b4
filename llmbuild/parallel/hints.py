"""Sharding hints on weights, and the one piece of arithmetic that applies them.

A model's spec (`models/<arch>/spec.py`) puts a `Shard(...)` on each of its linears
(`ArchitectureSpec.shard_hints`); weights without one are replicated. A hint
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

import math
from dataclasses import dataclass

from llmbuild.errors import UserError
from llmbuild.models.spec import LAYER_PREFIX, Shard

__all__ = ["Shard", "ShardPlan", "blocks_of_rank", "count_problem", "replication_note", "tp_problems"]


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
        return f"tp={tp} neither divides {name}={n} nor is a multiple of it (KV heads would be replicated)"
    return f"tp={tp} does not divide {name}={n}"


def replication_note(name: str, n: int, tp: int) -> str | None:
    """A sentence explaining block replication when tp > n, else None."""
    if n < tp and tp % n == 0:
        return (f"{name}={n} < tp={tp}: each rank holds 1 of them, every one replicated on "
                f"{tp // n} ranks (KV cache per rank: 1 head)")
    return None


@dataclass(frozen=True)
class ShardPlan:
    """How one model splits over tp ranks: its hints and named sizes."""

    tp: int
    hints: dict[str, Shard]
    sizes: dict[str, int]
    config_keys: dict[str, str]

    @classmethod
    def for_config(cls, config: dict, tp: int) -> "ShardPlan":
        from llmbuild.models import spec_for

        spec = spec_for(config, check=False)
        return cls(tp=tp, hints=spec.shard_hints(config), sizes=spec.dims(config).sizes(), config_keys=dict(spec.config_keys))

    # -- checks ----------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every reason this tp cannot shard the model, naming the numbers."""
        if self.tp < 1:
            return [f"tp must be >= 1, found {self.tp}"]
        found: dict[str, str] = {}
        for hint in self.hints.values():
            problem = count_problem(self.config_keys.get(hint.count, hint.count), self.sizes[hint.count], self.tp,
                                    hint.replicate)
            if problem:
                found.setdefault(hint.count, problem)
        return list(found.values())

    def notes(self) -> list[str]:
        """Explanations of what is replicated (e.g. KV heads when tp > kv_heads)."""
        notes = []
        for count in dict.fromkeys(h.count for h in self.hints.values() if h.replicate):
            note = replication_note(self.config_keys.get(count, count), self.sizes[count], self.tp)
            if note:
                notes.append(note)
        return notes

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise UserError(f"parallel.tp={self.tp} cannot shard this model: " + "; ".join(problems))

    # -- per weight -----------------------------------------------------------------------
    def hint(self, name: str) -> Shard | None:
        if name.startswith(LAYER_PREFIX):
            parts = name.split(".", 3)
            if len(parts) == 4 and parts[2].isdigit():
                return self.hints.get(parts[3])
        return self.hints.get(name)

    def blocks(self, hint: Shard, rank: int) -> tuple[int, int]:
        return blocks_of_rank(self.sizes[hint.count], self.tp, rank, replicate=hint.replicate)

    def rank_range(self, hint: Shard, rank: int) -> tuple[int, int]:
        """[start, stop) along the hint's dim, in rows/columns of the HF tensor."""
        unit = self.sizes[hint.block] if hint.block else 1
        first, end = self.blocks(hint, rank)
        return first * unit, end * unit

    def rank_shape(self, name: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        hint = self.hint(name)
        if hint is None:
            return tuple(shape)
        start, stop = self.rank_range(hint, rank)
        out = list(shape)
        out[hint.dim] = stop - start
        return tuple(out)

    # -- per rank ---------------------------------------------------------------------------
    def rank_sizes(self) -> dict[str, int]:
        """Named sizes as each rank sees them (e.g. heads 9 -> 3 at tp=3)."""
        out = dict(self.sizes)
        for hint in self.hints.values():
            first, end = blocks_of_rank(self.sizes[hint.count], self.tp, 0, replicate=hint.replicate)
            out[hint.count] = end - first
        return out

    def rank_config(self, config: dict) -> dict:
        """The HF config of one rank's decoder: per-rank counts, block sizes pinned."""
        rank = dict(config)
        per_rank = self.rank_sizes()
        for hint in self.hints.values():
            rank[self.config_keys[hint.count]] = per_rank[hint.count]
            if hint.block:
                rank[self.config_keys[hint.block]] = self.sizes[hint.block]
        return rank

    def weight_bytes(self, shapes: dict[str, tuple[int, ...]], itemsize: int) -> dict:
        """Weight bytes of each rank: its share of the sharded weights plus the replicated ones."""
        sharded = replicated = 0
        per_rank = [0] * self.tp
        for name, shape in shapes.items():
            full = math.prod(shape) * itemsize
            if self.hint(name) is None:
                replicated += full
                per_rank = [b + full for b in per_rank]
                continue
            sharded += full
            for r in range(self.tp):
                per_rank[r] += math.prod(self.rank_shape(name, shape, r)) * itemsize
        return {"sharded": sharded, "replicated": replicated, "per_rank": per_rank}


def tp_problems(config: dict, tp: int) -> tuple[list[str], list[str]]:
    """(problems, notes) of splitting the model of `config` over `tp` ranks; a problem
    names the numbers and the tp values that would work."""
    plan = ShardPlan.for_config(config, tp)
    problems = plan.problems()
    if problems:
        heads = plan.sizes.get("heads", 64)
        valid = [t for t in range(1, heads + 1) if not ShardPlan(t, plan.hints, plan.sizes, plan.config_keys).problems()]
        problems = [f"{p}; tp values that fit this model: {', '.join(map(str, valid))}" for p in problems]
    return problems, plan.notes()
