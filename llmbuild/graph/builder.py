"""A thin layer over `onnx_ir.tape.Tape` for writing decoder graphs as plain math.

The model files (`llmbuild/models/<arch>/`) call the building blocks here; each block
that emits more than one node starts with a diagram of the subgraph it builds.
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

    # -- building blocks -----------------------------------------------------------
    def linear(self, x: ir.Value, w_in_out: ir.Value) -> ir.Value:
        """x @ W with W stored [in, out] (the HF [out, in] weight, transposed)."""
        return self.op("MatMul", [x, w_in_out])

    def rms_norm(self, x: ir.Value, scale: ir.Value, eps: float) -> ir.Value:
        # Computed in float32 internally (stash_type=1) whatever the graph dtype.
        return self.op("RMSNormalization", [x, scale], {"axis": -1, "epsilon": float(eps), "stash_type": 1})

    def split_heads(self, x: ir.Value, num_heads: int, head_dim: int) -> ir.Value:
        """
        x [B, S, H*D] ──Reshape──► [B, S, H, D] ──Transpose──► [B, H, S, D]
        """
        shape = self.const(np.array([0, 0, num_heads, head_dim], np.int64))
        x = self.op("Reshape", [x, shape])
        return self.op("Transpose", [x], {"perm": [0, 2, 1, 3]})

    def merge_heads(self, x: ir.Value, num_heads: int, head_dim: int) -> ir.Value:
        """
        x [B, H, S, D] ──Transpose──► [B, S, H, D] ──Reshape──► [B, S, H*D]
        """
        x = self.op("Transpose", [x], {"perm": [0, 2, 1, 3]})
        shape = self.const(np.array([0, 0, num_heads * head_dim], np.int64))
        return self.op("Reshape", [x, shape])

    def rotary(self, x: ir.Value, cos: ir.Value, sin: ir.Value, position_ids: ir.Value) -> ir.Value:
        # x [B, H, S, D]; cos/sin [max_pos, D/2]; HF's rotate_half layout (not interleaved).
        return self.op("RotaryEmbedding", [x, cos, sin, position_ids], {"interleaved": 0})

    def cached_attention(self, q, k, v, past_k, past_v, write_indices, kv_len, scale: float):
        """
        k [B, Hkv, S, D] ─┐
        past_k ───────────┴─TensorScatter(axis=2, write_indices)──► present_k ─┐
        v, past_v ─────────── TensorScatter(axis=2, write_indices)──► present_v ─┤
        q [B, Hq, S, D] ──────────────────────────────────────────────────────────┴─►
            Attention(is_causal=1, nonpad_kv_seqlen=kv_len) ──► o [B, Hq, S, D]

        kv_len[b] = write_indices[b] + S: attention reads the first kv_len[b] cache rows,
        causal mask aligned to their end (GQA by the head-count ratio of q and k).
        """
        present_k = self.op("TensorScatter", [past_k, k, write_indices], {"axis": 2})
        present_v = self.op("TensorScatter", [past_v, v, write_indices], {"axis": 2})
        attn = self.op(
            "Attention",
            [q, present_k, present_v, None, None, None, kv_len],
            {"is_causal": 1, "scale": float(scale)},
        )
        return attn, present_k, present_v

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
