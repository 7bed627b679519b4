"""The decoder graph's I/O contract: names shared by the graph, engine and runtimes.

One graph serves prefill and decode. Per forward pass, for a batch of B sequences
each bringing S new tokens (right-padded to a common S):

    input_ids        int64  [batch, seq]          new tokens
    position_ids     int64  [batch, seq]          absolute positions of the new tokens
    write_indices    int64  [batch]               tokens already in each sequence's cache
    logits_indices   int64  [batch, num_logits]   which of the S new tokens get logits
    past_key.<i>     T      [batch, kv_heads, cache_len, head_dim]   (one per layer)
    past_value.<i>   T      [batch, kv_heads, cache_len, head_dim]
  ->
    logits           float32 [batch, num_logits, vocab]
    present_key.<i>  T      same shape as past_key.<i>; may alias it (updated in place)
    present_value.<i>

The new K/V rows of sequence b land at cache positions write_indices[b] .. +S-1, and
attention sees the first write_indices[b] + S cache rows, causally aligned to the end
(row s of the new tokens sees cache rows < write_indices[b] + s + 1). Padding tokens
at the end of a short sequence therefore never influence its real tokens; the rows they
write lie beyond the sequence's length and are overwritten by later steps.
"""

from __future__ import annotations

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
WRITE_INDICES = "write_indices"
LOGITS_INDICES = "logits_indices"
LOGITS = "logits"

# Symbolic dimension names.
BATCH = "batch"
SEQ = "seq"
NUM_LOGITS = "num_logits"
CACHE_LEN = "cache_len"


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def present_key(layer: int) -> str:
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    return f"present_value.{layer}"


def cache_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(past input, present output) pairs; each output may alias its input."""
    pairs = []
    for i in range(num_layers):
        pairs.append((past_key(i), present_key(i)))
        pairs.append((past_value(i), present_value(i)))
    return pairs
