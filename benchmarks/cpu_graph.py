"""Load time and decode tokens/s of the Python and C++ runtimes before and after the
CPU-ready graph (recipe `runtime: {cpu_graph: true}`, llmbuild/lowering/cpu_graph.py),
on SmolLM2-135M-Instruct (ONNX Runtime, CPU), in one run, side by side.

    python benchmarks/cpu_graph.py --out benchmarks/cpu_graph.md

Compiles each recipe (no engines, no verification) twice into benchmarks/_work/cpu_graph/:
`runtime.cpu_graph=false` ("before": the artifact as compiled before the option existed)
and the default ("after": model/model.cpu.onnx shipped). Then, per prompt, in rotating
order, each side loads the artifact afresh and generates (greedy, same thread count):

    Python, before   llmbuild.load(): lowers the standard graph in memory at every load
    C++, before      llmbuild-generate: runs graph.file (it cannot lower)
    Python, after    llmbuild.load(): the shipped CPU-ready graph, no lowering
    C++, after       llmbuild-generate: the same shipped graph

    load s           Python: llmbuild.load() (manifest, file and sha256 checks, tokenizer,
                     lowering if any, ONNX Runtime session); C++: the llmbuild::Model
                     constructor (manifest, ONNX Runtime session), its `seconds_to_load`
    decode tokens/s  (generated tokens - 1) / (time of the last token - time of the first),
                     as benchmarks/cpp_vs_python.py measures it

The Python and C++ ids on the CPU-ready graph must be equal, and Python's before and
after (the same lowering, at load or at compile) too, or the script stops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_vs_python import PROMPTS, ROOT, WORK, build_cpp, run_cpp, run_python  # noqa: E402

RECIPES = {"float16": "smollm2-135m-instruct.yaml", "int8": "smollm2-135m-instruct-int8.yaml"}
SIDES = {
    "python-before": "Python, lowered at load (before)",
    "cpp-before": "C++, graph.file (before)",
    "python-after": "Python, CPU-ready graph (after)",
    "cpp-after": "C++, CPU-ready graph (after)",
}


def compile_pair(label: str) -> dict[str, Path]:
    from llmbuild.compile import compile_recipe

    out = WORK / "cpu_graph"
    pair = {}
    for when, extra in (("before", ["runtime.cpu_graph=false"]), ("after", [])):
        name = f"smollm2-{label}-{when}"
        if not (out / name / "manifest.json").is_file():
            compile_recipe(ROOT / "recipes" / RECIPES[label], ["~engines", f"name={name}", *extra], out,
                           quiet=True, verify=False)
        pair[when] = out / name
    return pair


def python_side(artifact: Path, prompt: list[int], tokens: int, threads: int) -> dict:
    from llmbuild.runtime import load

    start = time.perf_counter()
    model = load(artifact, backend="onnxruntime", threads=threads)
    seconds = time.perf_counter() - start
    try:
        return {**run_python(model, prompt, tokens), "load": seconds, "graph": model.executor.graph_source}
    finally:
        model.close()


def cpp_side(artifact: Path, prompt: list[int], tokens: int, threads: int) -> dict:
    import json
    import subprocess

    from cpp_vs_python import CLI

    cmd = [str(CLI), str(artifact), "--prompt-ids", *map(str, prompt), "--max-new-tokens", str(tokens),
           "--threads", str(threads), "--json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"token_ids": out["token_ids"], "first": out["seconds_to_first_token"],
            "decode": out["decode_tokens_per_second"], "load": out["seconds_to_load"], "graph": out["graph"]}


def bench(pair: dict[str, Path], tokens: int, repeats: int, threads: int) -> dict[str, list[dict]]:
    from llmbuild.runtime import load

    with load(pair["after"], backend="onnxruntime", threads=threads) as model:
        prompts = [model.encode(p, chat=True) for p in PROMPTS]
    run = {
        "python-before": lambda p: python_side(pair["before"], p, tokens, threads),
        "cpp-before": lambda p: cpp_side(pair["before"], p, tokens, threads),
        "python-after": lambda p: python_side(pair["after"], p, tokens, threads),
        "cpp-after": lambda p: cpp_side(pair["after"], p, tokens, threads),
    }
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    order = list(SIDES)
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            shift = (r * len(prompts) + i) % len(order)  # rotate: load drifts hit every side alike
            runs = {side: run[side](prompt) for side in order[shift:] + order[:shift]}
            ids = {side: runs[side]["token_ids"] for side in ("python-before", "python-after", "cpp-after")}
            if len({tuple(v) for v in ids.values()}) != 1:
                sys.exit(f"ids differ on {pair}: {ids}")
            for side, result in runs.items():
                results[side].append(result)
    return results


def table(rows: list[tuple[str, dict]], tokens: int) -> str:
    lines = [
        "| artifact | runtime | graph run | load s (median) | min - max | decode tokens/s (median) | min - max "
        "| runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, results in rows:
        for side, label in SIDES.items():
            runs = results[side]
            load = [r["load"] for r in runs]
            decode = [r["decode"] for r in runs]
            lines.append(
                f"| {name} | {label} | {runs[0]['graph']} | {statistics.median(load):.2f} | {min(load):.2f} - "
                f"{max(load):.2f} | {statistics.median(decode):.2f} | {min(decode):.2f} - {max(decode):.2f} | "
                f"{len(runs)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=list(RECIPES), action="append", help="default: all")
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per run")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the prompts")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (both sides)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()

    build_cpp()
    pairs = [(label, compile_pair(label)) for label in args.recipe or RECIPES]
    load_before = os.getloadavg()[0]
    rows = [(f"smollm2-{label}", bench(pair, args.tokens, args.repeats, args.threads)) for label, pair in pairs]
    load_after = os.getloadavg()[0]
    text = (
        "# CPU-ready graph: load time and decode speed, Python and C++, before and after\n\n"
        "Recorded with `python benchmarks/cpu_graph.py --out benchmarks/cpu_graph.md` (method: the script's "
        "docstring).\n\n" + table(rows, args.tokens)
        + f"\n\n{len(PROMPTS)} chat prompts x {args.repeats} repeat(s), greedy, at most {args.tokens} new tokens, "
        f"{args.threads} ONNX Runtime threads, each run loading the artifact afresh; {os.cpu_count()} cores shared "
        f"with other engineers' jobs (1-minute load average {load_before:.1f} before, {load_after:.1f} after). "
        "Python (before and after) and C++ (after) produced identical ids in every run.\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
