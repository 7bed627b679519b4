"""Forward passes of llmbuild's executor as the runtime benchmarks time them, shared by
benchmarks/runtime/interleaved.py and benchmarks/quantization/cpu_speed.py --prefill.

Import it with benchmarks/runtime on sys.path (as the other benchmarks import
`interleaved` and `prepare`), llmbuild importable.
"""

from __future__ import annotations

import numpy as np

from llmbuild.runtime.executors.base import StepInputs


def chunked_prefill(ex, ids: list[int], chunk: int) -> int:
    """Prefill `ids` from position 0 of slot 0 of executor `ex` in passes of at most
    `chunk` tokens (the artifact's max_input_len), each pass's logits of its last token
    only; returns the greedy next token."""
    for c in range(0, len(ids), chunk):
        part = ids[c : c + chunk]
        n = len(part)
        logits = ex.forward(StepInputs(np.array([part]), np.arange(c, c + n)[None], np.array([c]),
                                       np.array([[n - 1]])))
    return int(logits[0, -1].argmax())
