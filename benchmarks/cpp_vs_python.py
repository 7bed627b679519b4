"""Decode tokens/s of the C++ runtime (cpp/, `llmbuild-generate`) vs the Python runtime
(`llmbuild.load(...)`) on SmolLM2-135M-Instruct, both on ONNX Runtime (CPU).

    python benchmarks/cpp_vs_python.py                       # float16 and float32 artifacts
    python benchmarks/cpp_vs_python.py --artifact DIR        # an existing artifact only
    python benchmarks/cpp_vs_python.py --out benchmarks/cpp_vs_python.md

Builds cpp/ with cpp/build.sh, compiles the repository recipe without engines (as
float16 and float32) into benchmarks/_work/, then runs, in rotating order, on the same
chat prompts (greedy, same thread count):

    C++ / Python, graph.file     the artifact's graph as written (Python: cpu_lowering=False)
    C++ / Python, CPU-lowered    the graph rewritten for ONNX Runtime's CPU kernels
                                 (llmbuild/lowering/cpu.py): Python's default at
                                 load time; C++ gets it saved to a file (--graph)

    decode tokens/s   (generated tokens - 1) / (time of the last token - time of the first)
    prefill s         from the request to the first token

C++ times tokens with its streaming callback; Python times the end of each executor
forward pass (the engine runs them in its own thread). Model loading is outside both.
On each graph, C++ and Python must produce the same ids, or the script stops. The table
gives the median over prompts x repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "cpp" / "build" / "llmbuild-generate"
WORK = ROOT / "benchmarks" / "_work"
PROMPTS = [
    "Write a short poem about the ocean.",
    "Give me three tips for learning a new programming language.",
    "Explain what a compiler does in a few sentences.",
]


def build_cpp() -> None:
    subprocess.run(["bash", str(ROOT / "cpp" / "build.sh")], check=True, stdout=subprocess.DEVNULL)


def compile_smollm2(precision: str) -> Path:
    from llmbuild.compile import compile_recipe

    name = f"smollm2-{precision}"
    if (WORK / name / "manifest.json").is_file():
        return WORK / name
    overrides = ["~engines", f"name={name}", f"precision={precision}"]
    return compile_recipe(ROOT / "recipes" / "smollm2-135m-instruct.yaml", overrides, WORK, quiet=True, verify=False)


def run_python(model, prompt: list[int], tokens: int) -> dict:
    """One request; timestamps at the end of each forward pass of the model's executor."""
    times: list[float] = []
    forward = model.executor.forward

    def timed(*args, **kwargs):
        logits = forward(*args, **kwargs)
        times.append(time.perf_counter())
        return logits

    model.executor.forward = timed
    try:
        start = time.perf_counter()
        (g,) = model.generate_ids([prompt], max_new_tokens=tokens)
    finally:
        model.executor.forward = forward
    # The last token needs no forward pass: forwards = prefill + (tokens - 1) decode steps.
    return {"token_ids": g.token_ids, **_rates(start, times)}


def run_cpp(artifact: Path, prompt: list[int], tokens: int, threads: int, graph: Path | None = None) -> dict:
    cmd = [str(CLI), str(artifact), "--prompt-ids", *map(str, prompt), "--max-new-tokens", str(tokens),
           "--threads", str(threads), "--json", *(["--graph", str(graph)] if graph else [])]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"token_ids": out["token_ids"], "first": out["seconds_to_first_token"],
            "decode": out["decode_tokens_per_second"]}


def _rates(start: float, times: list[float]) -> dict:
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {"first": times[0] - start if times else 0.0, "decode": decode}


SIDES = {
    "cpp": "C++, graph.file",
    "python": "Python, graph.file",
    "cpp-lowered": "C++, CPU-lowered",
    "python-lowered": "Python, CPU-lowered (default)",
}


def bench(artifact: Path, tokens: int, repeats: int, threads: int) -> dict:
    from llmbuild.runtime import load
    from llmbuild.lowering.cpu import save_lowered_graph

    lowered_graph = save_lowered_graph(artifact, WORK / f"{artifact.name}-lowered")
    models = {
        "python": load(artifact, backend="onnxruntime", threads=threads, cpu_lowering=False),
        "python-lowered": load(artifact, backend="onnxruntime", threads=threads, cpu_lowering=True),
    }
    run = {
        "cpp": lambda p: run_cpp(artifact, p, tokens, threads),
        "cpp-lowered": lambda p: run_cpp(artifact, p, tokens, threads, lowered_graph),
        "python": lambda p: run_python(models["python"], p, tokens),
        "python-lowered": lambda p: run_python(models["python-lowered"], p, tokens),
    }
    prompts = [models["python"].encode(p, chat=True) for p in PROMPTS]
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    order = list(SIDES)
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            # Rotate the order, so slow drifts in machine load hit every side alike.
            shift = (r * len(prompts) + i) % len(order)
            runs = {side: run[side](prompt) for side in order[shift:] + order[:shift]}
            for cpp, python in (("cpp", "python"), ("cpp-lowered", "python-lowered")):
                if runs[cpp]["token_ids"] != runs[python]["token_ids"]:
                    sys.exit(f"{cpp} and {python} ids differ on {artifact}: {runs}")
            for side, result in runs.items():
                results[side].append(result)
    for model in models.values():
        model.close()
    return results


def table(rows: list[tuple[str, dict]], tokens: int) -> str:
    lines = [
        "| artifact | runtime | decode tokens/s (median) | min - max | prefill s (median) | runs | tokens/run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, results in rows:
        for side, label in SIDES.items():
            runs = results[side]
            decode = [r["decode"] for r in runs]
            first = [r["first"] for r in runs]
            mean_tokens = statistics.mean(len(r["token_ids"]) for r in runs)
            lines.append(
                f"| {name} | {label} | {statistics.median(decode):.2f} | {min(decode):.2f} - {max(decode):.2f} | "
                f"{statistics.median(first):.3f} | {len(runs)} | {mean_tokens:.0f} (max {tokens}) |"
            )
    lines += [
        "",
        "Paired runs (same prompt, back to back), which cancels most of the drift in machine load:",
        "",
        "| artifact | graph | C++ / Python decode tokens/s (median of pairs) | min - max |",
        "| --- | --- | --- | --- |",
    ]
    for name, results in rows:
        for graph, cpp, python in (("graph.file", "cpp", "python"), ("CPU-lowered", "cpp-lowered", "python-lowered")):
            ratios = [c["decode"] / p["decode"] for c, p in zip(results[cpp], results[python])]
            median = statistics.median(ratios)
            lines.append(f"| {name} | {graph} | {median:.2f} | {min(ratios):.2f} - {max(ratios):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, action="append", help="artifact(s) to use instead of compiling")
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (both sides)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()

    build_cpp()
    artifacts = args.artifact or [compile_smollm2("float16"), compile_smollm2("float32")]
    load_before = os.getloadavg()[0]
    rows = [(a.name, bench(a, args.tokens, args.repeats, args.threads)) for a in artifacts]
    load_after = os.getloadavg()[0]
    text = (
        "# C++ vs Python runtime: decode speed on SmolLM2-135M-Instruct (ONNX Runtime, CPU)\n\n"
        "Recorded with `python benchmarks/cpp_vs_python.py --out benchmarks/cpp_vs_python.md` "
        "(method: the script's docstring).\n\n"
        + table(rows, args.tokens)
        + f"\n\n{len(PROMPTS)} chat prompts x {args.repeats} repeats, greedy, {args.threads} ONNX Runtime threads, "
        f"{os.cpu_count()} cores shared with other jobs (1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after). On each graph the C++ and Python ids were identical in every run.\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)

if __name__ == "__main__":
    main()
