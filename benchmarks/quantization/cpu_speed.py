"""CPU decode speed of the quantized SmolLM2 artifacts on the ONNX Runtime executor,
against llama.cpp on the same machine, same protocol — writes cpu_speed.json.

    python benchmarks/quantization/cpu_speed.py [--work /tmp/llmbuild-quant-bench] [--threads 2]

Artifacts come from benchmarks/quantization/run.py (WORK/artifacts), llama.cpp GGUFs
from the same script (WORK/smollm2-Q4_0.gguf …). llmbuild rows run the runtime's bench
(llmbuild.runtime.bench.run_bench, i.e. `llmbuild bench --batch 1`: 64 greedy tokens after
a 128-token random prompt, best of 3) in a child process, once as the runtime loads the
artifact today and once with llmbuild.quantize.cpu_lowering applied first ("+ nbits");
llama.cpp rows run benchmarks/runtime/peers.py (the same protocol). One process at a
time, one after the other.
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


def one(artifact: str, threads: int, explicit: bool) -> None:
    """Child process: bench one artifact, print JSON."""
    sys.path.insert(0, str(ROOT))
    import llmbuild
    from llmbuild.runtime.bench import run_bench

    if explicit:  # the quantize stage's MatMulNBits lowering before the runtime's own
        import llmbuild.runtime.cpu_lowering as runtime_lowering
        from llmbuild.quantize.cpu_lowering import lower_quantized_matmuls

        base = runtime_lowering.lower_for_cpu

        def lower(model):
            lower_quantized_matmuls(model)
            return base(model)

        runtime_lowering.lower_for_cpu = lower
    model = llmbuild.load(artifact, backend="onnxruntime", threads=threads)
    try:
        print(json.dumps(run_bench(model, new_tokens=64, batch=1, repeats=3)))
    finally:
        model.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/llmbuild-quant-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="fp16,int8,int8+nbits,int4-awq-g128,int4-awq-g128+nbits,llama.cpp Q4_0,"
                                      "llama.cpp Q8_0")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--explicit", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.one, args.threads, args.explicit)
    work = Path(args.work)
    path = Path(__file__).parent / "cpu_speed.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for row in args.rows.split(","):
        if row.startswith("llama.cpp "):
            gguf = work / f"smollm2-{row.split()[1]}.gguf"
            cmd = [sys.executable, "benchmarks/runtime/peers.py", "llama.cpp", str(gguf), "--threads", str(args.threads)]
        else:
            name, _, flag = row.partition("+")
            cmd = [sys.executable, __file__, "--one", str(work / "artifacts" / f"smollm2-{name}"),
                   "--threads", str(args.threads)] + (["--explicit"] if flag == "nbits" else [])
        print(f"== {row}", flush=True)
        results[row] = run_json(cmd)
        print(json.dumps({k: v for k, v in results[row].items() if "decode" in k or "prefill" in k}), flush=True)
        path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
