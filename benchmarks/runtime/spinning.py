"""ONNX Runtime's intra-op workers spinning (its default) against blocking between
kernels, on one artifact, in one process: two executors of the same CPU-ready graph take
turns (order alternating per round), each prefilling 64 ids and decoding 48 greedy
tokens; tokens/s = 1 / median step time (the first step not counted).

    python benchmarks/runtime/spinning.py ARTIFACT [--rounds 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import interleaved  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    sides = {"spin": interleaved.ours(args.artifact, args.threads, spinning=True),
             "block": interleaved.ours(args.artifact, args.threads, spinning=False)}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    prompt = list(range(100, 164))
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            prefill, step = sides[name]
            token, pos, times = prefill(prompt), len(prompt), []
            for _ in range(args.tokens):
                t0 = time.perf_counter()
                token = step(token, pos)
                times.append(time.perf_counter() - t0)
                pos += 1
            rates[name].append(1 / statistics.median(times[1:]))
        print(f"round {r}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items())
              + f" tok/s; load average {os.getloadavg()[0]:.2f}", flush=True)
    for name, v in rates.items():
        print(f"{name}: median {statistics.median(v):.1f} tok/s (min {min(v):.1f}, max {max(v):.1f})")
    print(f"spin / block: {statistics.median(rates['spin']) / statistics.median(rates['block']):.3f}")


if __name__ == "__main__":
    main()
