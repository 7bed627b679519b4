"""CPU decode speed of the quantized SmolLM2 artifacts on the ONNX Runtime executor,
against llama.cpp on the same machine, same protocol — writes cpu_speed.json.

    python benchmarks/quantization/cpu_speed.py [--work /tmp/llmbuild-quant-bench] [--threads 2]

Artifacts come from benchmarks/quantization/run.py (WORK/artifacts), llama.cpp GGUFs
from the same script (WORK/smollm2-Q4_0.gguf …). llmbuild rows run `llmbuild bench
--batch 1` (its protocol: 64 greedy tokens after a 128-token random prompt, best of 3);
llama.cpp rows run benchmarks/runtime/peers.py (the same protocol). Each figure is a
separate process, one after the other.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/llmbuild-quant-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="fp16,int8,int4-rtn-g128,int4-awq-g128,llama.cpp Q4_0,llama.cpp Q8_0")
    args = ap.parse_args()
    work = Path(args.work)
    results = {}
    for row in args.rows.split(","):
        if row.startswith("llama.cpp "):
            gguf = work / f"smollm2-{row.split()[1]}.gguf"
            cmd = [sys.executable, "benchmarks/runtime/peers.py", "llama.cpp", str(gguf), "--threads", str(args.threads)]
        else:
            art = work / "artifacts" / f"smollm2-{row}"
            cmd = [sys.executable, "-m", "llmbuild.cli", "bench", str(art), "--backend", "onnxruntime", "--threads",
                   str(args.threads), "--batch", "1", "--json"]
        print(f"== {row}: {' '.join(cmd)}", flush=True)
        r = run_json(cmd)
        results[row] = r
        print(json.dumps({k: v for k, v in r.items() if "decode" in k or "prefill" in k}), flush=True)
    (Path(__file__).parent / "cpu_speed.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
