"""Continuous batching over the slots of a static KV cache.

    waiting ──admit (lowest free slot)──► slot s: PREFILL ──last chunk──► DECODE ──stop──► slot free
                                            │ chunks of <= max_num_tokens      │ one token per step
                                            ▼                                  ▼
                         pass over slot s alone (B = 1)      one pass over the slots lo..hi of
                                                             every decoding sequence (B = hi-lo+1)

One `step()` runs at most one prefill chunk (the oldest sequence still prefilling)
and then one decode step for every sequence that has its first token, so a long
prompt never stalls the running sequences for more than one chunk. A sequence that
finishes frees its slot at once; the next waiting request takes it in the next step.

No compute is spent on padding in prefill: each chunk runs alone over its own slot
(executors with `slot_ranges`, i.e. ONNX Runtime and TensorRT, bind a sub-range of
the cache). A decode pass covers the contiguous slots lo..hi of the decoding
sequences; a slot inside that range with nothing to decode (free, or still
prefilling) rides along with one dummy token written at its own next cache row,
which is overwritten before it is ever read. Those rows are the only padding, and
`EngineStats` counts them. Executors without `slot_ranges` (the tensor-parallel
ones) get one pass over every slot per step, the prefill chunk and the decode tokens
together, each row right-padded to the pass's length: the graph's per-row write
indices keep padding out of every real token's attention (llmbuild.graph.io), and the
padded tokens are counted too.

Sampling follows `llmbuild.runtime.sampling` with one RNG per request, so a seeded
request draws the same tokens whatever else is in the batch. A request with a grammar
(`llmbuild.runtime.grammar`) has its forbidden tokens masked to -inf first. An error
while sampling one sequence (its grammar, its detokenization) fails that request
alone (`Sequence.fail`) and frees its slot; the others go on.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llmbuild.runtime.executors.base import StepInputs
from llmbuild.runtime.generator import Generation, Request, TextTracker, TokenLogprob
from llmbuild.runtime.sampling import SplitMix64, apply_penalties, logprobs_of, sample


@dataclass
class EngineStats:
    """Counters since the engine started (or since `reset`)."""

    steps: int = 0
    prefill_passes: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0  # inside the executor
    decode_passes: int = 0
    decode_tokens: int = 0  # real tokens decoded
    decode_rows: int = 0  # rows in decode passes, dummies included
    decode_seconds: float = 0.0  # inside the executor
    decode_step_seconds: float = 0.0  # whole steps that only decoded (no prefill chunk)
    decode_step_executor_seconds: float = 0.0  # executor time within those steps
    decode_only_steps: int = 0
    decode_only_tokens: int = 0  # real tokens decoded in those steps
    padded_tokens: int = 0  # tokens computed that belong to no request (dummy rows, padding)

    @property
    def padding_fraction(self) -> float:
        total = self.prefill_tokens + self.decode_tokens + self.padded_tokens
        return self.padded_tokens / total if total else 0.0

    @property
    def overhead_per_decode_step(self) -> float:
        """Seconds per decode-only step spent outside the executor (scheduling, sampling,
        detokenization, bookkeeping)."""
        if not self.decode_only_steps:
            return 0.0
        return (self.decode_step_seconds - self.decode_step_executor_seconds) / self.decode_only_steps

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["padding_fraction"] = self.padding_fraction
        d["overhead_per_decode_step"] = self.overhead_per_decode_step
        return d


@dataclass
class Sequence:
    request: Request
    submitted: float
    emit: Callable[[str], None] | None = None  # text deltas (streaming)
    done: Callable[[Generation], None] | None = None
    fail: Callable[[BaseException], None] | None = None  # this request failed alone
    constraint: object | None = None  # llmbuild.runtime.grammar.Constraint
    slot: int = -1
    cached: int = 0  # tokens whose K/V rows are in the cache = next write index
    tokens: list[int] = field(default_factory=list)  # prompt, then output
    output: list[int] = field(default_factory=list)
    rng: SplitMix64 | None = None
    text: TextTracker | None = None
    logprobs: list[TokenLogprob] | None = None
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.cached < self.prompt_len

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, executor, *, num_slots: int, max_num_tokens: int, eos_token_ids, decode: Callable[[list[int]], str]):
        self.executor = executor
        self.num_slots = num_slots
        self.max_num_tokens = max_num_tokens
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.decode = decode
        self.slot_ranges = bool(getattr(executor, "slot_ranges", False))
        self.waiting: deque[Sequence] = deque()
        self.slots: list[Sequence | None] = [None] * num_slots
        self.stats = EngineStats()
        self.ensure_cache()

    def ensure_cache(self) -> None:
        if self.executor.batch_size != self.num_slots:
            self.executor.reset(self.num_slots)

    # -- queue ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence; an error here (a forged request) fails it alone."""
        try:
            self._prepare(seq)
        except Exception as error:  # noqa: BLE001 - handed to the request's caller
            self._fail(seq, error)
            return
        self.waiting.append(seq)

    def _prepare(self, seq: Sequence) -> None:
        req = seq.request
        seq.tokens = list(req.prompt_ids)
        seq.rng = None if req.params.greedy else SplitMix64(req.params.seed)
        seq.logprobs = [] if req.logprobs is not None else None
        if req.stream or req.stop:
            seq.text = TextTracker(self.decode, req.stop)
        if req.grammar is not None and seq.constraint is None:
            seq.constraint = req.grammar.matcher()

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def fail_all(self, error: BaseException) -> list[Sequence]:
        """Drop every sequence (after an executor error); returns them."""
        dropped = [*self.waiting, *self.running()]
        self.waiting.clear()
        self.slots = [None] * self.num_slots
        return dropped

    # -- one iteration ----------------------------------------------------------------------
    def step(self) -> None:
        start = time.perf_counter()
        self.stats.steps += 1
        self._drop_cancelled()
        self._admit()
        running = self.running()
        prefill = next((s for s in sorted(running, key=lambda s: s.submitted) if s.prefilling), None)
        decoding = [s for s in running if not s.prefilling]
        executor_seconds = 0.0
        if self.slot_ranges:
            if prefill is not None:
                executor_seconds += self._prefill_alone(prefill)
                decoding = [s for s in self.running() if not s.prefilling]  # it may have its first token now
            if decoding:
                executor_seconds += self._decode(decoding)
        elif prefill is not None or decoding:
            executor_seconds += self._mixed_pass(prefill, decoding)
        if prefill is None and decoding:
            self.stats.decode_only_steps += 1
            self.stats.decode_only_tokens += len(decoding)
            self.stats.decode_step_seconds += time.perf_counter() - start
            self.stats.decode_step_executor_seconds += executor_seconds

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled")
        for seq in self.running():
            if seq.cancelled:
                self._finish(seq, "cancelled")

    def _admit(self) -> None:
        for slot in range(self.num_slots):
            if not self.waiting:
                return
            if self.slots[slot] is None:
                seq = self.waiting.popleft()
                seq.slot, seq.cached = slot, 0
                self.slots[slot] = seq

    def _prefill_alone(self, seq: Sequence) -> float:
        n = min(self.max_num_tokens, seq.prompt_len - seq.cached)
        ids = np.asarray(seq.tokens[seq.cached : seq.cached + n], np.int64)[None]
        positions = np.arange(seq.cached, seq.cached + n, dtype=np.int64)[None]
        step = StepInputs(ids, positions, np.array([seq.cached], np.int64), np.array([[n - 1]], np.int64))
        t = time.perf_counter()
        logits = self.executor.forward(step, seq.slot)
        seconds = time.perf_counter() - t
        self.stats.prefill_passes += 1
        self.stats.prefill_tokens += n
        self.stats.prefill_seconds += seconds
        seq.cached += n
        if not seq.prefilling:
            self._sample(seq, logits[0, 0])
        return seconds

    def _decode(self, decoding: list[Sequence]) -> float:
        lo = min(s.slot for s in decoding)
        hi = max(s.slot for s in decoding) + 1
        width = hi - lo
        ids = np.zeros((width, 1), np.int64)
        writes = np.zeros(width, np.int64)
        for row in range(width):
            seq = self.slots[lo + row]
            if seq is not None:
                writes[row] = seq.cached  # dummy rows (prefilling slots) write their next row
                if not seq.prefilling:
                    ids[row, 0] = seq.tokens[-1]
        step = StepInputs(ids, writes[:, None].copy(), writes, np.zeros((width, 1), np.int64))
        t = time.perf_counter()
        logits = self.executor.forward(step, lo)
        seconds = time.perf_counter() - t
        self.stats.decode_passes += 1
        self.stats.decode_rows += width
        self.stats.decode_tokens += len(decoding)
        self.stats.padded_tokens += width - len(decoding)
        self.stats.decode_seconds += seconds
        greedy = logits[:, 0].argmax(-1)  # one vectorized argmax for every plain greedy row
        for seq in decoding:
            seq.cached += 1
            self._sample(seq, logits[seq.slot - lo, 0], int(greedy[seq.slot - lo]))
        return seconds

    def _mixed_pass(self, prefill: Sequence | None, decoding: list[Sequence]) -> float:
        """One pass over every slot (executors without slot ranges), rows right-padded."""
        cache_len = self.executor.cache_len
        rows: dict[int, list[int]] = {s.slot: [s.tokens[-1]] for s in decoding}
        writes = np.array([(s.cached if s is not None else 0) for s in self.slots], np.int64)
        n = 1
        if prefill is not None:
            room = int(cache_len - writes.max())  # padding rows must stay inside every slot's cache
            n = max(1, min(self.max_num_tokens, prefill.prompt_len - prefill.cached, room))
            rows[prefill.slot] = prefill.tokens[prefill.cached : prefill.cached + n]
        ids = np.zeros((self.num_slots, n), np.int64)
        last = np.zeros((self.num_slots, 1), np.int64)
        for slot, toks in rows.items():
            ids[slot, : len(toks)] = toks
            last[slot, 0] = len(toks) - 1
        positions = writes[:, None] + np.arange(n, dtype=np.int64)[None]
        t = time.perf_counter()
        logits = self.executor.forward(StepInputs(ids, positions, writes.copy(), last), 0)
        seconds = time.perf_counter() - t
        real = sum(len(t) for t in rows.values())
        self.stats.padded_tokens += self.num_slots * n - real
        if prefill is not None:
            self.stats.prefill_passes += 1
            self.stats.prefill_tokens += n
            self.stats.prefill_seconds += seconds
            prefill.cached += n
            if not prefill.prefilling:
                self._sample(prefill, logits[prefill.slot, 0])
        if decoding:
            self.stats.decode_passes += 1
            self.stats.decode_rows += self.num_slots
            self.stats.decode_tokens += len(decoding)
            self.stats.decode_seconds += seconds if prefill is None else 0.0
            for seq in decoding:
                seq.cached += 1
                self._sample(seq, logits[seq.slot, 0])
        return seconds

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        """One request failed (not the executor): free its slot, raise in its handle;
        every other sequence carries on."""
        seq.finish_reason = "error"
        if 0 <= seq.slot < self.num_slots and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.fail is not None:
            seq.fail(error)

    # -- tokens -------------------------------------------------------------------------------
    def _sample(self, seq: Sequence, logits: np.ndarray, argmax: int | None = None) -> None:
        """Sample, stop or finish one sequence; an error in it fails that request alone."""
        try:
            self._sample_one(seq, logits, argmax)
        except Exception as error:  # noqa: BLE001 - handed to the request's caller
            self._fail(seq, error)

    def _sample_one(self, seq: Sequence, logits: np.ndarray, argmax: int | None = None) -> None:
        req = seq.request
        params = req.params
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        scores = logits if seq.constraint is None else seq.constraint.mask(logits)
        if argmax is not None and params.greedy and not params.penalized and seq.constraint is None:
            token = argmax  # sample() would return the same first maximum
        else:
            scores = apply_penalties(scores, params, req.prompt_ids, seq.output) if params.penalized else scores
            token = sample(scores, params, seq.rng)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        if seq.logprobs is not None:
            lp, top = logprobs_of(logits, token, req.logprobs)
            seq.logprobs.append(TokenLogprob(token, lp, top))
        if token in self.eos and not req.ignore_eos:
            if seq.logprobs:
                seq.logprobs.pop()  # EOS is not part of the output
            self._finish(seq, "eos")
            return
        seq.tokens.append(token)
        seq.output.append(token)
        seq.token_times.append(time.perf_counter() - seq.submitted)
        if seq.text is not None:
            delta = seq.text.add(token)
            if delta and seq.emit is not None:
                seq.emit(delta)
            if seq.text.stopped:
                self._finish(seq, "stop")
                return
        if seq.constraint is not None and seq.constraint.stopped:
            self._finish(seq, "stop")
            return
        if len(seq.output) >= req.max_new_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if 0 <= seq.slot < self.num_slots and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        if seq.text is not None:
            delta = seq.text.finish()
            if delta and seq.emit is not None and reason != "cancelled":
                seq.emit(delta)
            text = seq.text.text
        else:
            text = self.decode(seq.output)
        now = time.perf_counter()
        gen = Generation(
            prompt_token_ids=list(seq.request.prompt_ids), token_ids=list(seq.output), text=text,
            finish_reason=reason, logprobs=seq.logprobs,
            time_to_first_token=None if seq.first_token_at is None else seq.first_token_at - seq.submitted,
            seconds=now - seq.submitted, token_times=seq.token_times,
        )
        if seq.done is not None:
            seq.done(gen)
