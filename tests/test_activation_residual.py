"""The activation residual of int8 blocks on the CPU (llmbuild.lowering.quantized
`add_activation_residuals`): ONNX Runtime's level-4 MatMulNBits with [â ; r] rows gives
float32-level products where plain level 4 does not."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from llmbuild.lowering.quantized import (add_activation_residuals, fuse_sibling_matmulnbits,
                                         lower_quantized_matmuls)


def _model(k: int, widths: list[int], block: int, rng) -> tuple[ir.Model, list[np.ndarray]]:
    """x [B, S, k] ─DequantizeLinear(int8 [k, n], block)─MatMul─► y_i for each width n
    (siblings reading one activation), and the float weights they dequantize to."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", k]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 24}, name="g")
    weights = []
    for i, n in enumerate(widths):
        codes = rng.integers(-127, 128, (k, n)).astype(np.int8)
        scales = (rng.random((-(-k // block), n)) * 0.02 + 0.001).astype(np.float32)
        q = ir.Value(name=f"q{i}", type=ir.TensorType(ir.DataType.INT8), shape=ir.Shape([k, n]),
                     const_value=ir.tensor(codes, name=f"q{i}"))
        s = ir.Value(name=f"s{i}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(scales.shape)),
                     const_value=ir.tensor(scales, name=f"s{i}"))
        graph.register_initializer(q)
        graph.register_initializer(s)
        dq = ir.node("DequantizeLinear", [q, s], {"axis": 0, "block_size": block}, name=f"dq{i}")
        mm = ir.node("MatMul", [x, dq.outputs[0]], name=f"mm{i}")
        mm.outputs[0].name, mm.outputs[0].type = f"y{i}", ir.TensorType(ir.DataType.FLOAT)
        graph.extend([dq, mm])
        graph.outputs.append(mm.outputs[0])
        weights.append(codes.astype(np.float32) * np.repeat(scales, block, axis=0)[:k])
    return ir.Model(graph, ir_version=10), weights


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _branches(model: ir.Model) -> dict[str, list[ir.Node]]:
    (branch,) = [n for n in model.graph if n.op_type == "If"]
    return {key: list(branch.attributes[key].value) for key in ("then_branch", "else_branch")}


@pytest.mark.parametrize("k, block", [(96, 32), (80, 32), (192, 64)])  # 80: a short last block
def test_activation_residual_is_what_makes_it_exact(k, block):
    """6 rows: the residual branch (level 4 on [â ; r]) is ~1/254 of plain level 4's error;
    with max_rows below 6 the pass takes the level-1 branch (float32 activations)."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    x[0, 1, 5] = 300.0  # an outlier: its block's int8 grid is coarse
    x[1, 2, :block] = 0.0  # an all-zero block (the residual's scale must not divide by zero)
    errors = {}
    for way, residual, max_rows in (("plain", False, 64), ("residual", True, 64), ("float", True, 5)):
        model, weights = _model(k, [48, 16], block, rng=np.random.default_rng(0))
        assert lower_quantized_matmuls(model, int8_block_residual=residual) == 2
        assert fuse_sibling_matmulnbits(model) == 1  # one kernel call, one residual for both
        assert add_activation_residuals(model, max_rows=max_rows) == (1 if residual else 0)
        if residual:
            ops = {key: [n.op_type for n in nodes] for key, nodes in _branches(model).items()}
            assert ops["then_branch"].count("Round") == 1 and ops["then_branch"].count("MatMulNBits") == 1
            assert ops["else_branch"] == ["MatMulNBits"]
            levels = {key: [n.attributes["accuracy_level"].value for n in nodes if n.op_type == "MatMulNBits"]
                      for key, nodes in _branches(model).items()}
            assert levels == {"then_branch": [4], "else_branch": [1]}
        got = _run(model, x)
        ref = [x.astype(np.float64) @ w for w in weights]
        errors[way] = max(float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, ref))
        assert all(np.isfinite(g).all() for g in got)
    # plain level 4: int8 activations, 0.4-3 % of the largest output; with the residual what
    # is left is r's own int8 rounding, about 1/254 of that (measured 1/170-1/250 here)
    assert errors["plain"] > 1e-3
    assert errors["residual"] < min(errors["plain"] / 100, 2e-4), errors
    assert errors["float"] < 1e-5, errors
