"""Per-op-type ONNX Runtime profile of one decode step of our CPU graph and of
onnxruntime-genai's builder output, the two sessions taking turns (same threads, same
session options), after a 128-row cache:

    python benchmarks/families/profile_step.py OUT/<family>/out/<family>/model/model.cpu.onnx \\
        OUT/<family>/genai-fp32/model.onnx [--steps 16] [--threads 2]

(OUT: run.py --keep's folder). Both caches are bound as past and present (ours: the
artifact's cache_len rows, genai: prompt + 40 rows, as interleaved.genai sizes them).
Prints, per graph, the step's wall time and per op type the median and minimum over
steps of the summed kernel times (the minimum is the figure that survives a loaded
machine), then the slowest nodes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import numpy as np

PAST = 128


def session(path: str, threads: int, prefix: str):
    import onnxruntime as ort

    from llmbuild.runtime.executors.onnxruntime import session_options

    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def binding(sess, ours: bool, head_dim: int, window: int = 0):
    """An IOBinding for one decode step at position PAST, caches shared past/present
    (genai's windowed layers, whose cache dim is named *sliding*: the window's rows)."""
    import onnxruntime as ort

    b = sess.io_binding()
    for i in sess.get_inputs():
        n = i.name
        fixed = {"input_ids": np.array([[5]], np.int64), "position_ids": np.array([[PAST]], np.int64),
                 "write_indices": np.array([PAST], np.int64), "logits_indices": np.zeros((1, 1), np.int64),
                 "attention_mask": np.ones((1, PAST + 1), np.int64)}
        if n in fixed:
            b.bind_cpu_input(n, fixed[n])
            continue
        rows = int(i.shape[2]) if isinstance(i.shape[2], int) else (512 if ours else PAST + 40)
        if not ours and "sliding" in str(i.shape[2]):
            rows = max(rows, window)
        dim = int(i.shape[3]) if isinstance(i.shape[3], int) else head_dim
        cache = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, int(i.shape[1]), rows, dim), np.float32))
        b.bind_ortvalue_input(n, cache)
        b.bind_ortvalue_output(n.replace("past_key_values", "present").replace("past_", "present_"), cache)
    for o in sess.get_outputs():
        if not o.name.startswith("present"):
            b.bind_output(o.name, "cpu")
    return b


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ours")
    parser.add_argument("genai")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefix", default="/tmp/llmbuild-profile-step")
    args = parser.parse_args()
    sessions = {"ours": session(args.ours, args.threads, f"{args.prefix}-ours"),
                "genai": session(args.genai, args.threads, f"{args.prefix}-genai")}
    head_dim = int(next(i for i in sessions["ours"].get_inputs() if i.name.startswith("past_")).shape[3])
    config = json.loads((Path(args.genai).parent / "genai_config.json").read_text())["model"]["decoder"]
    window = int(config.get("sliding_window", {}).get("window_size", 0))
    bindings = {name: binding(s, name == "ours", head_dim, window) for name, s in sessions.items()}
    wall = collections.defaultdict(list)
    for _ in range(args.steps):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run_with_iobinding(bindings[name])
            wall[name].append(time.perf_counter() - start)
    print(f"{args.steps} steps each, {args.threads} threads, 1-min load average {os.getloadavg()[0]:.1f}")
    for name, s in sessions.items():
        events = [e for e in json.load(open(s.end_profiling()))
                  if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        per_step = len(events) // args.steps
        by_op, by_node = collections.defaultdict(list), collections.defaultdict(list)
        for k in range(args.steps):
            step = collections.defaultdict(float)
            for e in events[k * per_step:(k + 1) * per_step]:
                step[e["args"]["op_name"]] += e["dur"] / 1000
                by_node[e["name"][:-len("_kernel_time")]].append(e["dur"] / 1000)
            for op, ms in step.items():
                by_op[op].append(ms)
        totals = [sum(v[k] for v in by_op.values()) for k in range(args.steps)]
        count = collections.Counter(e["args"]["op_name"] for e in events[:per_step])
        w = [1000 * x for x in wall[name]]
        print(f"\n{name}: step wall median {np.median(w):.1f} ms, best {min(w):.1f}; "
              f"kernel sum median {np.median(totals):.1f}, min {min(totals):.1f} ms")
        for op, ms in sorted(by_op.items(), key=lambda x: -np.median(x[1])):
            if np.median(ms) >= 0.05:
                print(f"  {op:36s} median {np.median(ms):8.2f}  min {min(ms):8.2f} ms  ({count[op]} nodes)")
        print("  slowest nodes (median ms):")
        for node, ms in sorted(by_node.items(), key=lambda x: -np.median(x[1]))[:5]:
            print(f"    {node[:70]:70s} {np.median(ms):8.2f}")


if __name__ == "__main__":
    main()
