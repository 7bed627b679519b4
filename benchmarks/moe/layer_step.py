"""One MoE layer's decode step on ONNX Runtime's CPU provider, constructions side by side
(issue #13): is the fused `com.microsoft.MoE` kernel what keeps the routed model from
streaming its experts as fast as one plain MatMul streams the same bytes?

    python benchmarks/moe/layer_step.py --threads 2 --rounds 8 [--no-prepack]

The layer is the benchmark model's (benchmarks/moe/run.py): hidden 1024, 8 experts of
intermediate 2048 (SwiGLU), top-2, renormalised; random float32 weights (seed 0), so the
8 experts (201 MB) do not fit in any cache and every step streams the two picked
experts' 50 MB. Each call is one token (T = 1) with fresh random router logits (64
cycled), so the picked experts change from step to step. Sessions, all kept open and
timed in turns per round (40 steps each):

    moe        com.microsoft.MoE with each expert in 2 slices of its width, as
               llmbuild/lowering/moe.py builds it (EXPERT_SHARDS = 2)
    if         a per-expert `If` whose then-branch runs that expert's MLP with its own
               constant (pre-packable) MatMul weights, weighted by its routing weight;
               the else-branch returns zeros. Softmax/TopK/renormalisation as HF.
    dense      the two experts' bytes as one dense MLP (one [1024, 8192] gate/up MatMul
               and one [4096, 1024] down MatMul): what a plain MatMul streams
    *-nopack   (--no-prepack) `if` and `dense` with ONNX Runtime's weight pre-packing
               disabled (session.disable_prepacking), so a one-row MatMul goes to MLAS's
               unpacked M = 1 kernel

Printed: the median and best milliseconds per layer-step of every session, and the
largest difference between the `if` and `moe` outputs (they compute the same function).
Not product code: llmbuild lowers routed blocks with `moe` only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

HIDDEN, INTER, EXPERTS, TOP_K, SLICES = 1024, 2048, 8, 2, 2


def weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    gate = rng.standard_normal((EXPERTS, INTER, HIDDEN), np.float32) * 0.02
    up = rng.standard_normal((EXPERTS, INTER, HIDDEN), np.float32) * 0.02
    down = rng.standard_normal((EXPERTS, HIDDEN, INTER), np.float32) * 0.02
    return gate, up, down


def _model(nodes, inputs, initializers):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, HIDDEN])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def moe_model(gate, up, down):
    """com.microsoft.MoE, kernel expert s·E + e = slice s of expert e (llmbuild/lowering/moe.py)."""
    from onnx import helper, numpy_helper

    width = INTER // SLICES
    fc1 = np.zeros((SLICES * EXPERTS, 2 * width, HIDDEN), np.float32)
    fc2 = np.zeros((SLICES * EXPERTS, HIDDEN, width), np.float32)
    for s in range(SLICES):
        for e in range(EXPERTS):
            rows = slice(s * width, (s + 1) * width)
            fc1[s * EXPERTS + e, 0::2], fc1[s * EXPERTS + e, 1::2] = gate[e, rows], up[e, rows]
            fc2[s * EXPERTS + e] = down[e][:, rows] * SLICES
    nodes = [helper.make_node("Concat", ["logits"] * SLICES, ["rows"], axis=1),
             helper.make_node("MoE", ["x", "rows", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=TOP_K * SLICES,
                              activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1)]
    return _model(nodes, [("x", [1, HIDDEN]), ("logits", [1, EXPERTS])],
                  [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")])


def _mlp(prefix: str, w1: str, w2: str, out: str):
    """SwiGLU MLP nodes: x @ w1 -> split gate/up -> silu(gate) * up -> @ w2."""
    from onnx import helper

    p = prefix
    return [helper.make_node("MatMul", ["x", w1], [f"{p}gu"]),
            helper.make_node("Split", [f"{p}gu"], [f"{p}g", f"{p}u"], axis=-1, num_outputs=2),
            helper.make_node("Sigmoid", [f"{p}g"], [f"{p}sg"]),
            helper.make_node("Mul", [f"{p}g", f"{p}sg"], [f"{p}si"]),
            helper.make_node("Mul", [f"{p}si", f"{p}u"], [f"{p}h"]),
            helper.make_node("MatMul", [f"{p}h", w2], [out])]


def if_model(gate, up, down):
    """Per-expert If with constant MatMul weights; the routing as HF's (softmax, top-k, renormalised)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([TOP_K], np.int64), "k"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.zeros((1, HIDDEN), np.float32), "zero")]
    nodes = [helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
             helper.make_node("TopK", ["p", "k"], ["top_p", "top_i"], axis=-1),
             helper.make_node("ReduceSum", ["top_p", "last"], ["top_sum"], keepdims=1),
             helper.make_node("Div", ["top_p", "top_sum"], ["top_w"])]
    acc = "zero"
    for e in range(EXPERTS):
        inits += [numpy_helper.from_array(np.ascontiguousarray(np.concatenate([gate[e], up[e]]).T), f"w1_{e}"),
                  numpy_helper.from_array(np.ascontiguousarray(down[e].T), f"w2_{e}"),
                  numpy_helper.from_array(np.array(e, np.int64), f"id{e}")]
        nodes += [helper.make_node("Equal", ["top_i", f"id{e}"], [f"hit{e}"]),
                  helper.make_node("Cast", [f"hit{e}"], [f"hitf{e}"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"hitf{e}", "top_w"], [f"hitw{e}"]),
                  helper.make_node("ReduceSum", [f"hitw{e}", "last"], [f"w{e}"], keepdims=1),
                  helper.make_node("ReduceMax", [f"hitf{e}"], [f"any{e}"], keepdims=0),
                  helper.make_node("Cast", [f"any{e}"], [f"picked{e}"], to=TensorProto.BOOL)]
        then = helper.make_graph(_mlp(f"e{e}.", f"w1_{e}", f"w2_{e}", f"o{e}")
                                 + [helper.make_node("Mul", [f"o{e}", f"w{e}"], [f"ow{e}"])], f"then{e}", [],
                                 [helper.make_tensor_value_info(f"ow{e}", TensorProto.FLOAT, [1, HIDDEN])])
        other = helper.make_graph([helper.make_node("Identity", ["zero"], [f"z{e}"])], f"else{e}", [],
                                  [helper.make_tensor_value_info(f"z{e}", TensorProto.FLOAT, [1, HIDDEN])])
        nodes += [helper.make_node("If", [f"picked{e}"], [f"r{e}"], then_branch=then, else_branch=other),
                  helper.make_node("Add", [acc, f"r{e}"], [f"acc{e}"])]
        acc = f"acc{e}"
    nodes.append(helper.make_node("Identity", [acc], ["y"]))
    return _model(nodes, [("x", [1, HIDDEN]), ("logits", [1, EXPERTS])], inits)


def dense_model(gate, up, down):
    """Experts 0 and 1 as one dense MLP: the same bytes as a step's two picked experts."""
    from onnx import numpy_helper

    w1 = np.ascontiguousarray(np.concatenate([gate[0], gate[1], up[0], up[1]]).T)  # [H, 4I]: gates, then ups
    w2 = np.ascontiguousarray(np.concatenate([down[0], down[1]], 1).T)  # [2I, H]
    return _model(_mlp("", "w1", "w2", "y"), [("x", [1, HIDDEN])],
                  [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="layer-steps per session per round")
    parser.add_argument("--no-prepack", action="store_true", help="also time if/dense without weight pre-packing")
    args = parser.parse_args()

    def options(prepack: bool):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        return so

    w = weights()
    builds = {"moe": (moe_model, True), "if": (if_model, True), "dense": (dense_model, True)}
    if args.no_prepack:
        builds |= {"if-nopack": (if_model, False), "dense-nopack": (dense_model, False)}
    sessions = {name: ort.InferenceSession(make(*w).SerializeToString(), options(prepack),
                                           providers=["CPUExecutionProvider"])
                for name, (make, prepack) in builds.items()}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, HIDDEN), np.float32)
    logits = [rng.standard_normal((1, EXPERTS), np.float32) for _ in range(64)]
    ref = sessions["moe"].run(None, {"x": x, "logits": logits[0]})[0]
    got = sessions["if"].run(None, {"x": x, "logits": logits[0]})[0]
    print(f"max |moe - if| = {float(np.abs(ref - got).max()):.3g} (outputs up to {float(np.abs(ref).max()):.3g})")
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(args.rounds):
        names = list(sessions)
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
            session, start = sessions[name], time.perf_counter()
            for i in range(args.steps):
                session.run(None, {"x": x} if name.startswith("dense") else {"x": x, "logits": logits[i % 64]})
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    print(f"{args.threads} thread(s), {args.rounds} rounds x {args.steps} steps; ms per layer-step")
    print("| session | median | best |\n| --- | --- | --- |")
    for name, t in times.items():
        print(f"| {name} | {np.median(t):.2f} | {min(t):.2f} |")


if __name__ == "__main__":
    main()
