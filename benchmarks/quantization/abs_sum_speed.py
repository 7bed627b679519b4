"""Σ|x| of one calibration chunk on ONNX Runtime, two ways (llmbuild.quantize.calibration
statistics_nodes): the whole |x| cast to float64 and summed ("f64", the form before
2026-12-02), or float32 sums over runs of 64 rows, then float64 ("p64", ABS_SUM_ROWS).
4096 rows (8 × 512 tokens), 576 and 1536 wide (SmolLM2's linear inputs), 2 threads, best
of 10; prints ms per chunk and the largest relative error against numpy's float64 sum.

    python benchmarks/quantization/abs_sum_speed.py
"""
import numpy as np, onnxruntime as ort, time
from onnx import helper, TensorProto
def model(kind, w, r=64):
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])
    Y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)
    M = helper.make_tensor_value_info("m", TensorProto.FLOAT, None)
    ax0 = helper.make_tensor("ax0", TensorProto.INT64, [1], [0]); ax1 = helper.make_tensor("ax1", TensorProto.INT64, [1], [1])
    shp = helper.make_tensor("shp", TensorProto.INT64, [3], [-1, r, w])
    n = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("ReduceMax", ["a"], ["m"], keepdims=0)]
    if kind == "f64":
        n += [helper.make_node("Cast", ["a"], ["d"], to=TensorProto.DOUBLE), helper.make_node("ReduceSum", ["d", "ax0"], ["y"], keepdims=0)]
    else:
        n += [helper.make_node("Reshape", ["a", "shp"], ["r3"]),
              helper.make_node("ReduceSum", ["r3", "ax1"], ["p"], keepdims=0),
              helper.make_node("Cast", ["p"], ["d"], to=TensorProto.DOUBLE), helper.make_node("ReduceSum", ["d", "ax0"], ["y"], keepdims=0)]
    g = helper.make_graph(n, "g", [X], [Y, M], [ax0, ax1, shp])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()
rng = np.random.default_rng(0)
o = ort.SessionOptions(); o.log_severity_level = 3; o.intra_op_num_threads = 2; o.add_session_config_entry("session.intra_op.allow_spinning", "0")
for w in (576, 1536):
    x = (rng.standard_normal((4096, w)) * np.exp(rng.standard_normal(w))).astype(np.float32)
    ref = np.abs(x).sum(0, dtype=np.float64)
    for kind in ("f64", "p64"):
        s = ort.InferenceSession(model(kind, w), o, providers=["CPUExecutionProvider"])
        s.run(None, {"x": x}); ts = []
        for _ in range(10):
            t0 = time.perf_counter(); y, m = s.run(None, {"x": x}); ts.append(time.perf_counter() - t0)
        print(w, kind, "ms", round(1e3 * min(ts), 2), "max rel err", float(np.max(np.abs(y - ref) / ref)))
