"""Batched generation over an executor: one prefill pass, then lockstep decode steps.

Prompts of one batch are right-padded to a common length for the prefill pass; the
graph's per-sequence write indices and causal alignment keep padding out of every
real token's attention (see `llmbuild.graph.io`), and each sequence's logits are taken
at its own last prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from llmbuild.errors import UserError
from llmbuild.runtime.executors.base import Executor, StepInputs
from llmbuild.runtime.sampling import SamplingParams, SplitMix64, sample


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "eos" | "length"


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_input_len: int
    max_seq_len: int


def check_request(prompt_ids: Sequence[int], max_new_tokens: int, limits: Limits) -> None:
    if not prompt_ids:
        raise UserError("empty prompt: at least one token is needed")
    if len(prompt_ids) > limits.max_input_len:
        raise UserError(
            f"prompt has {len(prompt_ids)} tokens; this artifact accepts at most "
            f"max_input_len={limits.max_input_len}"
        )
    if len(prompt_ids) + max_new_tokens > limits.max_seq_len:
        raise UserError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={limits.max_seq_len}"
        )


def generate_batch(
    executor: Executor,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_ids: Sequence[int],
    limits: Limits,
    on_token: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Generate for up to `limits.max_batch_size` prompts together.

    `on_token(sequence_index, token_id)` is called for every generated token as it is
    produced (streaming). Each sequence stops at EOS or after max_new_tokens.
    """
    if len(prompts) > limits.max_batch_size:
        raise UserError(f"{len(prompts)} prompts in one batch; max_batch_size is {limits.max_batch_size}")
    for p in prompts:
        check_request(p, max_new_tokens, limits)
    batch = len(prompts)
    if executor.batch_size != batch:
        executor.reset(batch)
    gens = [Generation(prompt_token_ids=list(p)) for p in prompts]
    rngs = [SplitMix64(params.seed) for _ in prompts]
    eos = set(eos_token_ids)
    lengths = np.array([len(p) for p in prompts], np.int64)

    # Prefill: right-padded, logits at each sequence's last prompt token.
    width = int(lengths.max())
    ids = np.zeros((batch, width), np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    positions = np.broadcast_to(np.arange(width, dtype=np.int64), (batch, width))
    logits = executor.forward(
        StepInputs(ids, np.ascontiguousarray(positions), np.zeros(batch, np.int64), (lengths - 1)[:, None])
    )

    active = np.ones(batch, bool)
    for step in range(max_new_tokens):
        next_ids = np.zeros(batch, np.int64)
        for b in range(batch):
            if not active[b]:
                continue
            token = sample(logits[b, 0], params, rngs[b])
            next_ids[b] = token
            if token in eos:
                gens[b].finish_reason = "eos"
                active[b] = False
                continue
            gens[b].token_ids.append(token)
            if on_token is not None:
                on_token(b, token)
            if len(gens[b].token_ids) >= max_new_tokens:
                gens[b].finish_reason = "length"
                active[b] = False
        if not active.any():
            break
        # Decode: one token per sequence at position `lengths`. Finished sequences keep
        # their slot; they rewrite one row past their end and their results are ignored.
        logits = executor.forward(
            StepInputs(next_ids[:, None], lengths[:, None].copy(), lengths.copy(), np.zeros((batch, 1), np.int64))
        )
        lengths = lengths + active
    for g in gens:
        g.finish_reason = g.finish_reason or "length"
    return gens


def stream_text(decode: Callable[[list[int]], str], tokens: Iterator[int]) -> Iterator[str]:
    """Text deltas of a token stream; holds back incomplete UTF-8 sequences."""
    ids: list[int] = []
    emitted = ""
    for token in tokens:
        ids.append(token)
        text = decode(ids)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted) and text.startswith(emitted):
            yield text[len(emitted):]
            emitted = text
    text = decode(ids)
    if len(text) > len(emitted) and text.startswith(emitted):
        yield text[len(emitted):]
