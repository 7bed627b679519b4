"""llmbuild's ONNX Runtime executor against its peers on SmolLM2-135M-Instruct, on this
machine, 2 threads each, the same weights everywhere (see prepare.py).

    python benchmarks/runtime/prepare.py --out /tmp/llmbuild-bench     # models, once
    python benchmarks/runtime/compare.py --models /tmp/llmbuild-bench  # figures -> results.json

Every runtime runs in its own process, one after the other (peers.py for the peers,
`llmbuild bench --json` for ours), `--rounds` times; each figure keeps its best value
over the rounds and over earlier runs recorded in the output file (this machine is
shared: the best value is the one least disturbed by other work; the load average of
each round is recorded). The table in README.md is written from results.json by
`--table`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_json(cmd: list[str]) -> dict:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def ours(artifact: Path, threads: int, repeats: int, lowering: bool = True) -> dict:
    cmd = ["llmbuild", "bench", str(artifact), "--backend", "onnxruntime", "--threads", str(threads),
           "--repeats", str(repeats), "--json"]
    if not lowering:
        cmd.append("--no-cpu-lowering")
    return run_json(cmd)


def peer(name: str, model: Path, threads: int, repeats: int) -> dict:
    return run_json([sys.executable, str(HERE / "peers.py"), name, str(model), "--threads", str(threads),
                     "--repeats", str(repeats)])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("/tmp/llmbuild-bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these rows (names as in results.json)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--quantized", type=Path, default=Path("/tmp/llmbuild-quant-bench/artifacts"),
                        help="quantized artifacts (benchmarks/quantization/run.py); rows run when present")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    m, t, r = args.models, args.threads, args.repeats
    rows = {
        "llmbuild ORT, fp32 artifact (CPU lowering)": lambda: ours(m / "smollm2-135m-instruct-fp32", t, r),
        "llmbuild ORT, fp16 artifact (CPU lowering: fp32 compute)": lambda: ours(m / "smollm2-135m-instruct-fp16", t, r),
        "llmbuild ORT, fp32 artifact, standard graph": lambda: ours(m / "smollm2-135m-instruct-fp32", t, r, lowering=False),
        "HF transformers (torch) fp32": lambda: peer("transformers", m / "hf", t, r),
        "llama.cpp F16": lambda: peer("llama.cpp", m / "gguf" / "smollm2-f16.gguf", t, r),
        "llama.cpp Q4_0 (every matrix Q4_0, output too)": lambda: peer("llama.cpp", m / "gguf" / "smollm2-q4_0.gguf",
                                                                       t, r),
        "onnxruntime-genai fp32": lambda: peer("onnxruntime-genai", m / "genai-fp32", t, r),
    }
    q = args.quantized
    for name, path in (("llmbuild ORT, int8 artifact + int8 lm_head", q / "smollm2-int8-head8"),
                       ("llmbuild ORT, int4 AWQ g128 artifact + int8 lm_head", q / "smollm2-int4-awq-g128-head8"),
                       ("llmbuild ORT, int4 g32 artifact + int4 g32 lm_head", q / "smollm2-int4-rtn-g32-head4")):
        if path.is_dir():
            rows[name] = lambda path=path: ours(path, t, r)
    rows["llama.cpp Q8_0"] = lambda: peer("llama.cpp", q.parent / "smollm2-Q8_0.gguf", t, r)
    rows["llama.cpp Q4_0 (llama_model_quantize: 8-bit output)"] = lambda: peer(
        "llama.cpp", q.parent / "smollm2-Q4_0.gguf", t, r)
    if (m / "genai-int4").is_dir():
        rows["onnxruntime-genai int4"] = lambda: peer("onnxruntime-genai", m / "genai-int4", t, r)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("rows", {})
    results["machine"] = {"cpu": _cpu(), "threads": t, "python": platform.python_version()}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            if args.only and name not in args.only:
                continue
            try:
                row = fn() | {"loadavg_1min": os.getloadavg()[0]}
            except (subprocess.CalledProcessError, FileNotFoundError) as e:
                print(f"{name}: failed: {getattr(e, 'stderr', e)}", file=sys.stderr)
                continue
            results["rows"][name] = best(results["rows"].get(name), row)
            args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


LOWER_IS_BETTER = ("_s", "_ms", "_mib", "overhead", "fraction", "loadavg")  # (key fragments)


def best(old: dict | None, new: dict) -> dict:
    """Per figure, the better of two runs (higher tokens/s, lower times and memory)."""
    if not old:
        return new | {"runs": 1}
    out = dict(new)
    for key, value in new.items():
        prev = old.get(key)
        if isinstance(value, (int, float)) and isinstance(prev, (int, float)) and key != "runs":
            lower = any(f in key for f in LOWER_IS_BETTER) and not key.endswith("tokens_per_s")
            out[key] = min(value, prev) if lower else max(value, prev)
    out["runs"] = old.get("runs", 1) + 1
    return out


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def table(results: dict) -> str:
    cols = [("prefill_128_tokens_per_s", "prefill 128 (tok/s)"), ("prefill_1024_tokens_per_s", "prefill 1024 (tok/s)"),
            ("decode_batch1_tokens_per_s", "decode b1 (tok/s)"), ("decode_batch8_tokens_per_s", "decode b8 (tok/s)"),
            ("peak_rss_mib", "peak RSS (MiB)")]
    lines = ["| runtime | " + " | ".join(c for _, c in cols) + " | version |", "|---|" + "---:|" * len(cols) + "---|"]
    for name, row in results["rows"].items():
        cells = [("—" if row.get(k) is None else f"{row[k]:.0f}" if k != "decode_batch1_tokens_per_s" and k != "decode_batch8_tokens_per_s" else f"{row[k]:.1f}") for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row.get('version', 'llmbuild')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
