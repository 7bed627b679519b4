"""int8 in blocks (`group_size: 32`) on the CPU runtime: the lowering's choices for its
MatMulNBits side by side in one process, against the float32 artifact — decode and
prefill speed, and greedy agreement on the 5 chat prompts of run.py.

    python benchmarks/quantization/int8_blocks.py [--work /tmp/llmbuild-int8-blocks] [--rounds 5] [--tokens 64]

Two artifacts of SmolLM2-135M-Instruct (compiled into WORK if missing, no engines):
float32, and int8 g32 float32 (`quantization.weights.scheme=int8 group_size=32`). Rows
(llmbuild.lowering.cpu.save_lowered_graph of the int8 artifact with these options):

    level 1      MatMulNBits at accuracy level 1 (float32 activations): what the lowering
                 shipped for int8 blocks until 2026-12-02
    level 4      plain level 4 (int8 activations per block inside the kernel)
    residual     level 4 on [â ; r] for passes of <= 64 rows, level 1 above
                 (lowering.quantized.add_activation_residuals): what the lowering ships

Each round every row (and the float32 artifact) in turn: a 128- and a 1024-token prefill
(random ids, passes of max_input_len), then --decode-tokens greedy steps after the
128-token prompt; tokens/s best and median over rounds. Greedy: each chat prompt, --tokens
new tokens, the first index where a row leaves the float32 artifact's continuation
(-1: identical), and where it leaves level 1's (the exact lowering of the same weights).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "runtime"))
sys.path.insert(0, str(Path(__file__).parent))

ROWS = {"level 1": {"int8_block_accuracy_level": 1}, "level 4": {"int8_block_residual": False}, "residual": {}}


def compile_artifacts(work: Path) -> tuple[Path, Path]:
    llmbuild = str(Path(sys.executable).parent / "llmbuild")
    recipe = str(ROOT / "recipes" / "smollm2-135m-instruct.yaml")
    out = {}
    for name, extra in (("fp32", ["~quantization"]),
                        ("int8-g32", ["quantization.weights.scheme=int8", "quantization.weights.group_size=32"])):
        art = work / name / "smollm2-135m-instruct"
        if not (art / "manifest.json").is_file():
            subprocess.run([llmbuild, "compile", recipe, "-o", str(work / name), "precision=float32", "~engines",
                            "verify.enabled=false", *extra], check=True)
        out[name] = art
    return out["fp32"], out["int8-g32"]


def greedy(ex, prompt: list[int], tokens: int, eos: set[int]) -> list[int]:
    from llmbuild.runtime.executors.base import StepInputs

    n = len(prompt)
    logits = ex.forward(StepInputs(np.array([prompt]), np.arange(n)[None], np.array([0]), np.array([[n - 1]])))
    out = [int(logits[0, -1].argmax())]
    while len(out) < tokens and out[-1] not in eos:
        pos = n + len(out) - 1
        logits = ex.forward(StepInputs(np.array([[out[-1]]]), np.array([[pos]]), np.array([pos]), np.array([[0]])))
        out.append(int(logits[0, -1].argmax()))
    return out


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), -1 if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmbuild-int8-blocks"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per chat prompt")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from executor_steps import chunked_prefill
    from run import PROMPTS, chat_prompts

    from llmbuild.artifact import read_manifest
    from llmbuild.lowering.cpu import save_lowered_graph
    from llmbuild.runtime.executors.base import StepInputs
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    fp32, int8 = compile_artifacts(args.work)
    runners = {}
    for name, art, options in [("float32", fp32, None), *((r, int8, o) for r, o in ROWS.items())]:
        m = read_manifest(art)
        graph = None if options is None else save_lowered_graph(art, args.work / "graphs" / name.replace(" ", "-"),
                                                                **options)
        runners[name] = OnnxRuntimeExecutor(art / m["graph"]["file"], num_layers=m["model"]["num_layers"],
                                            cache_len=m["limits"]["max_seq_len"], threads=args.threads,
                                            cpu_graph=graph), m["limits"]["max_input_len"]
        print(f"  loaded {name}", file=sys.stderr, flush=True)

    prompts, eos = chat_prompts(fp32)
    continuations = {name: [greedy(ex, p, args.tokens, eos) for p in prompts] for name, (ex, _) in runners.items()}
    agreement = {name: {"vs_float32": [first_divergence(c, ref) for c, ref in zip(cont, continuations["float32"])],
                        "vs_level_1": [first_divergence(c, ref) for c, ref in zip(cont, continuations["level 1"])]}
                 for name, cont in continuations.items()}

    lengths = (128, 1024)
    ids = {n: np.random.default_rng(n).integers(100, 40000, n).tolist() for n in lengths}
    prefill = {(name, n): [] for name in runners for n in lengths}
    decode = {name: [] for name in runners}
    loads = []
    for ex, chunk in runners.values():  # warm-up: both branches of the residual's If, every pass shape
        for n in lengths:
            chunked_prefill(ex, ids[n], chunk)
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for name in order:
            ex, chunk = runners[name]
            for n in lengths:
                t0 = time.perf_counter()
                chunked_prefill(ex, ids[n], chunk)
                prefill[(name, n)].append(time.perf_counter() - t0)
            token = chunked_prefill(ex, ids[128], chunk)
            steps = []
            for i in range(args.decode_tokens):
                pos = 128 + i
                t0 = time.perf_counter()
                logits = ex.forward(StepInputs(np.array([[token]]), np.array([[pos]]), np.array([pos]),
                                               np.array([[0]])))
                token = int(logits[0, -1].argmax())
                steps.append(time.perf_counter() - t0)
            decode[name].append(1 / statistics.median(steps[1:]))
        loads.append(round(os.getloadavg()[0], 2))
        print(f"  round {r + 1}/{args.rounds}, load {loads[-1]}", file=sys.stderr, flush=True)

    rows = {}
    for name in runners:
        rows[name] = {"decode_b1_tok_s_best": round(max(decode[name]), 1),
                      "decode_b1_tok_s_median": round(statistics.median(decode[name]), 1),
                      **{f"prefill_{n}_tok_s_best": round(n / min(prefill[(name, n)]), 1) for n in lengths},
                      **{f"prefill_{n}_tok_s_median": round(n / statistics.median(prefill[(name, n)]), 1)
                         for n in lengths},
                      "greedy_first_divergence": agreement[name]}
    report = {"threads": args.threads, "rounds": args.rounds, "load_average_per_round": loads,
              "greedy_tokens": args.tokens, "prompts": PROMPTS, "rows": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print("| row | decode b1 tok/s best / median | prefill 128 best / median | prefill 1024 best / median "
          "| greedy vs float32 | greedy vs level 1 |\n|---|---:|---:|---:|---|---|")
    for name, row in rows.items():
        g = row["greedy_first_divergence"]
        print(f"| {name} | {row['decode_b1_tok_s_best']} / {row['decode_b1_tok_s_median']} | "
              f"{row['prefill_128_tok_s_best']} / {row['prefill_128_tok_s_median']} | "
              f"{row['prefill_1024_tok_s_best']} / {row['prefill_1024_tok_s_median']} | "
              f"{', '.join(map(str, g['vs_float32']))} | {', '.join(map(str, g['vs_level_1']))} |")


if __name__ == "__main__":
    main()
