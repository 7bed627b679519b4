"""Weight quantization schemes: a named registry of small objects, each a pure numpy
reference of exactly what the graph's `DequantizeLinear` computes.

Weights arrive as the graph stores them, `[in, out]` (the HF `[out, in]` transposed).

| scheme | codes          | scale (graph dtype)          | DequantizeLinear          |
|--------|----------------|------------------------------|---------------------------|
| int8   | int8 [-127,127]| per output channel: [out]    | axis=1                    |
| int4   | int4 [-8, 7]   | per block of `group_size`    | axis=0, block_size=group  |
|        |                | input rows: [ceil(in/g), out]|                           |
| fp8    | float8e4m3fn   | one per tensor: []           | (per tensor)              |

int4 is symmetric (w ≈ s·q, s = max|w|/7) or asymmetric (w ≈ s·(q − z), 16 levels
from min(w, 0) to max(w, 0); codes and zero points are stored shifted by −8 as signed int4,
because TensorRT reads only signed int4). The last block may be shorter than the group
(576 input rows in groups of 128: four full blocks and one of 64); ONNX allows that
and both ONNX Runtime and TensorRT accept it.

Scales are rounded to the graph's dtype *before* the codes are computed, so the
dequantized reference here is bit-for-bit what DequantizeLinear produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # largest finite float8e4m3fn


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes + scales of one weight, in the layout the graph stores."""

    scheme: str
    data: np.ndarray  # int8 codes (int8 and int4 schemes) or float8_e4m3fn values, [in, out]
    scale: np.ndarray  # float32 holding values exactly representable in the graph dtype
    zero_point: np.ndarray | None = None  # int4 asymmetric: shifted zero points (int8 in [-8, 7])
    axis: int | None = None  # DequantizeLinear axis (None: per tensor)
    block_size: int | None = None

    def dequantize(self) -> np.ndarray:
        """The float32 weight the graph computes with."""
        codes = self.data.astype(np.float32)
        if self.block_size:
            scale = _expand_blocks(self.scale, self.block_size, codes.shape[0])
            if self.zero_point is not None:
                codes = codes - _expand_blocks(self.zero_point.astype(np.float32), self.block_size, codes.shape[0])
            return codes * scale
        if self.axis == 1:
            return codes * self.scale[None, :]
        return codes * self.scale

    @property
    def storage_bytes(self) -> int:
        """Bytes of codes + scales (+ zero points) as stored in the graph, scales at 2 bytes."""
        bits = {"int4": 4, "int8": 8, "fp8": 8}[self.scheme]
        n = (self.data.size * bits + 7) // 8 + 2 * self.scale.size
        if self.zero_point is not None:
            n += 2 * self.zero_point.size  # stored as the folded offset -s*z (graph dtype)
        return n


def _expand_blocks(per_block: np.ndarray, block: int, rows: int) -> np.ndarray:
    """[G, out] → [rows, out]: every block value repeated over its rows (last block may be short)."""
    return np.repeat(per_block, block, axis=0)[:rows]


def _round_scale(scale: np.ndarray, scale_dtype) -> np.ndarray:
    """Scales as the graph stores them (float16 …), back in float32; never 0 or subnormal-0."""
    s = np.asarray(scale, np.float32).astype(scale_dtype).astype(np.float32)
    # An all-zero block/channel gets the smallest normal scale (its codes are all 0).
    tiny = np.float32(ml_dtypes.finfo(scale_dtype).tiny)
    return np.where(s > 0, s, tiny).astype(np.float32)


def _check_matrix(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [in, out] weight, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weight has non-finite values")
    return w


class Int8:
    """Symmetric int8, one scale per output channel."""

    name = "int8"

    def __init__(self, **params):
        _no_params(self.name, params)

    def quantize(self, w: np.ndarray, scale_dtype=np.float16, shrink: np.ndarray | None = None) -> QuantizedTensor:
        w = _check_matrix(w)
        amax = np.abs(w).max(axis=0)
        if shrink is not None:
            amax = amax * shrink
        scale = _round_scale(amax / 127.0, scale_dtype)
        q = np.clip(np.rint(w / scale[None, :]), -127, 127).astype(np.int8)
        return QuantizedTensor(self.name, q, scale, axis=1)

    def describe(self) -> str:
        return "int8 per-channel"


class Int4:
    """Blockwise int4 along the input dimension, symmetric or with zero points."""

    name = "int4"
    GROUP_SIZES = (32, 64, 128)

    def __init__(self, group_size: int = 128, symmetric: bool = True, **params):
        _no_params(self.name, params)
        if group_size not in self.GROUP_SIZES:
            raise ValueError(f"int4 group_size {group_size}: expected one of {list(self.GROUP_SIZES)}")
        self.group_size = int(group_size)
        self.symmetric = bool(symmetric)

    def num_groups(self, rows: int) -> int:
        return -(-rows // self.group_size)

    def _blocks(self, w: np.ndarray) -> np.ndarray:
        """[in, out] → [G, group, out]; a short last block is padded with its own last row
        (which changes neither its max |w| nor its min/max)."""
        g = self.num_groups(w.shape[0])
        pad = g * self.group_size - w.shape[0]
        if pad:
            w = np.concatenate([w, np.repeat(w[-1:], pad, axis=0)], axis=0)
        return w.reshape(g, self.group_size, w.shape[1])

    def params(self, w: np.ndarray, scale_dtype=np.float16, shrink: np.ndarray | None = None):
        """Scales and (shifted) zero points [G, out] of `w` [in, out]; `shrink` [G, out] in
        (0, 1] narrows the range (AWQ's clipping search)."""
        blocks = self._blocks(_check_matrix(w))
        if self.symmetric:
            amax = np.abs(blocks).max(axis=1)
            if shrink is not None:
                amax = amax * shrink
            return _round_scale(amax / 7.0, scale_dtype), None
        # the range always includes 0 (as GPTQ's quantizer): an all-positive block would
        # otherwise need a zero point outside the 16 codes and clip its largest values
        lo, hi = np.minimum(blocks.min(axis=1), 0), np.maximum(blocks.max(axis=1), 0)
        if shrink is not None:
            lo, hi = lo * shrink, hi * shrink
        scale = _round_scale((hi - lo) / 15.0, scale_dtype)
        zero = np.clip(np.rint(-lo / scale), 0, 15)
        return scale, (zero - 8).astype(np.int8)

    def codes(self, w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
        """int8 codes in [-8, 7] of `w` [rows, out] given per-block params [G, out] that
        start at row 0 of `w` (GPTQ calls this on slices whose rows lie in one block)."""
        rows = w.shape[0]
        s = _expand_blocks(scale, self.group_size, rows)
        if zero is None:
            return np.clip(np.rint(w / s), -8, 7).astype(np.int8)
        z = _expand_blocks(zero.astype(np.float32) + 8, self.group_size, rows)
        return (np.clip(np.rint(w / s) + z, 0, 15) - 8).astype(np.int8)

    def quantize(self, w: np.ndarray, scale_dtype=np.float16, shrink: np.ndarray | None = None) -> QuantizedTensor:
        w = _check_matrix(w)
        scale, zero = self.params(w, scale_dtype, shrink)
        return QuantizedTensor(self.name, self.codes(w, scale, zero), scale, zero, axis=0, block_size=self.group_size)

    def describe(self) -> str:
        return f"int4 g{self.group_size} {'sym' if self.symmetric else 'asym'}"


class Fp8:
    """float8 E4M3 weights, one scale per tensor (activations: see `fp8_activation_scale`)."""

    name = "fp8"

    def __init__(self, **params):
        _no_params(self.name, params)

    def quantize(self, w: np.ndarray, scale_dtype=np.float16, shrink: np.ndarray | None = None) -> QuantizedTensor:
        w = _check_matrix(w)
        amax = float(np.abs(w).max()) * (float(np.max(shrink)) if shrink is not None else 1.0)
        scale = _round_scale(np.array(amax / FP8_MAX, np.float32), scale_dtype)
        q = fp8_cast(w / scale)
        return QuantizedTensor(self.name, q, scale)

    def describe(self) -> str:
        return "fp8 e4m3 per-tensor (weights + activations)"


def fp8_cast(x: np.ndarray) -> np.ndarray:
    """Round to float8e4m3fn, saturating at ±448 (QuantizeLinear's saturate=1)."""
    return np.clip(np.asarray(x, np.float32), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def fp8_activation_scale(amax: float, scale_dtype=np.float16) -> np.ndarray:
    """Per-tensor activation scale from the calibrated max |x|."""
    return _round_scale(np.array(max(float(amax), 1e-6) / FP8_MAX, np.float32), scale_dtype)


def fp8_fake_quant(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """QuantizeLinear → DequantizeLinear of an activation, as the graph does it."""
    return fp8_cast(np.asarray(x, np.float32) / np.float32(scale)).astype(np.float32) * np.float32(scale)


def _no_params(name: str, params: dict) -> None:
    unknown = {k: v for k, v in params.items() if v is not None}
    if unknown:
        raise ValueError(f"scheme {name} takes no {', '.join(sorted(unknown))}")


# The registry: recipe name -> scheme class. "none" (keep the weight) is not a scheme.
SCHEMES: dict[str, type] = {"int8": Int8, "int4": Int4, "fp8": Fp8}
SCHEME_NAMES = (*SCHEMES, "none")


def make_scheme(name: str, **params):
    """A scheme object from its registry name and parameters (group_size, symmetric)."""
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; expected one of {list(SCHEME_NAMES)}")
    cls = SCHEMES[name]
    if cls is not Int4:
        params = {k: v for k, v in params.items() if k not in ("group_size", "symmetric") or v is None}
    return cls(**{k: v for k, v in params.items() if v is not None})
