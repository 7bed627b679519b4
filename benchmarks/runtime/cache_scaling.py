"""Decode step time against the KV-cache length, on ONNX Runtime (CPU).

    python benchmarks/runtime/cache_scaling.py ARTIFACT [--threads 2] [--json]

For KV-cache buffers of 512 .. 32768 rows per layer (one executor each, the same
artifact: the ONNX graph's cache length is symbolic, and positions stay at 128..160,
inside any artifact's rotary tables), a 128-token prompt, then the median of 32
single-token decode steps at batch 1, for the CPU lowering and for the standard graph.
The machine is shared, so the fastest of the 32 steps is reported as well. The cache is bound in place (past and present share one buffer), so
no step copies it: with the CPU lowering the step time stays flat as the cache grows.
The standard graph's opset-24 Attention reads all cache_len rows of the buffer
(masked), so its step time grows with the buffer, which is compute, not a copy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from llmbuild.artifact import read_manifest
from llmbuild.runtime.executors.base import StepInputs
from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor


def step_ms(artifact: Path, cache_len: int, lowering: bool, threads: int) -> float:
    m = read_manifest(artifact)
    ex = OnnxRuntimeExecutor(artifact / m["graph"]["file"], num_layers=m["model"]["num_layers"], cache_len=cache_len,
                             threads=threads, cpu_lowering=lowering)
    n = 128
    ids = np.random.default_rng(0).integers(20, 1000, (1, n))
    ex.forward(StepInputs(ids, np.arange(n)[None], np.zeros(1, np.int64), np.array([[n - 1]])))
    times = []
    for k in range(32):
        pos = np.array([n + k])
        t = time.perf_counter()
        ex.forward(StepInputs(np.array([[100 + k]]), pos[:, None], pos, np.zeros((1, 1), np.int64)))
        times.append(time.perf_counter() - t)
    ex.close()
    return 1e3 * statistics.median(times), 1e3 * min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    lengths = [512, 2048, 8192, 32768]
    rows = []
    for n in lengths:
        low, std = step_ms(args.artifact, n, True, args.threads), step_ms(args.artifact, n, False, args.threads)
        rows.append({"cache_len": n, "lowered_ms": low[0], "lowered_best_ms": low[1],
                     "standard_ms": std[0], "standard_best_ms": std[1]})
    if args.json:
        print(json.dumps(rows))
    else:
        print("| cache rows per layer | CPU lowering: median / best step (ms) | standard graph: median / best (ms) |")
        print("|---:|---:|---:|")
        for r in rows:
            print(f"| {r['cache_len']} | {r['lowered_ms']:.1f} / {r['lowered_best_ms']:.1f} | "
                  f"{r['standard_ms']:.1f} / {r['standard_best_ms']:.1f} |")


if __name__ == "__main__":
    main()
