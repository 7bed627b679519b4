"""llmbuild's MatMulNBits kernel (cpp/kernels) against ONNX Runtime's (MLAS) on the weights of
one SmolLM2 decode step: 30 layers × (q/k/v 576→960, o 576→576, gate/up 576→3072, down
1536→576) + the lm_head 576→49152, random codes, as one ONNX graph of 121 MatMulNBits nodes
(84-150 MB of weights: more than the L3 cache, so each pass streams them from memory, as a
decode step does). Each variant runs in its own process (ONNX Runtime's pool spinning, its
default), the variants take turns for `--rounds` rounds, and the table gives each one's
median pass time per round, then the ratio of the medians.

    python benchmarks/quantization/kernel_speed.py [--rounds 4] [--rows 1] [--threads 2]
        [--library cpp/build/libllmbuild_cpu_kernels.so]

`--rows 1` is a decode step of one sequence; more rows show why the executor keeps ONNX
Runtime's kernels for prefill (llmbuild/runtime/kernels.py: MAX_ROWS).
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
LAYER = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}
HEAD = (576, 49152)


def step_model(domain: str, bits: int, block: int, rows: int):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits, nodes, outs = [], [], []

    def linear(name, k, n, x):
        g = -(-k // block)
        codes = rng.integers(0, 256, (n, g, block * bits // 8), dtype=np.uint8)
        scales = rng.random(n * g, dtype=np.float32) * 0.01
        inits.extend([helper.make_tensor(f"B_{name}", TensorProto.UINT8, codes.shape, codes.tobytes(), raw=True),
                      helper.make_tensor(f"S_{name}", TensorProto.FLOAT, scales.shape, scales)])
        nodes.append(helper.make_node("MatMulNBits", [x, f"B_{name}", f"S_{name}"], [f"y_{name}"], domain=domain,
                                      K=k, N=n, bits=bits, block_size=block, accuracy_level=4))
        outs.append(helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [rows, n]))

    for layer in range(30):
        for name, (k, n) in LAYER.items():
            linear(f"{name}{layer}", k, n, "x" if k == 576 else "x2")
    linear("lm_head", *HEAD, "x")
    graph = helper.make_graph(nodes, "step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 576]),
                                              helper.make_tensor_value_info("x2", TensorProto.FLOAT, [rows, 1536])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])


def one(domain: str, bits: int, block: int, rows: int, threads: int, library: str, passes: int) -> dict:
    """Median / p10 seconds per pass of one variant (runs in a child process)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if domain != "com.microsoft":
        opts.register_custom_ops_library(library)
    session = ort.InferenceSession(step_model(domain, bits, block, rows).SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((rows, 576), dtype=np.float32),
            "x2": rng.standard_normal((rows, 1536), dtype=np.float32)}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "p10": float(np.percentile(times, 10))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--library", default=str(ROOT / "cpp" / "build" / "libllmbuild_cpu_kernels.so"))
    ap.add_argument("--variants", default="4:64,4:32,4:128,8:64", help="bits:block, comma-separated")
    ap.add_argument("--child", nargs=3, metavar=("DOMAIN", "BITS", "BLOCK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    passes = 100 if args.rows == 1 else 10
    if args.child:
        domain, bits, block = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(one(domain, bits, block, args.rows, args.threads, args.library, passes)))
        return
    variants = [tuple(int(x) for x in v.split(":")) for v in args.variants.split(",")]
    results: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for bits, block in variants:
            for domain in ("com.microsoft", "ai.llmbuild"):
                out = subprocess.run([sys.executable, __file__, "--child", domain, str(bits), str(block),
                                      "--rows", str(args.rows), "--threads", str(args.threads),
                                      "--library", args.library], capture_output=True, text=True, check=True)
                results.setdefault((bits, block, domain), []).append(json.loads(out.stdout.splitlines()[-1])["median"])
    print(f"\n{args.rows} row(s), {args.threads} threads, {args.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.1f}; median ms per pass of the 121 nodes, one figure per round\n")
    print("| bits | block | ONNX Runtime (MLAS) | llmbuild | MLAS / llmbuild (medians) |")
    print("|---:|---:|---|---|---:|")
    for bits, block in variants:
        theirs, ours = results[(bits, block, "com.microsoft")], results[(bits, block, "ai.llmbuild")]
        fmt = lambda xs: " / ".join(f"{1e3 * x:.2f}" for x in xs)  # noqa: E731
        print(f"| {bits} | {block} | {fmt(theirs)} | {fmt(ours)} | "
              f"{statistics.median(theirs) / statistics.median(ours):.2f}× |")


if __name__ == "__main__":
    main()
