"""Requests and their results: what a caller asks for, what it gets back, and the text
side of generation (incremental detokenization and stop strings).

The work itself (slots, prefill, decode) is done by `llmbuild.runtime.scheduler`,
driven by the thread in `llmbuild.runtime.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from llmbuild.errors import UserError
from llmbuild.runtime.requests import check_token_ids, request_fields
from llmbuild.runtime.sampling import SamplingParams, check_params


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), most likely first


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "eos" | "length" | "stop" (stop string, or grammar complete) | "cancelled"
    logprobs: list[TokenLogprob] | None = None
    time_to_first_token: float | None = None  # seconds from submission
    seconds: float | None = None  # submission to finish
    token_times: list[float] = field(default_factory=list)  # seconds from submission, per output token


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_input_len: int
    max_seq_len: int


@dataclass(frozen=True)
class Request:
    """One generation request. `logprobs`: None = none; n >= 0 = the chosen token's
    logprob plus the n most likely alternatives at every step."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int = 64
    params: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    stream: bool = False  # deliver text deltas as they are produced
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks)
    grammar: object | None = field(default=None, compare=False)  # llmbuild.runtime.grammar.Grammar

    def __post_init__(self):
        checked = request_fields(max_new_tokens=self.max_new_tokens, stop=self.stop, logprobs=self.logprobs,
                                 stream=self.stream, ignore_eos=self.ignore_eos)
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "prompt_ids", check_token_ids(self.prompt_ids))
        check_params(self.params)


def check_request(prompt_ids: Sequence[int], max_new_tokens: int, limits: Limits, vocab_size: int | None = None) -> None:
    """A request the engine can serve, or a UserError saying which limit it breaks.

    Prompts longer than one forward pass are prefilled in chunks, so the bound on a
    prompt is the cache: prompt + max_new_tokens <= max_seq_len."""
    if not prompt_ids:
        raise UserError("empty prompt: at least one token is needed")
    if len(prompt_ids) + max_new_tokens > limits.max_seq_len:
        raise UserError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"this artifact's max_seq_len={limits.max_seq_len}; shorten the prompt or lower max_new_tokens"
        )
    if vocab_size is not None:
        bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


class IncrementalDetokenizer:
    """Text deltas of a growing token sequence, decoding only a short window each time.

    Decodes ids[prefix:read] and ids[prefix:] and emits the difference (the window
    keeps one already-emitted token before the new ones, so tokenizers that drop a
    leading space at the start of a decode still join correctly); an incomplete UTF-8
    sequence (U+FFFD at the end) waits for the next token.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        after = self.decode(self.ids[self.prefix :])
        before = self.decode(self.ids[self.prefix : self.read])
        delta = after[len(before):] if len(after) > len(before) else ""
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta


class TextTracker:
    """A request's output text, its stop strings, and how much of it may be streamed.

    Text that could still turn out to be the start of a stop string is held back, so a
    stream never shows a stop string or a part of one."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
        self.detok = IncrementalDetokenizer(decode)
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Feed a token; returns the new streamable text (may be empty)."""
        if self.stopped:
            return ""
        self.text += self.detok.add(token)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            start = max(0, self.emitted - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        end = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

