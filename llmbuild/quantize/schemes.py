"""Weight quantization schemes: a named registry of small objects, each a pure numpy
reference of exactly what the graph's `DequantizeLinear` computes.

Weights arrive as the graph stores them, `[in, out]` (the HF `[out, in]` transposed).

| scheme          | codes           | scale (graph dtype)             | DequantizeLinear         | bits/weight |
|-----------------|-----------------|---------------------------------|--------------------------|-------------|
| int8            | int8 [-127,127] | per output channel: [out]       | axis=1                   | 8 + 16/in   |
| int8 g32/64/128 | int8 [-127,127] | per block of `group_size` input | axis=0, block_size=group | 8 + 16/g    |
|                 |                 | rows: [ceil(in/g), out]         |                          | (Q8_0: 8.5) |
| int8 g… asym    | int8 [-128,127] | per block + a float offset      | + a per-block offset     | 8 + 32/g    |
|                 |                 | per block: [ceil(in/g), out]    | term (quantize.graph)    | (g32: 9.0)  |
| int4 g… sym     | int4 [-8, 7]    | per block: [ceil(in/g), out]    | axis=0, block_size=group | 4 + 16/g    |
| int4 g… asym    | int4 [-8, 7]    | per block + a float offset      | + a per-block offset     | 4 + 32/g    |
|                 |                 | per block: [ceil(in/g), out]    | term (quantize.graph)    | (Q4_1: 5.0) |
| fp8             | float8e4m3fn    | one per tensor: []              | (per tensor)             | 8           |
| int4 … s8       | int4 [-8, 7]    | 8-bit codes per block + a       | the tables decoded first | 4 + 8/g (+ 8/g) |
| (`scale_bits:8`)|                 | float32 step per column [out]   | (quantize.graph)         | + 32/in each |

(bits per weight with 16-bit scales and offsets, before int4's padding to whole blocks.)

`scale_bits: 8` (int4, symmetric or not) stores each block's scale, and offset, as an
8-bit code times a float32 step per output column (`coded_params`), as llama.cpp's
K-quants store their sub-block scales (6-bit codes and a float16 step per 256 weights
there; SmolLM2's 576-wide rows do not divide into 256, so llama.cpp falls back to other
formats on most of its tensors): asymmetric int4 g32 costs 4.61 bits per weight at 576
input rows instead of 5.0, and on the Q4_1 source lands close to the source's own grid.

Symmetric int4 uses all 16 levels with a strictly positive scale (TensorRT requires
scales > 0: IDequantizeLayer): per block, the tightest scale that reaches both sides,
s = max(max w / 7, −min w / 8), then a search over a few factors of it (0.76–1.04 and 1.0)
for the least squared error of the block. llama.cpp Q4_0's rule (s = signed extreme / −8)
also uses 16 levels but needs negative scales for blocks whose extreme is positive; on
SmolLM2's weights the searched positive scale has 0.97× Q4_0's RMS error at g32 (0.83× the
old max|w|/7 rule's; benchmarks/quantization/NOTES.md). With a calibrated clip (AWQ's
`shrink`) the clipped tight scale is used as is.

Asymmetric int4 is Q4_1's grid: w = d·u + m with u in [0, 15], d = (max − min)/15 and
m = min, any float (not a zero point on the integer grid). Codes are stored signed,
q = u − 8 (TensorRT reads only signed int4), so w = d·q + o with the per-block offset
o = m + 8·d kept in the graph dtype: `QuantizedTensor.offset` (d here the stored, rounded
d, so the grid's bottom stays at m as in Q4_1).

Asymmetric int8 (blocks only) is the same with 256 levels: u in [0, 255], d = (max − min)/255,
q = u − 128, o = m + 128·d. On a Q4_1 source (SmolLM2's GGUF) each block of 32 is
d₄·u₄ + m with u₄ in [0, 15] using both ends, so max − min = 15·d₄ and d = d₄/17: every
Q4_1 value is a level of asym int8 g32 (u = 17·u₄), up to the rounding of d and o to the
graph dtype (a half ulp of each, times |q| ≤ 128 for d: o is computed from the unrounded d).
Both asymmetric grids come from one helper, `_asym_params(blocks, bits, …)`: they differ
only in the number of levels (2^bits) and in which d (stored or unrounded) the offset takes.

The last block may be shorter than the group (576 input rows in groups of 128: four full
blocks and one of 64); ONNX allows that and both ONNX Runtime and TensorRT accept it.

Scales and offsets are rounded to the graph's dtype *before* the codes are computed, so
the dequantized reference here is what the graph computes with.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # largest finite float8e4m3fn
GROUP_SIZES = (32, 64, 128)  # int4 and int8 blocks along the input dimension
SCALE_BITS = (None, 8)  # int4: scales (+ offsets) in the graph dtype, or 8-bit codes (coded_params)
# Symmetric int4: factors of the tight scale tried per block (least squared error wins).
SCALE_SEARCH = (1.0, *np.round(np.linspace(0.76, 1.04, 15), 2).tolist())


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes + scales of one weight, in the layout the graph stores."""

    scheme: str
    data: np.ndarray  # int8 codes (int8 and int4 schemes) or float8_e4m3fn values, [in, out]
    scale: np.ndarray  # float32 holding values exactly representable in the graph dtype
    offset: np.ndarray | None = None  # asymmetric int4/int8: per-block float offset o, w = s·q + o
    axis: int | None = None  # DequantizeLinear axis (None: per tensor)
    block_size: int | None = None
    # int4 with `scale_bits: 8`: `scale` (and `offset`) are stored as 8-bit codes times a
    # float32 step per output column [out]; `scale`/`offset` hold the decoded values.
    scale_step: np.ndarray | None = None
    offset_step: np.ndarray | None = None

    @property
    def scale_codes(self) -> np.ndarray:
        """int8 [G, out] codes of the scales (`scale_bits: 8`): scale = (code + 128) · scale_step,
        code + 128 in 1..255 (stored signed: TensorRT dequantizes int8, not uint8)."""
        return (_step_codes(self.scale, self.scale_step, 1, 255) - 128).astype(np.int8)

    @property
    def offset_codes(self) -> np.ndarray:
        """int8 [G, out] codes of the offsets (`scale_bits: 8`, asymmetric): offset = code · offset_step."""
        return _step_codes(self.offset, self.offset_step, -127, 127).astype(np.int8)

    def dequantize(self) -> np.ndarray:
        """The float32 weight the graph computes with."""
        codes = self.data.astype(np.float32)
        if self.block_size:
            w = codes * _expand_blocks(self.scale, self.block_size, codes.shape[0])
            if self.offset is not None:
                w = w + _expand_blocks(self.offset, self.block_size, codes.shape[0])
            return w
        if self.axis == 1:
            return codes * self.scale[None, :]
        return codes * self.scale

    @property
    def storage_bytes(self) -> int:
        """Bytes of codes + scales (+ offsets) as stored in the graph, scales at 2 bytes."""
        bits = {"int4": 4, "int8": 8, "fp8": 8}[self.scheme]
        n = (self.data.size * bits + 7) // 8
        for values, step in ((self.scale, self.scale_step), (self.offset, self.offset_step)):
            if values is not None:
                n += 2 * values.size if step is None else values.size + 4 * step.size
        return n


def _step_codes(values: np.ndarray, step: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """rint(values / step) per column, clipped to [lo, hi] (float32)."""
    return np.clip(np.rint(np.asarray(values, np.float32) / step[None, :]), lo, hi)


STEP_BITS = 16  # significant bits of a `scale_bits: 8` step: code · step is exact in float32


def _step(top: np.ndarray, levels: int) -> np.ndarray:
    """float32 step per column: top / levels rounded to STEP_BITS significant bits (so that
    every code · step, |code| ≤ 255, is exact in float32), never 0."""
    tiny = np.float32(np.finfo(np.float32).tiny)
    m, e = np.frexp(np.maximum(np.asarray(top, np.float32) / np.float32(levels), tiny))
    return np.ldexp(np.rint(m * 2.0 ** STEP_BITS) / 2.0 ** STEP_BITS, e).astype(np.float32)


def coded_params(scale: np.ndarray, offset: np.ndarray | None, scale_dtype):
    """`scale_bits: 8`: per-block scales [G, out] (and offsets) stored as 8-bit codes times
    a float32 step per output column, as llama.cpp's K-quants store their sub-block scales
    (6-bit codes there, one float16 step per 256 weights). Scales: codes 1..255 of
    step = max scale / 255 (never 0: TensorRT requires scales > 0); offsets: codes
    −127..127 of step = max |offset| / 127. The decoded values are what the graph computes:
    code · step, exact in float32 (`_step`), rounded once to the graph dtype. Returns
    (scale, offset, scale_step, offset_step), decoded values first."""
    sstep = _step(scale.max(axis=0), 255)
    dec_scale = _round_scale(_step_codes(scale, sstep, 1, 255) * sstep, scale_dtype)
    if offset is None:
        return dec_scale, None, sstep, None
    ostep = _step(np.abs(offset).max(axis=0), 127)
    dec_offset = _round(_step_codes(offset, ostep, -127, 127) * ostep, scale_dtype)
    return dec_scale, dec_offset, sstep, ostep


def _expand_blocks(per_block: np.ndarray, block: int, rows: int) -> np.ndarray:
    """[G, out] → [rows, out]: every block value repeated over its rows (last block may be short)."""
    return np.repeat(per_block, block, axis=0)[:rows]


def _round(x: np.ndarray, dtype) -> np.ndarray:
    """Values as the graph stores them (float16 …), back in float32."""
    return np.asarray(x, np.float32).astype(dtype).astype(np.float32)


def _round_scale(scale: np.ndarray, scale_dtype) -> np.ndarray:
    """Scales as the graph stores them, keeping their sign; never 0 (or a subnormal that
    rounds to 0): an all-zero block/channel gets the smallest normal scale (codes all 0)."""
    s = _round(scale, scale_dtype)
    tiny = np.float32(ml_dtypes.finfo(scale_dtype).tiny)
    return np.where(s != 0, s, tiny).astype(np.float32)


def _blocks(w: np.ndarray, group: int) -> np.ndarray:
    """[in, out] → [G, group, out]; a short last block is padded with its own last row
    (which changes neither its extremes nor its min/max)."""
    g = -(-w.shape[0] // group)
    pad = g * group - w.shape[0]
    if pad:
        w = np.concatenate([w, np.repeat(w[-1:], pad, axis=0)], axis=0)
    return w.reshape(g, group, w.shape[1])


def _asym_params(blocks: np.ndarray, bits: int, scale_dtype, shrink: np.ndarray | None,
                 offset_from_stored_step: bool) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric scales and offsets [G, out] of `blocks` [G, group, out] on a grid of
    2^bits levels: w = d·u + m, u in [0, 2^bits − 1], d = (max − min)/(2^bits − 1), m = min,
    stored as signed codes q = u − 2^(bits−1) and the offset o = m + 2^(bits−1)·d, both
    rounded to the graph dtype. `shrink` [G, out] narrows each range about its middle.

    `offset_from_stored_step` picks the d of o, the one genuine difference between the
    schemes: int4 takes the stored (rounded) d, which keeps the grid's bottom at m as
    Q4_1 does (d·u + m with the stored d); int8 takes the unrounded d, so the rounding of
    d moves w by |q|·δd ≤ 128·δd (from the rounded d all of 255·δd would be at the
    block's top)."""
    steps, half = float(2 ** bits - 1), float(2 ** (bits - 1))
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    if shrink is not None:  # narrow the range about its middle
        mid = (hi + lo) / 2
        lo, hi = mid + (lo - mid) * shrink, mid + (hi - mid) * shrink
    step = (hi - lo) / steps
    scale = _round_scale(step, scale_dtype)
    return scale, _round(lo + half * (scale if offset_from_stored_step else step), scale_dtype)


def _block_codes(w: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, group: int,
                 lo_code: int, hi_code: int) -> np.ndarray:
    """int8 codes in [lo_code, hi_code] of `w` [rows, out] given per-block scales (and
    offsets) [G, out] of `group` rows that start at row 0 of `w`: rint((w − o) / s)."""
    rows = w.shape[0]
    s = _expand_blocks(scale, group, rows)
    if offset is not None:
        w = w - _expand_blocks(offset, group, rows)
    q = np.divide(w, s)
    np.rint(q, out=q)
    return np.clip(q, lo_code, hi_code, out=q).astype(np.int8)


def _check_group(name: str, group_size: int) -> int:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{name} group_size {group_size}: expected one of {list(GROUP_SIZES)}")
    return int(group_size)


def _check_matrix(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [in, out] weight, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weight has non-finite values")
    return w


class Int8:
    """int8 along the input dimension. Symmetric (scale max|w|/127): one scale per output
    channel, or with `group_size` one per block of that many input rows (llama.cpp's Q8_0
    at 32). Asymmetric (`symmetric=False`, blocks only): w = d·u + m per block, u in
    [0, 255], d = (max − min)/255, m = min (any float), stored as signed codes q = u − 128
    and the offset o = m + 128·d (`QuantizedTensor.offset`), as asymmetric int4 does."""

    name = "int8"
    GROUP_SIZES = GROUP_SIZES  # and None: per output channel (the default)

    def __init__(self, group_size: int | None = None, symmetric: bool = True, **params):
        _no_params(self.name, params)
        self.group_size = None if group_size is None else _check_group(self.name, group_size)
        self.symmetric = bool(symmetric)
        if not self.symmetric and self.group_size is None:
            raise ValueError(f"asymmetric int8 needs a group_size (one of {list(GROUP_SIZES)}); "
                             "per output channel it is symmetric only")

    def quantize(self, w: np.ndarray, scale_dtype=np.float16, shrink: np.ndarray | None = None) -> QuantizedTensor:
        w = _check_matrix(w)
        if self.group_size is None:
            amax = np.abs(w).max(axis=0)
            if shrink is not None:
                amax = amax * shrink
            scale = _round_scale(amax / 127.0, scale_dtype)
            q = np.clip(np.rint(w / scale[None, :]), -127, 127).astype(np.int8)
            return QuantizedTensor(self.name, q, scale, axis=1)
        blocks = _blocks(w, self.group_size)
        if self.symmetric:
            amax = np.abs(blocks).max(axis=1)
            if shrink is not None:
                amax = amax * shrink
            scale, offset = _round_scale(amax / 127.0, scale_dtype), None
        else:
            scale, offset = _asym_params(blocks, 8, scale_dtype, shrink, offset_from_stored_step=False)
        q = _block_codes(w, scale, offset, self.group_size, -127 if self.symmetric else -128, 127)
        return QuantizedTensor(self.name, q, scale, offset, axis=0, block_size=self.group_size)

    def describe(self) -> str:
        if self.group_size is None:
            return "int8 per-channel"
        return f"int8 g{self.group_size}" + ("" if self.symmetric else " asym")


class Int4:
    """Blockwise int4 along the input dimension: symmetric (16 levels, a searched positive
    scale) or asymmetric (Q4_1's scale + float offset)."""

    name = "int4"
    GROUP_SIZES = GROUP_SIZES
    SCALE_BITS = SCALE_BITS

    def __init__(self, group_size: int = 128, symmetric: bool = True, scale_bits: int | None = None, **params):
        _no_params(self.name, params)
        self.group_size = _check_group(self.name, group_size)
        self.symmetric = bool(symmetric)
        if scale_bits not in SCALE_BITS:
            raise ValueError(f"int4 scale_bits {scale_bits}: expected one of {[b for b in SCALE_BITS if b]}"
                             " (or none: scales in the graph dtype)")
        self.scale_bits = scale_bits

    def num_groups(self, rows: int) -> int:
        return -(-rows // self.group_size)

    def params(self, w: np.ndarray, scale_dtype=np.float16, shrink: np.ndarray | None = None):
        """Scales and offsets (None when symmetric) [G, out] of `w` [in, out], as the graph
        decodes them; `shrink` [G, out] in (0, 1] narrows the range (AWQ's clipping search)."""
        return self._params(w, scale_dtype, shrink)[:2]

    def _params(self, w: np.ndarray, scale_dtype, shrink: np.ndarray | None, blocks: np.ndarray | None = None):
        """(scale, offset, scale_step, offset_step): the steps are None unless `scale_bits`
        (`blocks`: `w` already cut into blocks, unchecked)."""
        scale, offset = self._float_params(w, scale_dtype, shrink, blocks)
        if self.scale_bits is None:
            return scale, offset, None, None
        return coded_params(scale, offset, scale_dtype)

    def _float_params(self, w: np.ndarray, scale_dtype, shrink: np.ndarray | None, blocks: np.ndarray | None = None):
        if blocks is None:
            blocks = _blocks(_check_matrix(w), self.group_size)
        if self.symmetric:
            # the tightest positive scale that reaches both sides: max w at code 7, min w at -8
            tight = np.maximum(blocks.max(axis=1) / 7.0, -blocks.min(axis=1) / 8.0)
            if shrink is not None:  # a calibrated clip (AWQ) replaces the search
                return _round_scale(tight * shrink, scale_dtype), None
            return _round_scale(tight * self._search_factor(blocks, tight, w.shape[0], scale_dtype), scale_dtype), None
        return _asym_params(blocks, 4, scale_dtype, shrink, offset_from_stored_step=True)

    def default_shrink(self, w: np.ndarray, scale_dtype=np.float16) -> np.ndarray:
        """[G, out]: the `shrink` that gives exactly the scales of `params(w)` without one
        (the searched factors; 1.0 when asymmetric), so a calibrated clip search can fall
        back per channel to what plain quantization does."""
        blocks = _blocks(_check_matrix(w), self.group_size)
        if not self.symmetric:
            return np.ones((blocks.shape[0], blocks.shape[2]), np.float32)
        tight = np.maximum(blocks.max(axis=1) / 7.0, -blocks.min(axis=1) / 8.0)
        return self._search_factor(blocks, tight, w.shape[0], scale_dtype)

    @staticmethod
    def _search_factor(blocks: np.ndarray, tight: np.ndarray, rows: int, scale_dtype) -> np.ndarray:
        """Per block, the factor of `SCALE_SEARCH` whose scale (tight × factor, rounded to
        the graph dtype first, as stored) gives the least squared error; rows that only pad
        a short last block do not count. 1.0 is among the factors, so no block is worse than
        the tight rule."""
        pad = blocks.shape[0] * blocks.shape[1] > rows
        valid = (np.arange(blocks.shape[0] * blocks.shape[1]) < rows).reshape(blocks.shape[:2])[:, :, None]
        best = best_err = None
        e = np.empty_like(blocks)  # one buffer for every factor: (clip(rint(w / s)) · s − w)²
        for factor in SCALE_SEARCH:
            scale = _round_scale(tight * np.float32(factor), scale_dtype)
            np.divide(blocks, scale[:, None, :], out=e)
            np.rint(e, out=e)
            np.clip(e, -8, 7, out=e)
            e *= scale[:, None, :]
            e -= blocks
            np.square(e, out=e)
            if pad:  # rows that only pad a short last block count 0
                e *= valid
            err = e.sum(axis=1)
            if best is None:
                best, best_err = np.full(err.shape, factor, np.float32), err
            else:
                better = err < best_err
                best, best_err = np.where(better, np.float32(factor), best), np.where(better, err, best_err)
        return best.astype(np.float32)

    def codes(self, w: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        """int8 codes in [-8, 7] of `w` [rows, out] given per-block params [G, out] that
        start at row 0 of `w` (GPTQ calls this on slices whose rows lie in one block)."""
        return _block_codes(w, scale, offset, self.group_size, -8, 7)

    def quantize(self, w: np.ndarray, scale_dtype=np.float16, shrink: np.ndarray | None = None) -> QuantizedTensor:
        w = _check_matrix(w)
        scale, offset, sstep, ostep = self._params(w, scale_dtype, shrink)
        return QuantizedTensor(self.name, self.codes(w, scale, offset), scale, offset, axis=0,
                               block_size=self.group_size, scale_step=sstep, offset_step=ostep)

    def fake_quantize(self, w: np.ndarray, scale_dtype=np.float16, shrink: np.ndarray | None = None) -> np.ndarray:
        """`quantize(w, scale_dtype, shrink).dequantize()`, bitwise, without the int8 codes
        or the per-row copies of the block parameters (the same float32 operations on each
        element, the parameters broadcast over their block): what the calibrated searches
        score, once per grid point. `w` must be finite (no check: the searches' variants of
        an already checked weight)."""
        w = np.asarray(w, np.float32)
        rows = w.shape[0]
        blocks = _blocks(w, self.group_size)  # [G, group, out]
        scale, offset, _, _ = self._params(w, scale_dtype, shrink, blocks)
        s = scale[:, None, :]
        q = np.subtract(blocks, offset[:, None, :]) if offset is not None else blocks.copy()
        np.divide(q, s, out=q)
        np.rint(q, out=q)
        np.clip(q, -8, 7, out=q)
        np.multiply(q, s, out=q)
        if offset is not None:
            q += offset[:, None, :]
        return q.reshape(-1, w.shape[1])[:rows]

    def describe(self) -> str:
        coded = f" scales {self.scale_bits}-bit" if self.scale_bits else ""
        return f"int4 g{self.group_size} {'sym' if self.symmetric else 'asym'}{coded}"


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
SCHEME_SETTINGS = {"int4": ("group_size", "symmetric", "scale_bits"), "int8": ("group_size", "symmetric")}


def make_scheme(name: str, **params):
    """A scheme object from its registry name and parameters (group_size, symmetric, scale_bits)."""
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; expected one of {list(SCHEME_NAMES)}")
    cls = SCHEMES[name]
    # group_size / symmetric / scale_bits are ignored by the schemes that have no such setting
    ignored = {"group_size", "symmetric", "scale_bits"} - set(SCHEME_SETTINGS.get(name, ()))
    return cls(**{k: v for k, v in params.items() if v is not None and k not in ignored})
