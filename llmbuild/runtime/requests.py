"""One validation layer for runtime requests, shared by the Python API
(`generate/stream/chat/submit`), the CLI's sampling options and the HTTP server.

Every field a caller can set is type- and range-checked here, before anything reaches
the engine thread; a bad value is a `RequestError` (a `UserError`, so the CLI exits 2
and a server answers 400) naming the field, the expected range and the value found:

    RequestError: top_p: expected a number in (0, 1], got 0 (integer)

The field table `FIELDS` is the single statement of what is valid; `SamplingParams`
checks itself against it, so no path builds an out-of-range request. This module
imports nothing heavy (no numpy), so a server can import it at start-up.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from llmbuild.errors import UserError

UINT64 = 1 << 64


class RequestError(UserError, ValueError):
    """A request field out of type or range. Also a ValueError, for callers that caught
    the ValueError SamplingParams raised before this layer existed."""

    def __init__(self, field: str, expected: str, value: Any):
        self.field = field
        self.expected = expected
        self.value = value
        super().__init__(f"{field}: expected {expected}, got {_show(value)}")


@dataclass(frozen=True)
class Field:
    """A numeric request field: kind "int" or "float", bounds (None = unbounded) and
    whether each bound is included. Floats must be finite."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def expected(self) -> str:
        what = "an integer" if self.kind == "int" else "a finite number"
        if self.low is None and self.high is None:
            return what
        if self.high is None:
            return f"{what} {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f"{what} {'<' if self.high_open else '<='} {_num(self.high)}"
        return (f"{what} in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                f"{')' if self.high_open else ']'}")

    def check(self, name: str, value: Any) -> int | float:
        """The value as a plain int/float, or RequestError."""
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise RequestError(name, self.expected, value)
            value = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise RequestError(name, self.expected, value)
            value = float(value)
            if not math.isfinite(value):
                raise RequestError(name, self.expected, value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise RequestError(name, self.expected, value)
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise RequestError(name, self.expected, value)
        return value


# The sampling fields (llmbuild.runtime.sampling.SamplingParams) and their ranges.
SAMPLING_FIELDS: dict[str, Field] = {
    "temperature": Field("float", 0.0),
    "top_k": Field("int", 0, 2**31 - 1),
    "top_p": Field("float", 0.0, 1.0, low_open=True),
    "seed": Field("int", 0, UINT64, high_open=True),
    "min_p": Field("float", 0.0, 1.0),
    "repetition_penalty": Field("float", 0.0, low_open=True),
    "presence_penalty": Field("float"),
    "frequency_penalty": Field("float"),
}
# The other request fields with a numeric range.
FIELDS: dict[str, Field] = {
    **SAMPLING_FIELDS,
    "max_new_tokens": Field("int", 1),
    "logprobs": Field("int", 0, 2**31 - 1),
    "token_id": Field("int", 0),
    # LoadedModel / llmbuild.load options
    "threads": Field("int", 1, 4096),
    "max_batch_size": Field("int", 1, 65536),
    "max_num_tokens": Field("int", 1),
}


def check_field(name: str, value: Any, *, field: str | None = None) -> int | float:
    """`value` checked against FIELDS[name]; `field` is the name the message shows
    (e.g. "--top-p" on the command line, "prompts[2]" in a list)."""
    return FIELDS[name].check(field or name, value)


def check_sampling(values: Mapping[str, Any], *, names: Mapping[str, str] | None = None) -> dict[str, int | float]:
    """The sampling fields in `values`, checked and normalised to int/float. Unknown
    keys are a RequestError listing the known ones. `names` maps a field to the name a
    message shows (the CLI's option names)."""
    unknown = sorted(set(values) - set(SAMPLING_FIELDS))
    if unknown:
        raise RequestError("sampling", f"one of {', '.join(SAMPLING_FIELDS)}", ", ".join(unknown))
    names = names or {}
    return {k: SAMPLING_FIELDS[k].check(names.get(k, k), v) for k, v in values.items()}


def check_optional(name: str, value: Any, *, field: str | None = None) -> int | float | None:
    return None if value is None else check_field(name, value, field=field)


def check_text(field: str, text: Any) -> str:
    """A prompt or message text: a str that is valid Unicode (no lone surrogates, which
    is what bytes that are not UTF-8 become on the command line and in stdin)."""
    if not isinstance(text, str):
        raise RequestError(field, "a string", text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(field, "valid UTF-8 text", Described(f"undecodable bytes at character {e.start}")) from None
    return text


def check_prompts(prompts: Any) -> list[str]:
    """`generate`'s prompts: one string or a list of strings."""
    if isinstance(prompts, str):
        return [check_text("prompt", prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise RequestError("prompts", "a string or a non-empty list of strings", prompts)
    return [check_text(f"prompts[{i}]", p) for i, p in enumerate(prompts)]


def check_messages(messages: Any, *, field: str = "messages") -> list[dict]:
    """Chat messages: a non-empty list of {"role": str, "content": str} mappings."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError(field, 'a non-empty list of {"role": ..., "content": ...} mappings', messages)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RequestError(f"{field}[{i}]", 'a mapping {"role": ..., "content": ...}', m)
        for key in ("role", "content"):
            if key not in m:
                raise RequestError(f"{field}[{i}].{key}", "a string", None)
        check_text(f"{field}[{i}].role", m["role"])
        check_text(f"{field}[{i}].content", m["content"])
    return [dict(m) for m in messages]


def check_stop(stop: Any) -> tuple[str, ...]:
    """Stop strings: one non-empty string or a list of them."""
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise RequestError("stop", "a string or a list of non-empty strings", stop)
    for i, s in enumerate(items):
        name = "stop" if isinstance(stop, str) else f"stop[{i}]"
        if not isinstance(s, str) or not s:
            raise RequestError(name, "a non-empty string", s)
        check_text(name, s)
    return tuple(items)


def check_token_ids(ids: Any, *, field: str = "prompt_ids", vocab_size: int | None = None) -> tuple[int, ...]:
    """Token ids: a sequence of integers (not floats, not booleans) in [0, vocab_size)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise RequestError(field, "a sequence of token ids (integers)", ids)
    high = Field("int", 0, vocab_size, high_open=True) if vocab_size else FIELDS["token_id"]
    return tuple(high.check(f"{field}[{i}]", t) for i, t in enumerate(ids))


def check_seeds(seed: Any, n: int) -> list[int]:
    """One seed for every prompt, or one per prompt."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise RequestError("seed", f"one seed or a list of {n} (one per prompt)", f"a list of {len(seed)}")
        return [check_field("seed", s, field=f"seed[{i}]") for i, s in enumerate(seed)]
    return [check_field("seed", seed)] * n


def check_flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(field, "true or false", value)
    return value


def _num(x: float) -> str:
    if x == UINT64:
        return "2**64"
    if x == 2**31 - 1:
        return "2**31-1"
    return f"{x:g}" if isinstance(x, float) else str(x)


class Described(str):
    """A found value given as a description (shown as is, not quoted)."""


def _show(value: Any) -> str:
    if isinstance(value, Described):
        return str(value)
    if isinstance(value, bool):
        return f"{str(value).lower()} (boolean)"
    if isinstance(value, numbers.Integral):
        return f"{value} (integer)"
    if isinstance(value, numbers.Real):
        return f"{value!r} (number)"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return repr(shown) + " (string)"
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({type(value).__name__})"


def request_fields(*, max_new_tokens: Any, stop: Any = (), logprobs: Any = None, stream: Any = False,
                   ignore_eos: Any = False) -> dict:
    """The non-sampling fields of a Request, checked."""
    return {
        "max_new_tokens": check_field("max_new_tokens", max_new_tokens),
        "stop": check_stop(stop),
        "logprobs": check_optional("logprobs", logprobs),
        "stream": check_flag("stream", stream),
        "ignore_eos": check_flag("ignore_eos", ignore_eos),
    }


__all__: Sequence[str] = (
    "FIELDS", "Field", "RequestError", "SAMPLING_FIELDS", "check_field", "check_flag", "check_messages",
    "check_optional", "check_prompts", "check_sampling", "check_seeds", "check_stop",
    "check_text", "check_token_ids", "request_fields",
)
