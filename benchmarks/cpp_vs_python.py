"""Decode tokens/s of the C++ runtime (cpp/, `llmbuild-generate`) vs the Python runtime
(`llmbuild.load(...)`) on SmolLM2-135M-Instruct, both on ONNX Runtime (CPU).

    python benchmarks/cpp_vs_python.py                       # float16 and float32 artifacts
    python benchmarks/cpp_vs_python.py --artifact DIR        # an existing artifact only
    python benchmarks/cpp_vs_python.py --out benchmarks/cpp_vs_python.md

Builds cpp/ with cpp/build.sh, compiles the repository recipe without engines (as
float16 and float32) into benchmarks/_work/, then runs, alternately, on the same chat
prompts (greedy, same thread count):

    C++                     the artifact's graph as written (graph.file)
    Python, same graph      load(..., cpu_lowering=False): the same graph
    Python, CPU-lowered     load(...) as a user gets it: the graph rewritten at load time
                            for ONNX Runtime's CPU kernels (llmbuild/runtime/cpu_lowering.py)

    decode tokens/s   (generated tokens - 1) / (time of the last token - time of the first)
    prefill s         from the request to the first token

C++ times tokens with its streaming callback; Python times the end of each executor
forward pass (the engine runs them in its own thread). Model loading is outside both.
C++ and "Python, same graph" must produce the same ids, or the script stops. The table
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


def run_cpp(artifact: Path, prompt: list[int], tokens: int, threads: int) -> dict:
    cmd = [str(CLI), str(artifact), "--prompt-ids", *map(str, prompt), "--max-new-tokens", str(tokens),
           "--threads", str(threads), "--json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"token_ids": out["token_ids"], "first": out["seconds_to_first_token"],
            "decode": out["decode_tokens_per_second"]}


def _rates(start: float, times: list[float]) -> dict:
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {"first": times[0] - start if times else 0.0, "decode": decode}


SIDES = {"cpp": "C++", "python": "Python, same graph", "python-lowered": "Python, CPU-lowered"}


def bench(artifact: Path, tokens: int, repeats: int, threads: int) -> dict:
    from llmbuild.runtime import load

    models = {
        "python": load(artifact, backend="onnxruntime", threads=threads, cpu_lowering=False),
        "python-lowered": load(artifact, backend="onnxruntime", threads=threads),
    }
    prompts = [models["python"].encode(p, chat=True) for p in PROMPTS]
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(repeats):
        for prompt in prompts:
            # Rotate the order, so slow drifts in machine load hit every side.
            sides = list(SIDES)[r % 3:] + list(SIDES)[: r % 3]
            runs = {}
            for side in sides:
                runs[side] = run_cpp(artifact, prompt, tokens, threads) if side == "cpp" else run_python(
                    models[side], prompt, tokens)
            if runs["python"]["token_ids"] != runs["cpp"]["token_ids"]:
                sys.exit(f"token ids differ between the runtimes on {artifact}: {runs}")
            runs["python-lowered"]["same_ids"] = runs["python-lowered"]["token_ids"] == runs["cpp"]["token_ids"]
            for side in sides:
                results[side].append(runs[side])
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
            if side == "python-lowered":
                same = sum(r["same_ids"] for r in runs)
                label += f" (ids = C++ in {same}/{len(runs)})"
            lines.append(
                f"| {name} | {label} | {statistics.median(decode):.2f} | {min(decode):.2f} - {max(decode):.2f} | "
                f"{statistics.median(first):.3f} | {len(runs)} | {mean_tokens:.0f} (max {tokens}) |"
            )
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
    text = table(rows, args.tokens) + (
        f"\n\n{len(PROMPTS)} chat prompts x {args.repeats} repeats, greedy, {args.threads} threads, "
        f"{os.cpu_count()} cores; 1-minute load average {load_before:.1f} before, {load_after:.1f} after.\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
