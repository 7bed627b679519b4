"""Output errors of weight changes, tr(ΔᵀHΔ) per column, on ONNX Runtime.

The calibrated searches (AWQ's scales and clip ratios) score every grid point by the
output error of a linear over all calibration rows, Σ_rows (x·δ_j)² = δ_jᵀ H δ_j with
H = Σ xᵀx: one [in, in] × [in, cols] product per point, independent of the token count.
Those products are most of the searches' arithmetic. numpy's BLAS is whatever numpy was
built with (OpenBLAS in the wheels, whose batched products run one small GEMM per
batch); ONNX Runtime's MLAS, which calibration already runs the layers on, measured 2–13×
fewer CPU seconds for these shapes on this machine (benchmarks/quantization/NOTES.md),
with the same float32 arithmetic up to summation order.

    h [..., K, K] ─┐
                   ├─► MatMul ─► hd [..., K, C] ─► Mul(·, d) ─► ReduceSum(axis −2) ─► [..., C]
    d [..., K, C] ─┴──────────────────────────────────┘
"""

from __future__ import annotations

import os
import threading

import numpy as np

_SESSION = None
_LOCK = threading.Lock()


def _session():
    global _SESSION
    with _LOCK:
        if _SESSION is None:
            import onnxruntime as ort
            from onnx import TensorProto, helper

            f = TensorProto.FLOAT
            axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-2])
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["h", "d"], ["hd"]),
                 helper.make_node("Mul", ["hd", "d"], ["prod"]),
                 helper.make_node("ReduceSum", ["prod", "axes"], ["errors"], keepdims=0)],
                "column_quadratic_forms",
                [helper.make_tensor_value_info("h", f, None), helper.make_tensor_value_info("d", f, None)],
                [helper.make_tensor_value_info("errors", f, None)], [axes])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = min(os.cpu_count() or 1, 8)
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            _SESSION = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        return _SESSION


def column_quadratic_forms(h: np.ndarray, d: np.ndarray) -> np.ndarray:
    """δ_jᵀ H δ_j for every column j of `d` [..., K, C], H = `h` [..., K, K] (batched over
    the leading dimensions, which broadcast) → [..., C], in float32."""
    h = np.ascontiguousarray(h, np.float32)
    d = np.ascontiguousarray(d, np.float32)
    return _session().run(None, {"h": h, "d": d})[0]
