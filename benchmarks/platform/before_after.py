"""The architecture platform (issue #11) before and after, on the same recipes: are the
artifacts' numerics identical, and is CPU speed unchanged?

    python benchmarks/platform/before_after.py --before-src /work/wt-before --before /tmp/ba/before \
        --after-src . --after /tmp/ba/after [--rounds 3] [--threads 2]

`--before-src` is a checkout of the commit before the platform (a2e0beb), `--after-src`
one of the commit under test; `--before` / `--after` hold artifacts compiled by each
from the same recipes (see RESULTS.md for the compile commands). Each side runs in its
own subprocess with its own checkout's code (cwd first on sys.path), taking turns round
by round so that load from other work on a shared machine hits both alike.

Per artifact and side: the standard graph's logits for a fixed 96-token prompt (what
TensorRT parses), the CPU-lowered graph's logits (what `llmbuild run` executes), 32
greedy tokens of the lowered graph after three fixed prompts, and per round prefill of
512 tokens and 32 decode steps after a 128-token prompt (tokens/s, lowered graph).
Compares: max |Δlogit| before vs after (0.0 means bit-identical), greedy ids equal,
decode and prefill speed ratios (after / before, median over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [list(range(1, 40)), [5, 17, 300, 2, 88, 1024, 7, 9, 4000, 12], list(range(100, 196))]


def worker(artifact: Path, out: Path, threads: int, timing_only: bool) -> None:
    """Runs inside one side's checkout (its llmbuild is the one imported)."""
    import numpy as np

    import llmbuild
    from llmbuild.artifact import read_manifest
    from llmbuild.runtime.executors.base import StepInputs
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    m = read_manifest(artifact)
    result: dict = {"llmbuild": llmbuild.__file__}
    rng = np.random.default_rng(0)
    vocab = int(m["model"]["vocab_size"])

    def executor(lowered):
        return OnnxRuntimeExecutor(artifact / m["graph"]["file"], num_layers=m["model"]["num_layers"],
                                   cache_len=m["limits"]["max_seq_len"], threads=threads, cpu_lowering=lowered)

    def prefill(ex, ids):
        chunk = m["limits"]["max_input_len"]
        logits = None
        for c in range(0, len(ids), chunk):
            part = ids[c: c + chunk]
            n = len(part)
            logits = ex.forward(StepInputs(np.array([part]), np.arange(c, c + n)[None], np.array([c]),
                                           np.arange(n)[None]))
        return logits[0]

    lowered = executor(True)
    result["lowered"] = bool(lowered.lowered)
    if not timing_only:
        standard = executor(False)
        ids = rng.integers(0, vocab, 96).tolist()
        np.save(out.with_suffix(".standard.npy"), prefill(standard, ids))
        lowered.reset(1)
        np.save(out.with_suffix(".lowered.npy"), prefill(lowered, ids))
        greedy = []
        for p in PROMPTS:
            lowered.reset(1)
            tokens, logits = [], prefill(lowered, p)
            pos = len(p)
            for _ in range(32):
                t = int(logits[-1].argmax())
                tokens.append(t)
                logits = lowered.forward(StepInputs(np.array([[t]]), np.array([[pos]]), np.array([pos]),
                                                    np.zeros((1, 1), np.int64)))[0]
                pos += 1
            greedy.append(tokens)
        result["greedy"] = greedy
    # timing
    lowered.reset(1)
    ids = rng.integers(0, vocab, 512).tolist()
    start = time.perf_counter()
    prefill(lowered, ids)
    result["prefill_tok_s"] = 512 / (time.perf_counter() - start)
    lowered.reset(1)
    logits = prefill(lowered, ids[:128])
    t, pos, times = int(logits[-1].argmax()), 128, []
    for _ in range(33):
        start = time.perf_counter()
        logits = lowered.forward(StepInputs(np.array([[t]]), np.array([[pos]]), np.array([pos]),
                                            np.zeros((1, 1), np.int64)))[0]
        times.append(time.perf_counter() - start)
        t, pos = int(logits[-1].argmax()), pos + 1
    result["decode_tok_s"] = 1 / statistics.median(times[1:])
    out.write_text(json.dumps(result))


def run_side(src: Path, artifact: Path, out: Path, threads: int, timing_only: bool) -> dict:
    code = ("import sys; sys.path.insert(0, '.'); sys.path.insert(0, %r); import before_after; "
            "before_after.worker(__import__('pathlib').Path(%r), __import__('pathlib').Path(%r), %d, %r)"
            % (str(Path(__file__).parent), str(artifact), str(out), threads, timing_only))
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", code], cwd=src, env=env, check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-src", type=Path, required=True)
    ap.add_argument("--after-src", type=Path, required=True)
    ap.add_argument("--before", type=Path, required=True, help="artifacts compiled by --before-src")
    ap.add_argument("--after", type=Path, required=True, help="artifacts compiled by --after-src")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import numpy as np

    names = sorted(p.name for p in args.after.iterdir() if (p / "manifest.json").exists())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            side = {}
            for label, src, root in (("before", args.before_src, args.before), ("after", args.after_src, args.after)):
                side[label] = [run_side(src.resolve(), (root / name).resolve(), Path(tmp) / f"{label}-{name}-0.json",
                                        args.threads, False)]
            for r in range(1, args.rounds):
                for label, src, root in (("before", args.before_src, args.before),
                                         ("after", args.after_src, args.after)):
                    side[label].append(run_side(src.resolve(), (root / name).resolve(),
                                                Path(tmp) / f"{label}-{name}-{r}.json", args.threads, True))
            b0, a0 = side["before"][0], side["after"][0]
            diffs = {}
            for graph in ("standard", "lowered"):
                before = np.load(Path(tmp) / f"before-{name}-0.{graph}.npy")
                after = np.load(Path(tmp) / f"after-{name}-0.{graph}.npy")
                diffs[graph] = float(np.abs(before.astype(np.float64) - after.astype(np.float64)).max())
            med = {k: {s: statistics.median(x[k] for x in side[s]) for s in side} for k in ("decode_tok_s",
                                                                                          "prefill_tok_s")}
            rows.append({
                "artifact": name, "lowered": [b0["lowered"], a0["lowered"]],
                "max_abs_dlogit_standard": diffs["standard"], "max_abs_dlogit_lowered": diffs["lowered"],
                "greedy_equal": b0["greedy"] == a0["greedy"],
                "decode_tok_s": med["decode_tok_s"], "prefill_tok_s": med["prefill_tok_s"],
                "decode_ratio": med["decode_tok_s"]["after"] / med["decode_tok_s"]["before"],
                "prefill_ratio": med["prefill_tok_s"]["after"] / med["prefill_tok_s"]["before"],
            })
    print(json.dumps(rows, indent=2))
    print("\n| artifact | lowered (before, after) | max abs Δlogit standard | max abs Δlogit lowered | greedy 3×32 equal "
          "| decode tok/s before → after (ratio) | prefill-512 tok/s before → after (ratio) |")
    print("|---|---|---:|---:|---|---|---|")
    for r in rows:
        d, p = r["decode_tok_s"], r["prefill_tok_s"]
        print(f"| {r['artifact']} | {r['lowered']} | {r['max_abs_dlogit_standard']:.3g} | "
              f"{r['max_abs_dlogit_lowered']:.3g} | {r['greedy_equal']} | {d['before']:.1f} → {d['after']:.1f} "
              f"({r['decode_ratio']:.3f}) | {p['before']:.0f} → {p['after']:.0f} ({r['prefill_ratio']:.3f}) |")


if __name__ == "__main__":
    main()
