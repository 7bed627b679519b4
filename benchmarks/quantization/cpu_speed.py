"""CPU decode speed of the quantized SmolLM2 artifacts on the ONNX Runtime executor,
against llama.cpp on the same machine, same protocol — writes cpu_speed.json.

    python benchmarks/quantization/cpu_speed.py [--work /tmp/llmbuild-quant-bench] [--threads 2]

Artifacts come from benchmarks/quantization/run.py (WORK/artifacts), llama.cpp GGUFs
from the same script (WORK/smollm2-Q4_0.gguf …). llmbuild rows run the runtime's bench
(llmbuild.runtime.bench.run_bench, i.e. `llmbuild bench --batch 1`: 64 greedy tokens after
a 128-token random prompt, best of 3) in a child process, the artifact lowered for the
CPU as the runtime loads it (llmbuild.lowering.cpu: MatMulNBits, fused
attention); llama.cpp and onnxruntime-genai rows run benchmarks/runtime/peers.py (the
same protocol; the genai int4 model comes from benchmarks/runtime/prepare.py). One
process at a time, one after the other; run it on a quiet machine.

    python benchmarks/quantization/cpu_speed.py --prefill [--prefill-rows fp16,int8-g32,int8-asym-g32]
        [--levels 1,4] [--lengths 128,512] [--rounds 5]

--prefill: prefill speed side by side in one process (the comparison that holds on a
shared machine): every row's CPU graph (llmbuild.lowering.cpu.save_lowered_graph, the fp16
artifact promoted to float32: "our fp32"; each quantized row at each MatMulNBits accuracy
level, int8 in blocks included: 1 = float32 activations; 4 = int8 activations, for int8
blocks with the activation residual, what compile ships: float32-level, level 1 above 64
rows, lowering.quantized.add_activation_residuals) takes turns, one prompt of each length (random ids, fixed
seed, chunks of max_input_len) per round; prints tokens/s best and median per row and its
ratio to the fp16 row's, and the first token each row predicts (accuracy level 4 may
change it). Graphs and their weight copies go to WORK/cpu-graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out[out.index("{"):])


def one(artifact: str, threads: int) -> None:
    """Child process: bench one artifact, print JSON."""
    sys.path.insert(0, str(ROOT))
    import llmbuild
    from llmbuild.runtime.bench import run_bench

    model = llmbuild.load(artifact, backend="onnxruntime", threads=threads)
    try:
        print(json.dumps(run_bench(model, new_tokens=64, batch=1, repeats=3)))
    finally:
        model.close()


def prefill_report(work: Path, rows: list[str], levels: list[int], lengths: list[int], rounds: int,
                   threads: int) -> dict:
    import statistics
    import time

    import numpy as np

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks" / "runtime"))
    from executor_steps import chunked_prefill
    from llmbuild.artifact import read_manifest
    from llmbuild.lowering.cpu import save_lowered_graph
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    runners = {}
    for row in rows:
        art = work / "artifacts" / f"smollm2-{row}"
        m = read_manifest(art)
        for level in (levels if m.get("quantization") else [None]):
            name = row if level is None else f"{row} level {level}"
            options = {} if level is None else {"int4_accuracy_level": level, "int8_accuracy_level": level,
                                                "int8_block_accuracy_level": level}
            graph = save_lowered_graph(art, work / "cpu-graphs" / name.replace(" ", "-"), **options)
            ex = OnnxRuntimeExecutor(art / m["graph"]["file"], num_layers=m["model"]["num_layers"],
                                     cache_len=m["limits"]["max_seq_len"], threads=threads, cpu_graph=graph)
            runners[name] = ex, m["limits"]["max_input_len"]
            print(f"  loaded {name}", file=sys.stderr, flush=True)
    prompts = {n: np.random.default_rng(n).integers(100, 40000, n).tolist() for n in lengths}

    times = {(name, n): [] for name in runners for n in lengths}
    first = {}
    for (ex, chunk), n in ((r, n) for r in runners.values() for n in lengths):  # warm-up
        chunked_prefill(ex, prompts[n], chunk)
    for r in range(rounds):
        for name, (ex, chunk) in runners.items():
            for n in lengths:
                t0 = time.perf_counter()
                first[(name, n)] = chunked_prefill(ex, prompts[n], chunk)
                times[(name, n)].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    out = {"threads": threads, "rounds": rounds, "load_average_end": [round(x, 2) for x in os.getloadavg()],
           "rows": {}}
    for name in runners:
        for n in lengths:
            t = times[(name, n)]
            ref = times[(rows[0], n)]
            out["rows"][f"{name}, {n} tokens"] = {
                "best_tokens_per_s": round(n / min(t), 1), "median_tokens_per_s": round(n / statistics.median(t), 1),
                f"best_vs_{rows[0]}": round(min(ref) / min(t), 3),
                f"median_vs_{rows[0]}": round(statistics.median(ref) / statistics.median(t), 3),
                "first_token": first[(name, n)]}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/llmbuild-quant-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="fp16,int8,int8-head8,int4-awq-g128,int4-awq-g128-head8,int4-rtn-g32-head4,genai int4,"
                                      "llama.cpp Q4_0,llama.cpp Q8_0")
    ap.add_argument("--genai", default="/tmp/llmbuild-bench/genai-int4",
                    help="onnxruntime-genai int4 model (benchmarks/runtime/prepare.py)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--prefill", action="store_true", help="prefill side by side in one process (see the docstring)")
    ap.add_argument("--prefill-rows", default="fp16,int8-g32,int8-asym-g32", help="--prefill: the first is the reference")
    ap.add_argument("--levels", default="1,4", help="--prefill: MatMulNBits accuracy levels of the quantized rows")
    ap.add_argument("--lengths", default="128,512", help="--prefill: prompt lengths")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.one:
        return one(args.one, args.threads)
    work = Path(args.work)
    if args.prefill:
        report = prefill_report(work, args.prefill_rows.split(","), [int(x) for x in args.levels.split(",")],
                                [int(x) for x in args.lengths.split(",")], args.rounds, args.threads)
        print(json.dumps(report, indent=2))
        return
    path = Path(__file__).parent / "cpu_speed.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for row in args.rows.split(","):
        if row == "genai int4":
            cmd = [sys.executable, "benchmarks/runtime/peers.py", "onnxruntime-genai", args.genai,
                   "--threads", str(args.threads)]
        elif row.startswith("llama.cpp "):
            gguf = work / f"smollm2-{row.split()[1]}.gguf"
            cmd = [sys.executable, "benchmarks/runtime/peers.py", "llama.cpp", str(gguf), "--threads", str(args.threads)]
        else:
            cmd = [sys.executable, __file__, "--one", str(work / "artifacts" / f"smollm2-{row}"),
                   "--threads", str(args.threads)]
        print(f"== {row}", flush=True)
        results[row] = run_json(cmd)
        print(json.dumps({k: v for k, v in results[row].items() if "decode" in k or "prefill" in k}), flush=True)
        path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
