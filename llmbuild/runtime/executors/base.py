"""The executor interface: one forward pass of the decoder graph over a KV cache.

Executors own their KV-cache buffers (host memory for ONNX Runtime, device memory for
TensorRT) so that the cache is updated in place; the generator only hands over token
ids, positions and write indices, and receives float32 logits.

The cache has `batch_size` slots. A pass covers a contiguous range of them,
`first_slot .. first_slot + B - 1` for a step of batch B: the executor binds the
graph's `past_*`/`present_*` to that range of its buffers (the slots are the leading,
contiguous dimension), so one sequence can be prefilled alone (B = 1) without padding
and without touching the other slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class StepInputs:
    input_ids: np.ndarray  # int64 [B, S]
    position_ids: np.ndarray  # int64 [B, S]
    write_indices: np.ndarray  # int64 [B]
    logits_indices: np.ndarray  # int64 [B, K]

    def __post_init__(self):
        b, s = self.input_ids.shape
        if self.position_ids.shape != (b, s):
            raise ValueError(f"position_ids shape {self.position_ids.shape} != input_ids shape {(b, s)}")
        if self.write_indices.shape != (b,):
            raise ValueError(f"write_indices shape {self.write_indices.shape} != ({b},)")
        if self.logits_indices.ndim != 2 or self.logits_indices.shape[0] != b:
            raise ValueError(f"logits_indices shape {self.logits_indices.shape} must be ({b}, K)")


def check_slots(step: StepInputs, first_slot: int, slots: int) -> None:
    b = step.input_ids.shape[0]
    if first_slot < 0 or b < 1 or first_slot + b > slots:
        raise ValueError(f"a batch of {b} from slot {first_slot} does not fit the cache's {slots} slots")


class Executor(Protocol):
    name: str
    batch_size: int  # cache slots
    cache_len: int  # cache rows per slot

    def forward(self, step: StepInputs, first_slot: int = 0) -> np.ndarray:
        """Run one pass over cache slots first_slot .. first_slot+B-1; returns logits
        float32 [B, K, vocab]."""

    def reset(self, batch_size: int) -> None:
        """(Re)allocate the KV cache for `batch_size` slots."""

    def close(self) -> None: ...
