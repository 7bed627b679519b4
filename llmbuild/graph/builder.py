"""A thin layer over `onnx_ir.tape.Tape` for writing decoder graphs as plain math.

The model files (`llmbuild/models/<arch>/`) compose the blocks of `llmbuild.graph.blocks`
over this builder; each block that emits more than one node starts with a diagram of
the subgraph it builds.
Weights enter as `onnx_ir.LazyTensor`s so that nothing is read from the source until
the graph is saved, one tensor at a time.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

OPSET = 24
# Value.meta key of a weight initializer's source loader: () -> np.ndarray in graph layout.
SOURCE_LOADER = "llmbuild.source_loader"
IR_VERSION = 11

DTYPES = {
    "float32": ir.DataType.FLOAT,
    "float16": ir.DataType.FLOAT16,
    "bfloat16": ir.DataType.BFLOAT16,
}


def numpy_dtype(precision: str) -> np.dtype:
    if precision == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(precision)


class GraphBuilder:
    """Collects inputs, outputs, nodes and (lazy) initializers of one graph."""

    def __init__(self, precision: str):
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.np_dtype = numpy_dtype(precision)
        self.tape = ir.tape.Tape()
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self._consts = 0

    # -- I/O and constants ---------------------------------------------------------
    def input(self, name: str, dtype: ir.DataType, shape: list[int | str]) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))
        self.inputs.append(value)
        return value

    def output(self, value: ir.Value, name: str, dtype: ir.DataType, shape: list[int | str]):
        value.name = name
        value.shape = ir.Shape(shape)
        value.type = ir.TensorType(dtype)
        self.outputs.append(value)

    def weight(self, name: str, shape: tuple[int, ...], load: Callable[[], np.ndarray]) -> ir.Value:
        """A weight initializer in the compute dtype, read from the source only on save."""
        np_dtype = self.np_dtype

        def materialize() -> ir.TensorProtocol:
            array = load()
            if array.shape != tuple(shape):
                raise ValueError(f"weight {name}: expected shape {tuple(shape)}, got {array.shape}")
            return ir.tensor(np.ascontiguousarray(array.astype(np_dtype, copy=False)), name=name)

        tensor = ir.LazyTensor(materialize, dtype=self.dtype, shape=ir.Shape(shape), name=name)
        value = self.tape.initializer(tensor, name=name)
        # The source-precision loader (not serialized): the quantize stage reads weights
        # through it, before any rounding to the graph dtype (llmbuild.quantize).
        value.meta[SOURCE_LOADER] = load
        return value

    def const(self, array: np.ndarray, name: str | None = None) -> ir.Value:
        """A small constant stored as an initializer (kept inline when saved)."""
        if name is None:
            self._consts += 1
            name = f"const.{self._consts}"
        return self.tape.initializer(ir.tensor(np.asarray(array), name=name), name=name)

    def op(self, op_type: str, inputs, attributes=None, **kwargs) -> ir.Value:
        return self.tape.op(op_type, inputs, attributes, **kwargs)

    # -- building blocks (the rest: llmbuild.graph.blocks) ----------------------------
    def rms_norm(self, x: ir.Value, scale: ir.Value, eps: float) -> ir.Value:
        # Computed in float32 internally (stash_type=1) whatever the graph dtype.
        return self.op("RMSNormalization", [x, scale], {"axis": -1, "epsilon": float(eps), "stash_type": 1})

    # -- finishing -----------------------------------------------------------------
    def model(self, name: str, metadata: dict[str, str] | None = None) -> ir.Model:
        graph = ir.Graph(
            self.inputs,
            self.outputs,
            nodes=self.tape.nodes,
            initializers=self.tape.initializers,
            opset_imports={"": OPSET},
            name=name,
        )
        return ir.Model(
            graph,
            ir_version=IR_VERSION,
            producer_name="llmbuild",
            metadata_props=dict(metadata or {}),
        )
