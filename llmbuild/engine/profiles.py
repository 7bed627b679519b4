"""Optimization profiles: one for prefill (many tokens), one for decode (one token each).

    limits: max_batch_size B, max_input_len S, max_seq_len T, max_num_tokens N (default B*S)

    profile 0 "prefill"   input_ids [1..Bp, 1..S]   Bp = min(B, N // S) sequences per pass
    profile 1 "decode"    input_ids [1..B,  1]      one new token per sequence

Both profiles pin the caches to [batch, kv_heads, T, head_dim]. The prefill profile
also covers one-token steps (its ranges start at 1), so an executor that never switches
profiles still runs; `select_profile` picks the tightest profile for a step, which is
the decode profile for one-token steps. `max_num_tokens` bounds the tokens of one
forward pass, so the activation memory TensorRT reserves for the prefill profile: the
recipe schema requires S <= N (a whole prompt fits one pass) and B <= N (a decode step
of every sequence fits one pass).
"""

from __future__ import annotations

from llmbuild.errors import UserError
from llmbuild.graph import io

Shape = tuple[int, ...]
# One optimization profile: network input name -> (min, opt, max) shapes.
Profile = dict[str, tuple[Shape, Shape, Shape]]

PREFILL, DECODE = "prefill", "decode"
PROFILE_NAMES = (PREFILL, DECODE)
# Most common prompt chunk the kernels are tuned for; TensorRT-RTX re-specializes
# at run time anyway, so this only has to be a plausible middle.
OPT_SEQ_LEN = 128


def check_limits(limits: dict) -> tuple[int, int, int, int]:
    """(max_batch_size, max_input_len, max_seq_len, max_num_tokens), or a UserError."""
    try:
        batch, input_len, seq_len = (int(limits[k]) for k in ("max_batch_size", "max_input_len", "max_seq_len"))
        num_tokens = limits.get("max_num_tokens")
        num_tokens = batch * input_len if num_tokens is None else int(num_tokens)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"engine limits {limits!r}: need integer max_batch_size, max_input_len, max_seq_len ({e})")
    if min(batch, input_len, seq_len, num_tokens) < 1 or input_len > seq_len:
        raise UserError(
            f"engine limits {limits!r}: all must be >= 1 and max_input_len ({input_len}) "
            f"<= max_seq_len ({seq_len})"
        )
    if num_tokens < max(batch, input_len):
        raise UserError(
            f"limits.max_num_tokens={num_tokens} is smaller than max_input_len ({input_len}) or "
            f"max_batch_size ({batch}); expected at least {max(batch, input_len)}: a whole prompt "
            "and a decode step of every sequence must each fit one forward pass"
        )
    return batch, input_len, seq_len, num_tokens


def prefill_batch(limits: dict) -> int:
    """Sequences one prefill pass takes: min(max_batch_size, max_num_tokens // max_input_len)."""
    batch, input_len, _, num_tokens = check_limits(limits)
    return max(1, min(batch, num_tokens // input_len))


def profiles_from_limits(limits: dict, *, num_layers: int, kv_heads: int, head_dim: int) -> list[Profile]:
    """The decoder graph's optimization profiles, in PROFILE_NAMES order."""
    batch, input_len, seq_len, _ = check_limits(limits)
    pbatch = prefill_batch(limits)

    def profile(b: int, s: int, opt_s: int) -> Profile:
        p: Profile = {
            io.INPUT_IDS: ((1, 1), (b, opt_s), (b, s)),
            io.POSITION_IDS: ((1, 1), (b, opt_s), (b, s)),
            io.WRITE_INDICES: ((1,), (b,), (b,)),
            io.LOGITS_INDICES: ((1, 1), (b, 1), (b, s)),
        }
        for past, _present in io.cache_pairs(num_layers):
            full = (b, kv_heads, seq_len, head_dim)
            p[past] = ((1, kv_heads, seq_len, head_dim), full, full)
        return p

    return [profile(pbatch, input_len, min(input_len, OPT_SEQ_LEN)), profile(batch, 1, 1)]


def select_profile(engine_entry: dict, batch: int, seq: int, num_logits: int = 1) -> int:
    """Index of the optimization profile for a forward pass of `batch` sequences with
    `seq` new tokens each and `num_logits` logit rows per sequence.

    The tightest profile (smallest max batch x tokens) whose ranges contain the step:
    the decode profile for one-token steps, the prefill profile otherwise. Works on the
    manifest entry alone (no GPU). A step no profile takes is a UserError naming the
    ranges, so the caller can split it (fewer sequences per prefill pass).
    """
    fits = []
    for index, profile in enumerate(engine_entry["profiles"]):
        lo, _, hi = profile[io.INPUT_IDS]
        llo, _, lhi = profile[io.LOGITS_INDICES]
        if lo[0] <= batch <= hi[0] and lo[1] <= seq <= hi[1] and llo[1] <= num_logits <= lhi[1]:
            fits.append((hi[0] * hi[1], index))
    if not fits:
        names = engine_entry.get("profile_names") or [f"profile {i}" for i in range(len(engine_entry["profiles"]))]
        ranges = "; ".join(
            f"{name}: batch <= {p[io.INPUT_IDS][2][0]}, tokens <= {p[io.INPUT_IDS][2][1]}, "
            f"logits <= {p[io.LOGITS_INDICES][2][1]}"
            for name, p in zip(names, engine_entry["profiles"])
        )
        raise UserError(
            f"engine {engine_entry.get('file', '?')}: no optimization profile takes {batch} sequence(s) x "
            f"{seq} token(s) with {num_logits} logit row(s); profiles: {ranges}"
        )
    return min(fits)[1]
