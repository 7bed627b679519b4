"""Where a decode step of a quantized artifact's CPU graph spends its time: ONNX
Runtime's profiler per op type, the executor call, and the runtime's whole step.

    python benchmarks/quantization/cpu_profile.py ARTIFACT [ARTIFACT ...] [--threads 2] [--steps 64]

Per artifact (its CPU-ready graph on the ONNX Runtime executor, as the runtime loads it):

1. a 128-token random prompt, then `--steps` greedy decode steps through the executor
   with ONNX Runtime's profiler on; the node events of the decode runs (not the prefill)
   summed per op type (MatMulNBits split into lm_head and the layers' linears), as a
   share of the summed `model_run` time, plus what `model_run` spends outside nodes;
2. the same steps timed around `executor.forward` and around `session.run_with_iobinding`
   alone (no profiler): the executor's own Python per step;
3. `llmbuild bench`'s batch-1 decode (run_bench: scheduler, sampling, streaming): its
   tokens/s and Python overhead per step (time outside the executor call).

Prints one markdown table per artifact and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def executor(artifact: Path, threads: int, profile: str | None = None):
    from llmbuild.artifact import read_manifest
    from llmbuild.lowering.cpu_graph import cpu_graph_file
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    m = read_manifest(artifact)
    return OnnxRuntimeExecutor(artifact / m["graph"]["file"], num_layers=m["model"]["num_layers"],
                               cache_len=m["limits"]["max_seq_len"], threads=threads,
                               cpu_graph=cpu_graph_file(artifact, m), profile=profile)


def decode(ex, steps: int, on_step=None) -> list[float]:
    """128-token prefill, then `steps` greedy steps; seconds per executor call."""
    from llmbuild.runtime.executors.base import StepInputs

    ids = np.random.default_rng(0).integers(20, 40000, 128)
    logits = ex.forward(StepInputs(ids[None], np.arange(128)[None], np.array([0]), np.array([[127]])))
    token, times = int(logits[0, -1].argmax()), []
    for k in range(steps):
        p = np.array([128 + k])
        step = StepInputs(np.array([[token]]), p[:, None], p, np.zeros((1, 1), np.int64))
        start = time.perf_counter()
        logits = ex.forward(step)
        times.append(time.perf_counter() - start)
        token = int(logits[0, 0].argmax())
    return times


def op_shares(trace: Path) -> tuple[dict[str, float], float, int]:
    """(op -> summed node µs over the decode runs, summed model_run µs, runs): every
    model_run after the first (the prefill)."""
    events = json.loads(trace.read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[1:]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in runs]
    ops: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] <= b for a, b in spans):
            continue
        op = e["args"].get("op_name", "?")
        if op == "MatMulNBits":
            op += " (lm_head)" if "lm_head" in e["name"] else " (layers)"
        ops[op] += e["dur"]
    return ops, float(sum(e["dur"] for e in runs)), len(runs)


def one(artifact: Path, threads: int, steps: int) -> None:
    import llmbuild
    from llmbuild.runtime.bench import run_bench

    prefix = f"/tmp/llmbuild-profile-{artifact.name}"
    ex = executor(artifact, threads, prefix)
    decode(ex, steps)
    trace = Path(ex.end_profiling())
    ex.close()
    ops, total, runs = op_shares(trace)
    trace.unlink()

    ex = executor(artifact, threads)
    decode(ex, 8)  # warm-up
    forward = decode(ex, steps)
    # The session call alone, on the executor's last binding (a decode step's).
    bound = ex._binding(0, 1, 1, 1)
    session = []
    for _ in range(steps):
        start = time.perf_counter()
        bound.session.run_with_iobinding(bound.binding)
        session.append(time.perf_counter() - start)
    ex.close()

    model = llmbuild.load(artifact, backend="onnxruntime", threads=threads)
    try:
        bench = run_bench(model, new_tokens=64, batch=1, repeats=3)
    finally:
        model.close()

    step_us = total / runs
    print(f"\n### {artifact.name} ({threads} threads, {runs} decode steps profiled, "
          f"load average {os.getloadavg()[0]:.1f})\n")
    print("| part of a decode step | µs per step | share of model_run |")
    print("|---|---:|---:|")
    for op, us in sorted(ops.items(), key=lambda x: -x[1]):
        print(f"| {op} | {us / runs:.0f} | {100 * us / total:.1f} % |")
    outside = total - sum(ops.values())
    print(f"| model_run outside nodes (ORT's own) | {outside / runs:.0f} | {100 * outside / total:.1f} % |")
    print(f"| **model_run (profiled)** | {step_us:.0f} | 100 % |")
    med_session, med_forward = statistics.median(session), statistics.median(forward)
    print(f"| run_with_iobinding, no profiler (median) | {1e6 * med_session:.0f} | |")
    print(f"| executor.forward (median; its Python: {1e6 * (med_forward - med_session):.0f} µs) "
          f"| {1e6 * med_forward:.0f} | |")
    print(f"| llmbuild bench decode b1: {bench['decode_batch1_tokens_per_s']:.1f} tok/s, scheduler's Python "
          f"outside the executor {1e3 * bench['python_overhead_ms_batch1']:.0f} µs/step "
          f"| {1e6 / bench['decode_batch1_tokens_per_s']:.0f} | |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    for artifact in args.artifacts:
        one(artifact, args.threads, args.steps)


if __name__ == "__main__":
    main()
