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
"""

from __future__ import annotations

import argparse
import json
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/llmbuild-quant-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="fp16,int8,int8-head8,int4-awq-g128,int4-awq-g128-head8,int4-rtn-g32-head4,genai int4,"
                                      "llama.cpp Q4_0,llama.cpp Q8_0")
    ap.add_argument("--genai", default="/tmp/llmbuild-bench/genai-int4",
                    help="onnxruntime-genai int4 model (benchmarks/runtime/prepare.py)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.one, args.threads)
    work = Path(args.work)
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
