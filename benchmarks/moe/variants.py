"""Variants of the routed MoE's CPU graph, decoded side by side in one process (issue #13):
experts in S slices of their width (llmbuild.lowering.moe, EXPERT_SHARDS) and ONNX
Runtime's intra-op workers spinning or blocking between kernels
(llmbuild.runtime.executors.onnxruntime.session_options), against the dense-computed MoE.

    MOE_BENCH_WORK=/tmp/moe-bench python benchmarks/moe/run.py --repeats 0   # builds the artifacts
    MOE_BENCH_WORK=/tmp/moe-bench python benchmarks/moe/variants.py --threads 2 --rounds 8 \\
        s1:block s2:block s2:spin dense:block dense:spin

A variant is GRAPH:WORKERS. GRAPH: sN = the artifact's standard graph lowered for the CPU
with N slices per expert (written as model.cpu.sN.onnx beside model.onnx), dense = run.py's
dense-computed graph (model.dense_moe.onnx). WORKERS: block (llmbuild's default) or spin
(ONNX Runtime's). Every variant has its own session, kept open; each round decodes
--tokens greedy tokens after a 64-token prefill with every variant, in an order that
rotates by one each round. Printed: tok/s per round with the 1-minute load average,
medians, ratios to the last variant, and whether the greedy ids equal the first's.
Each session holds the model's weights: four variants of the 4-layer model need ~6 GB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402


def graph_file(model_dir: Path, name: str) -> Path:
    """The CPU graph of variant `name` (sN lowered here once, dense from run.py)."""
    if name == "dense":
        return bench.dense_moe_graph(model_dir.parent)
    shards = int(name[1:])
    path = model_dir / f"model.cpu.s{shards}.onnx"
    if not path.is_file():
        import onnx_ir as ir

        from llmbuild.lowering import moe
        from llmbuild.lowering.cpu import lower_for_cpu

        model = ir.load(str(model_dir / "model.onnx"))
        with mock.patch.object(moe, "EXPERT_SHARDS", shards):
            lower_for_cpu(model)
        ir.save(model, str(path))  # its initializers still point into model.onnx.data
    return path


def executor(artifact: Path, graph: Path, threads: int, spinning: bool):
    from llmbuild.artifact import read_manifest
    from llmbuild.runtime.executors import onnxruntime as ortx

    manifest = read_manifest(artifact)
    return ortx.OnnxRuntimeExecutor(artifact / manifest["graph"]["file"], num_layers=manifest["model"]["num_layers"],
                                    cache_len=bench.SEQ_LEN, batch_size=1, threads=threads, cpu_graph=graph,
                                    spinning=spinning)


def decode(ex, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    from llmbuild.runtime.executors.base import StepInputs

    def step(tok, pos):
        n = len(tok)
        return int(ex.forward(StepInputs(np.array([tok], np.int64), np.arange(pos, pos + n, dtype=np.int64)[None],
                                         np.array([pos], np.int64), np.array([[n - 1]], np.int64)))[0, -1].argmax())

    ex.reset(1)
    out = [step(prompt, 0)]
    start = time.perf_counter()
    for i in range(tokens):
        out.append(step([out[-1]], len(prompt) + i))
    return tokens / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="GRAPH:WORKERS, e.g. s2:block dense:spin")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192, help="the artifacts' vocabulary (run.py --vocab)")
    args = parser.parse_args()
    artifact = bench.WORK / "artifacts" / "moe"
    sessions = {}
    for v in args.variants:
        name, workers = v.split(":")
        if workers not in ("block", "spin") or not (name == "dense" or (name[:1] == "s" and name[1:].isdigit())):
            sys.exit(f"variant {v}: expected sN:block|spin or dense:block|spin")
        sessions[v] = executor(artifact, graph_file(artifact / "model", name), args.threads, workers == "spin")
    prompt = bench.prompt_ids(args.vocab)[:64]
    speed: dict[str, list[float]] = {v: [] for v in sessions}
    ids = {}
    labels = list(sessions)
    for r in range(args.rounds):
        for v in labels[r % len(labels):] + labels[:r % len(labels)]:
            tok_s, ids[v] = decode(sessions[v], prompt, args.tokens)
            speed[v].append(tok_s)
        print(f"round {r}: " + ", ".join(f"{v} {speed[v][-1]:.2f}" for v in labels)
              + f" tok/s; load average {os.getloadavg()[0]:.1f}", flush=True)
    med = {v: statistics.median(s) for v, s in speed.items()}
    print("median tok/s: " + ", ".join(f"{v} {m:.2f}" for v, m in med.items()))
    print(f"ratio to {labels[-1]}: " + ", ".join(f"{v} {m / med[labels[-1]]:.2f}" for v, m in med.items()))
    print(f"greedy ids equal {labels[0]}'s: " + ", ".join(f"{v} {ids[v] == ids[labels[0]]}" for v in labels))


if __name__ == "__main__":
    main()
