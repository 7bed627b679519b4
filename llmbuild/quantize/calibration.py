"""Layer-by-layer calibration on ONNX Runtime, from our own float32 graph.

    tokens [N, S] ─► prefix slice (embedding) ─► h₀ [N, S, H]
    for layer i:
        slice i = the nodes between hᵢ and hᵢ₊₁ (+ the statistics of its linears'
                  inputs as outputs); its weights are graph *inputs*, fed from numpy
        pass 1: float weights, all samples in chunks of ~CHUNK_TOKENS tokens (one
                ONNX Runtime call per chunk) → per linear input: max |x|, Σ|x|,
                Σ xᵀx (GPTQ, and AWQ's output errors), computed once per input and
                shared by every linear and algorithm reading it — by nodes added to
                the slice (`statistics_nodes`), so the activations never leave ONNX
                Runtime and XᵀX runs in its multithreaded GEMM (its upper triangle
                only, in block rows); with float propagation also hᵢ₊₁
        quantize the layer (RTN / AWQ / GPTQ), fold AWQ scales into norms / up_proj
        pass 2 (quantized propagation only): the quantized weights → hᵢ₊₁ (later
                layers calibrate on what the quantized model really feeds them, as
                GPTQ does)

`propagate`: "quantized" (pass 2), "float" (hᵢ₊₁ from pass 1, as AutoAWQ: one ONNX
Runtime pass per layer instead of two), "auto" (quantized when any weight uses GPTQ).
With float propagation no layer's input depends on a quantization, so pass 1 of layer
i+1 runs on a worker thread while layer i is quantized (`overlap`; one layer ahead):

    worker:  pass 1 (layer 0) │ pass 1 (layer 1) │ pass 1 (layer 2) │ …
    caller:                   │ quantize layer 0 │ quantize layer 1 │ …

Only one layer's weights (two when overlapped), the hidden states of the calibration
set (two [N, S, H] float32 buffers) and one chunk's activations are in memory at a time; the peak RSS of
the whole stage is measured and reported next to those sizes.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from llmbuild.eval.runners import float_matmuls
from llmbuild.graph import io
from llmbuild.graph.annotations import LINEAR, NORM, SCALE_GROUP, nodes_with
from llmbuild.quantize.algorithms import GPTQ_DAMP, awq_search_clip, awq_search_scales, gptq_inverse, gptq_quantize
from llmbuild.quantize.plan import ModuleSpec, module_name
from llmbuild.quantize.schemes import QuantizedTensor

CHUNK_TOKENS = 4096
# AWQ's searches take H = XᵀX from every k-th calibration row (`quantization.awq.hessian_stride`);
# max |x|, mean |x| and the propagated hidden states always use every row. Unset, k is the
# largest stride up to AWQ_HESSIAN_STRIDE that leaves H at least AWQ_HESSIAN_MIN_ROWS rows
# (`auto_hessian_stride`): 8 for 64 × 512 tokens, H from 4096 rows (AutoAWQ's clip search
# takes 512). Measured on SmolLM2 (RESULTS.md, 2026-12-03): every 4th row against every
# row, 1.3× faster, KL no worse; every 8th against every 4th, 1.13× faster, KL from −2 %
# to +4 % on six int4 rows (an explicit 4 buys those last per cent).
AWQ_HESSIAN_STRIDE = 8
AWQ_HESSIAN_MIN_ROWS = 4096


def auto_hessian_stride(tokens: int) -> int:
    """AWQ's H row stride when the recipe does not set one, for `tokens` calibration tokens."""
    return max(1, min(AWQ_HESSIAN_STRIDE, tokens // AWQ_HESSIAN_MIN_ROWS))


PROPAGATE = ("auto", "quantized", "float")
# Roles of the linears whose outputs form attention scores: AWQ's clipping search skips
# them (as AutoAWQ).
_NO_CLIP = ("q", "k")


@dataclass
class ActStats:
    """Statistics of one linear input (shared by every linear that reads it)."""

    width: int
    amax: float = 0.0
    abs_sum: np.ndarray | None = None
    rows: int = 0
    xtx: np.ndarray | None = None
    _upper_only: bool = False  # xtx holds block rows of the upper triangle until `mirror`

    def update(self, x: np.ndarray, need_xtx: bool, stride: int = 1) -> None:
        """Add the rows of `x` [..., width] (the numpy reference of `statistics_nodes`):
        XᵀX over every `stride`-th of them, from the first."""
        x = x.reshape(-1, self.width)
        xs = x[::stride]
        self.add(np.abs(x).max(), np.abs(x).sum(axis=0, dtype=np.float64), x.shape[0],
                 (xs.T @ xs) if need_xtx else None)

    def add(self, amax, abs_sum: np.ndarray, rows: int, xtx: np.ndarray | dict[int, np.ndarray] | None) -> None:
        """Add one chunk's max |x|, Σ|x| [width] (float64), row count and XᵀX (float32,
        summed here in float64; over every row, or every k-th one as the slice computed
        it): the whole [width, width], or its block rows of the upper triangle
        {r0: XᵀX[r0:r1, r0:]} as `statistics_nodes` computes them (then call `mirror`
        once after the last chunk)."""
        self.amax = max(self.amax, float(amax))
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.rows += int(rows)
        if isinstance(xtx, dict):
            if self.xtx is None:
                self.xtx, self._upper_only = np.zeros((self.width, self.width), np.float64), True
            for r0, block in xtx.items():
                self.xtx[r0:r0 + block.shape[0], r0:] += block
        elif xtx is not None:
            p = np.asarray(xtx, np.float64)
            self.xtx = p if self.xtx is None else self.xtx + p

    def mirror(self) -> None:
        """Complete XᵀX from its upper triangle (exactly symmetric) after block rows."""
        if self._upper_only:  # block rows [r0, r1) hold XᵀX[r0:r1, r0:]
            x = self.xtx
            for r0, r1 in xtx_row_blocks(self.width):
                d = x[r0:r1, r0:r1]  # the diagonal block: its upper triangle, mirrored
                x[r0:r1, r0:r1] = np.triu(d) + np.triu(d, 1).T
                x[r1:, r0:r1] = x[r0:r1, r1:].T  # below it: the block row's right part
            self._upper_only = False

    @property
    def mean_abs(self) -> np.ndarray:
        return (self.abs_sum / max(self.rows, 1)).astype(np.float32)


STAT_OUTPUTS = ("amax", "abs_sum", "xtx")
# XᵀX of an input at least twice this wide is computed in block rows of this many rows,
# each only from its diagonal block rightwards (the upper triangle: (b + 1) / 2b of a
# full product's FLOPs for b blocks). Measured on ONNX Runtime's MLAS, 4096 rows: 1536
# wide in 4 blocks 0.66× the CPU seconds of one Gemm; at 576 no split paid (2 or 3 blocks:
# 0.95–1.2×), hence one product below two blocks.
XTX_BLOCK = 384


def xtx_row_blocks(width: int) -> list[tuple[int, int]]:
    """The block rows [r0, r1) in which `statistics_nodes` computes XᵀX of a [T, width] x."""
    if width < 2 * XTX_BLOCK:
        return [(0, width)]
    return [(r0, min(r0 + XTX_BLOCK, width)) for r0 in range(0, width, XTX_BLOCK)]


def statistics_names(activation: str, width: int, xtx: bool = True) -> dict:
    """Output names of the statistics `statistics_nodes` computes for `activation`:
    "amax", "abs_sum" and "xtx" {r0: name of XᵀX[r0:r1, r0:]} (empty without XᵀX)."""
    rows = xtx_row_blocks(width) if xtx else []
    return {"amax": f"{activation}::amax", "abs_sum": f"{activation}::abs_sum",
            "xtx": {r0: f"{activation}::xtx{r0}" for r0, _ in rows}}


# Σ|x| is summed in float32 over runs of this many consecutive rows first, then in
# float64 (`statistics_nodes`): the float64 Cast of a whole [4096, 1536] chunk cost 8-20 ms
# (9 % of a SmolLM2 layer's statistics pass), and 64-term float32 sums of non-negative
# values keep a relative error below ~4e-6 (3e-8 measured on 4096 rows).
ABS_SUM_ROWS = 64


def abs_sum_rows(seq_len: int) -> int:
    """Rows summed in float32 per partial sum of Σ|x| for chunks of whole `seq_len`-token
    sequences: the largest power of two ≤ ABS_SUM_ROWS dividing seq_len (1: float64 only)."""
    r = ABS_SUM_ROWS
    while r > 1 and seq_len % r:
        r //= 2
    return r


def statistics_nodes(activation: str, width: int, xtx: int, axis0: str, partial_rows: int = 1) -> list[onnx.NodeProto]:
    """Nodes computing one chunk's statistics of a linear input x [..., W] inside the
    slice (`axis0`: the name of an int64 [0] constant; `partial_rows`: r, which must divide
    the chunk's rows T, see `abs_sum_rows`; `xtx`: 0 = no XᵀX, else k: XᵀX over every
    k-th row, from the first):

        x ─► Flatten(axis=-1) ─► xf [T, W] ─► Abs ─┬─► ReduceMax ─────────────► ::amax []
                                  │                 └─► Reshape [T/r, r, W] ─► ReduceSum(axis 1)
                                  │                     ─► Cast(double) ─► ReduceSum(axis 0) ─► ::abs_sum [W]
                                  └─► (Slice rows ::k, if k > 1) ─► xk [⌈T/k⌉, W]
                                        ├─► Slice(cols r0:r1) ─► a ─┐
                                        └─► Slice(cols r0:W) ──► b ─┴─► Gemm(a, b, transA=1) ─► ::xtx{r0}
                                                                        [r1−r0, W−r0] per block row (if xtx)

    Σ|x| is summed in float64 as ActStats.update does, over float32 sums of r rows (r = 1:
    no Reshape, the whole |x| cast); XᵀX in float32 (one chunk of ≤ CHUNK_TOKENS rows;
    chunks are summed in float64), only its upper block triangle (`xtx_row_blocks`;
    ActStats.mirror completes it)."""
    out = statistics_names(activation, width, xtx)
    flat, absx, absd = f"{activation}::flat", f"{activation}::abs", f"{activation}::abs_f64"
    nodes = [helper.make_node("Flatten", [activation], [flat], axis=-1),
             helper.make_node("Abs", [flat], [absx]),
             helper.make_node("ReduceMax", [absx], [out["amax"]], keepdims=0)]

    consts: dict[int, str] = {}

    def at(v: int) -> str:  # an int64 [v] constant (Slice's starts / ends / axes)
        if v not in consts:
            consts[v] = f"{activation}::at{v}"
            nodes.append(helper.make_node("Constant", [], [consts[v]],
                                          value=helper.make_tensor(consts[v], TensorProto.INT64, [1], [v])))
        return consts[v]

    summed = absx
    if partial_rows > 1:
        shape, runs, summed = f"{activation}::runs_shape", f"{activation}::runs", f"{activation}::abs_runs"
        nodes += [helper.make_node("Constant", [], [shape], value=helper.make_tensor(
                      shape, TensorProto.INT64, [3], [-1, partial_rows, width])),
                  helper.make_node("Reshape", [absx, shape], [runs]),
                  helper.make_node("ReduceSum", [runs, at(1)], [summed], keepdims=0)]
    nodes += [helper.make_node("Cast", [summed], [absd], to=TensorProto.DOUBLE),
              helper.make_node("ReduceSum", [absd, axis0], [out["abs_sum"]], keepdims=0)]

    src = flat
    if xtx > 1:
        src = f"{activation}::rows{xtx}"
        nodes.append(helper.make_node("Slice", [flat, at(0), at(2**62), at(0), at(xtx)], [src]))
    for r0, r1 in xtx_row_blocks(width) if xtx else []:
        a = b = src  # one block: the whole product
        if r1 - r0 < width:
            a = f"{activation}::cols{r0}_{r1}"
            nodes.append(helper.make_node("Slice", [src, at(r0), at(r1), at(1)], [a]))
            if r0:  # the first block row has all of x on its right
                b = f"{activation}::cols{r0}_"
                nodes.append(helper.make_node("Slice", [src, at(r0), at(width), at(1)], [b]))
        nodes.append(helper.make_node("Gemm", [a, b], [out["xtx"][r0]], transA=1))
    return nodes


class GraphSlices:
    """Cut a saved float32 decoder graph (weights external) into per-layer ONNX models."""

    def __init__(self, model_path: Path, layer_weights: Callable[[str], bool]):
        self.path = model_path
        self.proto = onnx.load(str(model_path), load_external_data=False)
        g = self.proto.graph
        self.nodes = list(g.node)
        self.producer = {out: i for i, n in enumerate(self.nodes) for out in n.output if out}
        self.inits = {t.name: t for t in g.initializer}
        self.graph_inputs = {v.name: v for v in g.input}
        self.is_weight = layer_weights
        # What the graph blocks annotated: each linear's and norm's weight, role and layer.
        self.linear_nodes = nodes_with(g, LINEAR)
        # each linear input's width: the rows of a weight that multiplies it
        self.input_width = {n.input[0]: int(self.inits[n.input[1]].dims[0]) for n, _ in self.linear_nodes
                            if n.op_type == "MatMul" and n.input[1] in self.inits}
        self.layer_of: dict[str, int | None] = {}
        self.role_of: dict[str, str] = {}
        # A norm's scale is offset + w (Gemma: 1 + w); folding 1/s into it stores (offset + w) / s - offset.
        self.norm_offset: dict[str, float] = {}
        for node, meta in [*self.linear_nodes, *nodes_with(g, NORM)]:
            self.layer_of[meta["weight"]] = meta["layer"]
            if "role" in meta:
                self.role_of[meta["weight"]] = meta["role"]
            if "offset" in meta:
                self.norm_offset[meta["weight"]] = float(meta["offset"])
        self.scale_groups = {node.output[0]: meta for node, meta in nodes_with(g, SCALE_GROUP)}
        layers = [v for v in self.layer_of.values() if v is not None]
        if not layers:
            raise ValueError(f"{model_path}: no annotated layer weights (llmbuild.linear / llmbuild.norm)")
        self.num_layers = 1 + max(layers)
        self.layer_inputs = [self._layer_input(i) for i in range(self.num_layers)]

    def weight_layer(self, name: str) -> int | None:
        """The decoder layer of an annotated weight (None: outside the layers, or unknown)."""
        return self.layer_of.get(name)

    def _first_node_of_layer(self, i: int) -> onnx.NodeProto:
        # A norm with an offset reads Add(w, offset), not w: look through that Add.
        through = {n.output[0]: n.input[0] for n in self.nodes
                   if n.op_type == "Add" and n.input and n.input[0] in self.norm_offset and n.input[0] in self.inits}
        for n in self.nodes:
            if n.op_type == "Add" and n.output[0] in through:
                continue
            if any(self.layer_of.get(through.get(x, x), -1) == i and through.get(x, x) in self.inits
                   for x in n.input):
                return n
        raise ValueError(f"no node reads a weight of layer {i}")

    def _layer_input(self, i: int) -> str:
        return self._first_node_of_layer(i).input[0]

    def linear_inputs(self, i: int | None) -> dict[str, str]:
        """weight name -> name of the activation its MatMul multiplies (layer i; None =
        the linears outside the layers, e.g. an untied lm_head)."""
        return {n.input[1]: n.input[0] for n, meta in self.linear_nodes
                if n.op_type == "MatMul" and n.input[1] in self.inits and meta["layer"] == i}

    def producer_of(self, value: str) -> onnx.NodeProto | None:
        i = self.producer.get(value)
        return None if i is None else self.nodes[i]

    def fold_target(self, activation: str, layer: int) -> tuple[str, str] | None:
        """Where a per-channel 1/s on `activation` can be folded, from the scale group the
        graph blocks annotated on the node producing it: ("norm", weight name) for a norm's
        scale, ("columns", weight name) for the output columns of the linear multiplied in
        (silu(gate) * up); None when the activation heads no group."""
        group = self.scale_groups.get(activation)
        if group is None or group["layer"] != layer:
            return None
        return ("norm" if group["kind"] == "norm" else "columns", group["source"])

    def slice(self, outputs: list[str], cut: str | None, dst: Path,
              as_input: Callable[[str], bool] = lambda name: False,
              statistics: dict[str, int] | None = None, partial_rows: int = 1) -> tuple[Path, list[str]]:
        """Write the subgraph computing `outputs` from `cut` (an input) to `dst` (next to
        the full model, so external weights resolve). Weights for which `as_input(name)`
        holds become graph inputs. `statistics`: activation → its XᵀX row stride (0 or
        False: no XᵀX; True = 1: every row; see `statistics_nodes`); each such
        activation's `statistics_nodes` are added (Σ|x| over float32 runs of
        `partial_rows` rows) and their outputs (`statistics_names`) appended to
        `outputs`. Returns the path and the names of the weight inputs."""
        statistics = statistics or {}
        needed, stack, leaves = set(), [*outputs, *statistics], set()
        while stack:
            v = stack.pop()
            if v == cut or v in self.graph_inputs or v in self.inits or not v:
                leaves.add(v)
                continue
            i = self.producer[v]
            if i in needed:
                continue
            needed.add(i)
            stack.extend(self.nodes[i].input)
        nodes = [self.nodes[i] for i in sorted(needed)]
        inputs, inits, weight_inputs = [], [], []
        if cut is not None:
            inputs.append(helper.make_tensor_value_info(cut, TensorProto.FLOAT, None))
        for v in sorted(leaves):
            if not v or v == cut:
                continue
            if v in self.graph_inputs:
                inputs.append(self.graph_inputs[v])
            elif self.is_weight(v) and as_input(v):
                t = self.inits[v]
                inputs.append(helper.make_tensor_value_info(v, t.data_type, list(t.dims)))
                weight_inputs.append(v)
            else:
                inits.append(self.inits[v])
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        if statistics:
            axis0 = "llmbuild.calibration.axis0"
            inits.append(helper.make_tensor(axis0, TensorProto.INT64, [1], [0]))
            for a, xtx in statistics.items():
                nodes = [*nodes, *statistics_nodes(a, self.input_width[a], xtx, axis0, partial_rows)]
                names = statistics_names(a, self.input_width[a], xtx)
                outs += [helper.make_tensor_value_info(names["amax"], TensorProto.FLOAT, None),
                         helper.make_tensor_value_info(names["abs_sum"], TensorProto.DOUBLE, None)]
                outs += [helper.make_tensor_value_info(nm, TensorProto.FLOAT, None) for nm in names["xtx"].values()]
        graph = helper.make_graph(nodes, f"slice-{dst.stem}", inputs, outs, inits)
        model = helper.make_model(graph, opset_imports=self.proto.opset_import, ir_version=self.proto.ir_version)
        onnx.save(model, str(dst))
        return dst, weight_inputs


def ort_session(path: Path, threads: int | None, profile_prefix: str | None = None):
    """The ONNX Runtime session calibration runs a slice in (`profile_prefix`: ONNX
    Runtime's profiler on, its JSON written there; benchmarks/quantization/statistics_profile.py)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if profile_prefix is not None:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    opts.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # numpy (the searches, BLAS threads) runs between the calls: idle ORT threads block
    # instead of spinning on the cores it needs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    float_matmuls(opts)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def decoder_feeds(sess, tokens: np.ndarray, kv_heads: int, head_dim: int) -> dict[str, np.ndarray]:
    """The decoder's own inputs for full sequences written from cache row 0."""
    b, s = tokens.shape
    feeds = {}
    for inp in sess.get_inputs():
        name = inp.name
        if name == io.INPUT_IDS:
            feeds[name] = tokens
        elif name == io.POSITION_IDS:
            feeds[name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        elif name == io.WRITE_INDICES:
            feeds[name] = np.zeros(b, np.int64)
        elif name == io.LOGITS_INDICES:  # every position
            feeds[name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        elif name.startswith(("past_key", "past_value")):
            feeds[name] = np.zeros((b, kv_heads, s, head_dim), np.float32)
    return feeds


@dataclass(frozen=True)
class AlgorithmOptions:
    """The recipe's `quantization.awq` / `quantization.gptq` / `calibration.propagate`."""

    awq_clip: bool = True
    awq_hessian_stride: int | None = None  # None: auto_hessian_stride of the calibration tokens
    gptq_act_order: bool = True
    gptq_damp: float = GPTQ_DAMP
    propagate: str = "auto"

    @classmethod
    def from_recipe(cls, quantization: dict) -> AlgorithmOptions:
        awq, gptq = quantization.get("awq") or {}, quantization.get("gptq") or {}
        return cls(awq_clip=awq.get("clip", True), awq_hessian_stride=awq.get("hessian_stride"),
                   gptq_act_order=gptq.get("act_order", True), gptq_damp=gptq.get("damp", GPTQ_DAMP),
                   propagate=(quantization.get("calibration") or {}).get("propagate", "auto"))

    def xtx_stride(self, specs: list[ModuleSpec]) -> int:
        """The XᵀX row stride of one linear input read by the linears planned as `specs`: 0
        (no XᵀX) unless one is calibrated; every row (1) when one uses GPTQ, whose
        compensation inverts H; else AWQ's `hessian_stride` (its searches only rank grid
        points by tr(ΔᵀHΔ))."""
        algorithms = {sp.algorithm for sp in specs if sp.scheme != "none"}
        if "gptq" in algorithms:
            return 1
        if "awq" not in algorithms:
            return 0
        if self.awq_hessian_stride is None:
            raise ValueError("awq_hessian_stride is unresolved: calibrate() sets it from the token count")
        return self.awq_hessian_stride

    def float_propagation(self, plan: dict[str, ModuleSpec]) -> bool:
        if self.propagate not in PROPAGATE:
            raise ValueError(f"propagate {self.propagate!r}: expected one of {list(PROPAGATE)}")
        if self.propagate == "auto":
            return not any(spec.algorithm == "gptq" and spec.scheme != "none" for spec in plan.values())
        return self.propagate == "float"


@dataclass(frozen=True)
class _Step:
    """One step of calibration: a decoder layer, or "head" (the linears after the last)."""

    layer: int | str
    lin: dict[str, str]  # planned weight -> the activation it multiplies
    cut: str  # the slice's input
    fold_layer: int | None  # the layer whose scale groups AWQ folds into
    last: bool
    as_input: Callable[[str], bool]  # the weights fed to the slice as inputs


@dataclass
class _Pass:
    """A step's pass 1: its linear inputs' statistics and its float weights."""

    step: _Step
    stats: dict[str, ActStats]
    weights: dict[str, np.ndarray]
    seconds: float
    cpu_s: float = 0.0  # (set when not overlapped)


@dataclass
class CalibrationResult:
    results: dict[str, QuantizedTensor]  # calibrated weights (AWQ, GPTQ, and RTN when run here)
    floats: dict[str, np.ndarray]  # replaced float weights (AWQ-scaled norms)
    activation_amax: dict[str, float]  # weight name -> max |input| (fp8)
    report: dict


def calibrate(
    model_path: Path, tokens: np.ndarray, plan: dict[str, ModuleSpec], loaders: dict[str, Callable[[], np.ndarray]],
    *, kv_heads: int, head_dim: int, work_dir: Path, scale_dtype=np.float16, seed: int = 0,
    threads: int | None = None, progress: Callable[[int, int, str], None] | None = None,
    options: AlgorithmOptions = AlgorithmOptions(), chunk_tokens: int = CHUNK_TOKENS, overlap: bool | None = None,
) -> CalibrationResult:
    """Run the calibration set through the float32 graph at `model_path` layer by layer
    and quantize every planned weight that needs calibration data. `overlap` (float
    propagation only; None: unless LLMBUILD_CALIBRATION_OVERLAP=0): layer i+1's pass 1
    runs while layer i is quantized."""
    import psutil

    proc = psutil.Process()
    start, cpu0 = time.perf_counter(), time.process_time()
    rss0 = peak = proc.memory_info().rss

    rss_lock = threading.Lock()

    def note_rss():  # from both threads when overlapped
        nonlocal peak
        with rss_lock:
            peak = max(peak, proc.memory_info().rss)

    slices = GraphSlices(model_path, lambda name: name in loaders)
    n, s = tokens.shape
    if options.awq_hessian_stride is None:
        options = replace(options, awq_hessian_stride=auto_hessian_stride(n * s))
    chunk = max(1, chunk_tokens // s)
    float_prop = options.float_propagation(plan)
    if overlap is None:
        overlap = os.environ.get("LLMBUILD_CALIBRATION_OVERLAP", "1") != "0"
    overlap = overlap and float_prop  # quantized propagation: layer i+1 reads layer i's quantized output
    results, floats, amax, layer_reports = {}, {}, {}, []

    # h0: the embedding (prefix slice), [N, S, H]
    path, _ = slices.slice([slices.layer_inputs[0]], None, work_dir / "prefix.onnx")
    sess = ort_session(path, threads)
    hidden = None
    for c0 in range(0, n, chunk):
        out = sess.run(None, decoder_feeds(sess, tokens[c0:c0 + chunk], kv_heads, head_dim))[0]
        if hidden is None:
            hidden = np.empty((n, s, out.shape[-1]), np.float32)
        hidden[c0:c0 + chunk] = out
    del sess
    nxt = np.empty_like(hidden)
    act_bytes_chunk = 0

    head = {w for w in slices.linear_inputs(None) if w in plan and plan[w].scheme != "none"}
    steps = list(range(slices.num_layers)) + (["head"] if head else [])
    last_layer = slices.num_layers - 1

    def step_of(layer) -> _Step:
        if layer == "head":  # linears after the last layer (untied lm_head): re-run it, quantized
            return _Step(layer, {w: a for w, a in slices.linear_inputs(None).items() if w in plan},
                         slices.layer_inputs[last_layer], None, True,
                         lambda v: slices.weight_layer(v) in (last_layer, None))
        return _Step(layer, {w: a for w, a in slices.linear_inputs(layer).items() if w in plan},
                     slices.layer_inputs[layer], layer, layer == last_layer,
                     lambda v: slices.weight_layer(v) == layer)

    def statistics_pass(layer) -> _Pass:
        """Pass 1 of one step: float weights, every chunk → the statistics of its linear
        inputs (and hᵢ₊₁ into `nxt`, then swapped in, with float propagation)."""
        nonlocal hidden, nxt, act_bytes_chunk
        t0 = time.perf_counter()
        st = step_of(layer)
        lin, cut, last = st.lin, st.cut, st.last
        acts = sorted(set(lin.values()))
        statistics = {a: options.xtx_stride([plan[w] for w, b in lin.items() if b == a]) for a in acts}
        # hᵢ₊₁ from this pass only with float propagation (else pass 2 computes it, from a
        # slice without the statistics: ONNX Runtime runs every node of a graph whatever
        # outputs are asked for)
        nxt_name = slices.layer_inputs[layer + 1] if float_prop and not last else None
        path, weight_inputs = slices.slice([nxt_name] if nxt_name else [], cut, work_dir / f"layer{layer}.onnx",
                                           st.as_input, statistics, abs_sum_rows(s))
        sess = ort_session(path, threads)
        # the slice's weight inputs, plus linears it does not need to run (the last layer's
        # down_proj: its output is not asked for) but that are quantized all the same
        weights = {w: np.ascontiguousarray(np.asarray(loaders[w](), np.float32))
                   for w in dict.fromkeys([*weight_inputs, *lin])}
        for w in weights:  # the head step runs the last layer as already quantized
            if layer == "head" and not float_prop and slices.weight_layer(w) == last_layer:
                weights[w] = results[w].dequantize() if w in results else floats.get(w, weights[w])
        names = {a: statistics_names(a, slices.input_width[a], statistics[a]) for a in acts}
        ask = [nm for a in acts for nm in (names[a]["amax"], names[a]["abs_sum"], *names[a]["xtx"].values())]
        ask += [nxt_name] if nxt_name else []
        stats = {a: ActStats(slices.input_width[a]) for a in acts}
        for c0 in range(0, n, chunk):
            feeds = decoder_feeds(sess, tokens[c0:c0 + chunk], kv_heads, head_dim)
            feeds[cut] = hidden[c0:c0 + chunk]
            feeds.update({w: weights[w] for w in weight_inputs})
            got = dict(zip(ask, sess.run(ask, feeds)))
            note_rss()
            rows = int(np.prod(feeds[cut].shape[:-1]))
            if nxt_name:
                nxt[c0:c0 + chunk] = got[nxt_name]
            for a in acts:
                stats[a].add(got[names[a]["amax"]], got[names[a]["abs_sum"]], rows,
                             {r0: got[nm] for r0, nm in names[a]["xtx"].items()} or None)
            # what the chunk's linear inputs occupy inside ONNX Runtime (they never leave it)
            act_bytes_chunk = max(act_bytes_chunk, 4 * rows * sum(x.width for x in stats.values()))
            del got
        del sess
        for x in stats.values():
            x.mirror()
        if nxt_name:
            hidden, nxt = nxt, hidden
        return _Pass(st, stats, weights, round(time.perf_counter() - t0, 2))

    def quantize_step(p: _Pass, waited: float) -> None:
        """Quantize one step's weights from its statistics (and pass 2: hᵢ₊₁ under the
        quantized weights, with quantized propagation)."""
        nonlocal hidden, nxt
        st, stats, weights = p.step, p.stats, p.weights
        t1, layer_cpu0 = time.perf_counter(), time.process_time()
        for w, a in st.lin.items():
            amax[w] = stats[a].amax
        info = _quantize_layer(slices, st.fold_layer, st.lin, stats, weights, plan, results, floats, scale_dtype,
                               options)
        note_rss()
        t2 = time.perf_counter()
        if not st.last and not float_prop:
            nxt_name = slices.layer_inputs[st.layer + 1]
            path, prop_inputs = slices.slice([nxt_name], st.cut, work_dir / f"layer{st.layer}-propagate.onnx",
                                             st.as_input)
            sess = ort_session(path, threads)
            qweights = {}
            for w in prop_inputs:
                if w in results:
                    qweights[w] = results[w].dequantize()
                elif w in floats:
                    qweights[w] = floats[w]
                else:
                    qweights[w] = weights[w] if w in weights else np.asarray(loaders[w](), np.float32)
            for c0 in range(0, n, chunk):
                feeds = decoder_feeds(sess, tokens[c0:c0 + chunk], kv_heads, head_dim)
                feeds[st.cut] = hidden[c0:c0 + chunk]
                feeds.update(qweights)
                nxt[c0:c0 + chunk] = sess.run([nxt_name], feeds)[0]
                note_rss()
            hidden, nxt = nxt, hidden
            del sess, qweights
        t3 = time.perf_counter()
        rep = {"layer": st.layer, "seconds": round(waited + p.seconds * (not overlap) + t3 - t1, 2)}
        if not overlap:  # overlapped, the process's CPU seconds mix two layers
            q_cpu = time.process_time() - layer_cpu0
            rep |= {"cpu_s": round(p.cpu_s + q_cpu, 2), "statistics_cpu_s": round(p.cpu_s, 2),
                    "quantize_cpu_s": round(q_cpu, 2)}
        rep |= {"statistics_s": p.seconds, "waited_s": round(waited, 2), "quantize_s": round(t2 - t1, 2),
                "propagate_s": round(t3 - t2, 2), **info}
        layer_reports.append(rep)
        if os.environ.get("LLMBUILD_CALIBRATION_LOG"):
            print(f"calibration layer {st.layer}: {rep}", flush=True)
        if progress is not None:
            progress(len(layer_reports), len(steps), f"layer {st.layer}")

    if overlap:
        # Float propagation: layer i+1's input is layer i's float output, so its pass 1
        # (ONNX Runtime) runs on a worker thread while layer i's searches run here (numpy
        # and ONNX Runtime release the GIL): one layer ahead, no more.
        with ThreadPoolExecutor(1, thread_name_prefix="llmbuild-calibration-statistics") as pool:
            ahead = pool.submit(statistics_pass, steps[0])
            for i in range(len(steps)):
                t = time.perf_counter()
                p = ahead.result()
                waited = time.perf_counter() - t
                if i + 1 < len(steps):
                    ahead = pool.submit(statistics_pass, steps[i + 1])
                quantize_step(p, waited)
                del p
    else:
        for layer in steps:
            c = time.process_time()
            p = statistics_pass(layer)
            p.cpu_s = time.process_time() - c
            quantize_step(p, 0.0)
            del p
    note_rss()
    report = {
        "samples": int(n), "seq_len": int(s), "tokens": int(n * s), "chunk_sequences": int(chunk),
        # H of an input only AWQ linears read: every k-th token (GPTQ's inputs: every token)
        "awq_hessian_stride": int(options.awq_hessian_stride),
        "propagate": "float" if float_prop else "quantized", "overlap": bool(overlap),
        "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(time.process_time() - cpu0, 2),  # every thread of the process
        "peak_rss_bytes": int(peak), "rss_before_bytes": int(rss0),
        "hidden_state_bytes": int(hidden.nbytes),
        "layer_activation_bytes_per_chunk": int(act_bytes_chunk),
        "layer_activation_bytes_all_tokens": int(act_bytes_chunk * -(-n // chunk)),
        "layers": layer_reports,
    }
    return CalibrationResult(results, floats, amax, report)


def _quantize_layer(slices, layer, lin, stats, weights, plan, results, floats, scale_dtype,
                    options: AlgorithmOptions) -> dict:
    """Quantize the planned weights of one layer in place of `results` / `floats`."""
    info = {"awq": {}, "gptq": []}
    by_act: dict[str, list[str]] = {}
    for w, a in lin.items():
        by_act.setdefault(a, []).append(w)
    work = {w: weights[w] for w in lin}  # float weights, AWQ-scaled below
    for a, ws in by_act.items():
        specs = [plan[w] for w in ws]
        if all(sp.algorithm == "awq" for sp in specs):
            scheme = specs[0].make()
            target = slices.fold_target(a, layer)
            if target is not None and target[1] in weights and all(sp == specs[0] for sp in specs):
                s, how = awq_search_scales(stats[a].xtx, stats[a].mean_abs, [work[w] for w in ws], scheme,
                                           scale_dtype)
                for w in ws:
                    work[w] = work[w] * s[:, None]
                kind, tname = target
                base = floats.get(tname, work.get(tname, weights[tname]))
                if kind == "norm":
                    offset = slices.norm_offset.get(tname, 0.0)
                    floats[tname] = ((base + offset) / s - offset).astype(np.float32)
                else:  # output columns of the linear before
                    if tname in work:
                        work[tname] = work[tname] / s[None, :]
                    else:
                        floats[tname] = (base / s[None, :]).astype(np.float32)
                stats[a].xtx = stats[a].xtx / s[:, None] / s[None, :]  # H of the scaled input x/s
                info["awq"][module_name(ws[0]) + "+" + str(len(ws) - 1)] = {
                    "alpha": how["alpha"], "loss": how["loss"], "loss_alpha0": how["loss_alpha0"],
                    "folded_into": module_name(tname)}
    # down_proj's scale may have changed up_proj after up_proj's group was searched: the
    # clip search and quantization below use the final float weights.
    inverses = {}  # activation -> GPTQ's factor of H⁻¹, one per input (q/k/v, gate/up share it)
    for w, a in lin.items():
        spec = plan[w]
        if spec.scheme == "none":
            continue
        scheme = spec.make()
        if spec.algorithm == "awq":
            shrink = None
            if options.awq_clip and slices.role_of.get(w) not in _NO_CLIP:
                shrink = awq_search_clip(stats[a].xtx, work[w], scheme, scale_dtype)
            results[w] = scheme.quantize(work[w], scale_dtype, shrink=shrink)
        elif spec.algorithm == "gptq":
            if a not in inverses:
                inverses[a] = gptq_inverse(stats[a].xtx, options.gptq_damp, options.gptq_act_order)
            results[w] = gptq_quantize(work[w], None, scheme, scale_dtype, inverse=inverses[a])
            info["gptq"].append(module_name(w))
        else:
            results[w] = scheme.quantize(work[w], scale_dtype)
    for w in lin:  # an unquantized linear whose columns absorbed an AWQ scale
        if plan[w].scheme == "none" and work[w] is not weights[w]:
            floats[w] = work[w].astype(np.float32)
    return info
