"""AWQ / GPTQ of the routed experts, each expert from the calibration tokens routed to it.

    float32 reference graph + outputs: per sparse layer the routed block's input x [N,S,H],
    the routed indices idx [N,S,k] (the model's own router, top-k as it runs) and the down
    projection's input a [N,S,k,1,I]
    one ONNX Runtime pass over the calibration tokens (chunks of ~CHUNK_TOKENS):
        expert e of layer l: X_e = rows of x with e in idx   → Σ X_eᵀX_e, mean |X_e|  (gate, up)
                             A_e = rows of a with idx == e   → Σ A_eᵀA_e, mean |A_e|  (down)
    per expert: GPTQ with H = Σ X_eᵀX_e (or Σ A_eᵀA_e); AWQ: gate/up get the clipping search
    only (their input also feeds the router and every other expert: no scale can be folded
    into the norm before them), down gets the scale search with 1/s folded into the same
    expert's up_proj columns, then the clipping search.
    an expert no calibration token reaches: round-to-nearest, listed per layer in the report.

The statistics are of the float model (AutoAWQ's float propagation), gathered for every
sparse layer in the same pass: E·(H² + I²)·8 bytes per sparse layer are held at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from llmbuild.quantize.algorithms import awq_search_clip, awq_search_scales, gptq_quantize
from llmbuild.quantize.calibration import CHUNK_TOKENS, AlgorithmOptions, decoder_feeds, ort_session
from llmbuild.quantize.expert_plan import PROJECTIONS
from llmbuild.quantize.experts import StackedQuantized, quantize_stacked
from llmbuild.quantize.plan import ModuleSpec


class _Moments:
    """Σ xᵀx, Σ |x| and the row count of one expert's input."""

    def __init__(self, width: int):
        self.xtx = np.zeros((width, width), np.float64)
        self.abs_sum = np.zeros(width, np.float64)
        self.rows = 0

    def update(self, x: np.ndarray) -> None:
        if len(x):
            self.xtx += (x.T @ x).astype(np.float64)
            self.abs_sum += np.abs(x).sum(axis=0, dtype=np.float64)
            self.rows += x.shape[0]

    @property
    def mean_abs(self) -> np.ndarray:
        return (self.abs_sum / max(self.rows, 1)).astype(np.float32)


def _down_input(graph: onnx.GraphProto, down: str) -> str:
    """Name of the activation the gathered down experts multiply."""
    gathered = {n.output[0] for n in graph.node if n.op_type == "Gather" and n.input[0] == down}
    for n in graph.node:
        if n.op_type == "MatMul" and n.input[1] in gathered:
            return n.input[0]
    raise ValueError(f"no MatMul reads the gathered experts of {down}")


def expert_statistics(model_path: Path, tokens: np.ndarray, blocks: list[dict], *, kv_heads: int, head_dim: int,
                      threads: int | None = None, chunk_tokens: int = CHUNK_TOKENS):
    """Per block (layer): [_Moments of x per expert], [_Moments of a per expert]."""
    proto = onnx.load(str(model_path), load_external_data=False)
    asks = []
    for meta in blocks:
        asks.append((meta["input"], meta["indices"], _down_input(proto.graph, meta["stacked"]["down"])))
    for x, idx, a in asks:
        proto.graph.output.extend([helper.make_tensor_value_info(x, TensorProto.FLOAT, None),
                                   helper.make_tensor_value_info(idx, TensorProto.INT64, None),
                                   helper.make_tensor_value_info(a, TensorProto.FLOAT, None)])
    path = model_path.parent / "experts-statistics.onnx"  # beside the model: its external data resolves
    onnx.save(proto, str(path))
    sess = ort_session(path, threads)
    stats = [([_Moments(m["hidden"]) for _ in range(m["experts"])],
              [_Moments(m["intermediate"]) for _ in range(m["experts"])]) for m in blocks]
    names = [n for ask in asks for n in ask]
    n, s = tokens.shape
    chunk = max(1, chunk_tokens // s)
    for c0 in range(0, n, chunk):
        outs = dict(zip(names, sess.run(names, decoder_feeds(sess, tokens[c0:c0 + chunk], kv_heads, head_dim))))
        for (x_name, idx_name, a_name), meta, (xs, as_) in zip(asks, blocks, stats):
            k = int(meta["top_k"])
            x = outs[x_name].reshape(-1, meta["hidden"])
            idx = outs[idx_name].reshape(-1, k)
            a = outs[a_name].reshape(-1, k, meta["intermediate"])
            for e in range(meta["experts"]):
                hit = idx == e  # [T, k]
                xs[e].update(x[hit.any(axis=1)])
                as_[e].update(a[hit])
    del sess
    path.unlink(missing_ok=True)
    return stats


def calibrate_experts(model_path: Path, tokens: np.ndarray, blocks: list[dict], plan: dict[str, ModuleSpec],
                      loaders: dict[str, Callable[[], np.ndarray]], *, kv_heads: int, head_dim: int,
                      scale_dtype=np.float16, threads: int | None = None,
                      options: AlgorithmOptions = AlgorithmOptions()) -> tuple[dict[str, StackedQuantized], list[dict]]:
    """Stacked weight name -> its StackedQuantized for every block with a calibrated
    (AWQ / GPTQ) projection, and a report per layer (tokens per expert, the experts left
    round-to-nearest because no token reached them)."""
    blocks = [m for m in blocks if any(plan[m["stacked"][p]].algorithm in ("awq", "gptq")
                                       and plan[m["stacked"][p]].scheme != "none" for p in PROJECTIONS)]
    if not blocks:
        return {}, []
    stats = expert_statistics(model_path, tokens, blocks, kv_heads=kv_heads, head_dim=head_dim, threads=threads)
    results, report = {}, []
    for meta, (xs, as_) in zip(blocks, stats):
        names = {p: meta["stacked"][p] for p in PROJECTIONS}
        w = {p: np.asarray(loaders[names[p]](), np.float32).copy() for p in PROJECTIONS}  # [E, in, out]
        specs = {p: plan[names[p]] for p in PROJECTIONS}
        calibrated: dict[str, dict] = {p: {} for p in PROJECTIONS}
        unreached = [e for e in range(meta["experts"]) if xs[e].rows == 0]
        awq_alpha = {}
        for e in range(meta["experts"]):
            if xs[e].rows == 0:
                continue
            hx, ha = xs[e].xtx, as_[e].xtx.copy()
            d = specs["down"]
            if d.algorithm == "awq" and specs["up"] == d:  # fold down's input scales into up's columns
                s, how = awq_search_scales(ha.astype(np.float32), as_[e].mean_abs, [w["down"][e]], d.make(),
                                           scale_dtype)
                w["down"][e] = w["down"][e] * s[:, None]
                w["up"][e] = w["up"][e] / s[None, :]
                ha = ha / s[:, None] / s[None, :]
                awq_alpha[e] = how["alpha"]
            for p, h in (("gate", hx), ("up", hx), ("down", ha)):
                sp = specs[p]
                if sp.scheme == "none" or sp.algorithm == "rtn":
                    continue
                scheme = sp.make()
                if sp.algorithm == "gptq":
                    calibrated[p][e] = gptq_quantize(w[p][e], h, scheme, scale_dtype, damp=options.gptq_damp,
                                                     act_order=options.gptq_act_order)
                else:
                    shrink = awq_search_clip(h.astype(np.float32), w[p][e], scheme, scale_dtype) \
                        if options.awq_clip else None
                    calibrated[p][e] = scheme.quantize(w[p][e], scale_dtype, shrink=shrink)
        for p in PROJECTIONS:
            if specs[p].scheme != "none":
                results[names[p]] = quantize_stacked(specs[p], w[p], scale_dtype, calibrated[p])
        report.append({"layer": meta["layer"], "tokens_per_expert": [int(m.rows) for m in xs],
                       "round_to_nearest": unreached,
                       "algorithms": {p: specs[p].label for p in PROJECTIONS},
                       **({"awq_alpha": {str(e): a for e, a in awq_alpha.items()}} if awq_alpha else {})})
    return results, report
