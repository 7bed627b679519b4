"""Where one layer's calibration statistics pass spends its time, and what GEMMs cost here.

    python benchmarks/quantization/statistics_profile.py [--work /tmp/llmbuild-calib-bench] [--layer 5]
        [--rounds 5] [--threads 2]

1. The layer slice calibrate runs (WORK/reference/layerN.onnx, written by
   calibration_speed.py: the layer's float32 forward plus max|x|, Σ|x| and XᵀX of every
   linear input) on one chunk of 8 × 512 tokens with ONNX Runtime's profiler: wall and CPU
   seconds per chunk, kernel time per op type. Weights and the hidden state are random
   (timing does not depend on their values); the session is calibration's own
   (`ort_session`, with ONNX Runtime's profiler on).
2. GEMM throughput of [4096, 576] × [576, 3072] (a chunk through gate/up) in GFLOPS, in
   one process, one after the other: ONNX Runtime's MatMul (MLAS, float32), numpy's BLAS,
   and torch float32 / bfloat16 if torch is installed (bf16: what AVX512_BF16 would give;
   ONNX Runtime's CPU provider has no bfloat16 MatMul).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def profile_slice(path: Path, threads: int, rounds: int) -> dict:
    from llmbuild.quantize.calibration import decoder_feeds, ort_session

    sess = ort_session(path, threads, profile_prefix=str(Path(tempfile.mkdtemp()) / "slice"))
    rng = np.random.default_rng(0)
    feeds = decoder_feeds(sess, rng.integers(0, 1000, (8, 512)), 3, 64)
    for inp in sess.get_inputs():
        if inp.name not in feeds:  # the hidden state (dynamic shape) and the layer's weights
            shape = [d for d in (inp.shape or []) if isinstance(d, int)]
            shape = shape if shape and len(shape) == len(inp.shape) else [8, 512, 576]
            feeds[inp.name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    warm = 2
    for _ in range(warm):
        sess.run(None, feeds)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        sess.run(None, feeds)
    wall, cpu = (time.perf_counter() - t) / rounds, (time.process_time() - c) / rounds
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    return {"slice": str(path), "wall_ms_per_chunk": round(1e3 * wall, 1), "cpu_ms_per_chunk": round(1e3 * cpu, 1),
            "kernel_ms_per_chunk": {op: round(us / (warm + rounds) / 1e3, 1) for op, us in per_op.most_common()},
            "kernel_share": {op: round(us / total, 3) for op, us in per_op.most_common()}}


def gemm_speed(threads: int, repeat: int = 20) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m, k, n = 4096, 576, 3072
    a = np.random.default_rng(0).standard_normal((m, k), np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), np.float32)
    flops = 2.0 * m * k * n

    def gflops(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        return round(flops * repeat / (time.perf_counter() - t) / 1e9, 1)

    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("a", f, [m, k]), helper.make_tensor_value_info("b", f, [k, n])],
                              [helper.make_tensor_value_info("y", f, [m, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    out = {"shape": [m, k, n], "onnxruntime_float32": gflops(lambda: sess.run(None, {"a": a, "b": b})),
           "numpy_float32": gflops(lambda: a @ b)}
    try:
        import torch
    except ImportError:
        return out
    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out["torch_float32"] = gflops(lambda: ta @ tb)
    ha, hb = ta.bfloat16(), tb.bfloat16()
    out["torch_bfloat16"] = gflops(lambda: ha @ hb)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/llmbuild-calib-bench")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = Path(args.work) / "reference" / f"layer{args.layer}.onnx"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run benchmarks/quantization/calibration_speed.py --work {args.work} first")
    print(json.dumps(profile_slice(path, args.threads, args.rounds)))
    print(json.dumps({"gemm_gflops": gemm_speed(args.threads)}))


if __name__ == "__main__":
    main()
