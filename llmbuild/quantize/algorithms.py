"""Calibrated int4 algorithms in plain numpy: AWQ (activation-aware scales and clipping)
and GPTQ (second-order error compensation). Weights are `[in, out]`; activations
`x` are `[tokens, in]`.

AWQ (Lin et al. 2023, as AutoAWQ does it): for the linears that share one input,
search α ∈ {0, 1/20, …, 19/20} for per-input-channel scales

    s = mean|x|^α / mean|Ŵ|^(1−α)        (Ŵ: |W| normalised per quantization block)

minimising ‖x·W − (x/s)·Q(s·W)‖²; the 1/s is folded into whatever produced x (the
RMSNorm weight, or the output columns of the linear before it). Then, per linear
except q/k, search a clipping ratio per block and output channel that minimises that
block's output error (a channel the chosen ratios would hurt as a whole keeps 1.0).
RTN is the same quantizer without either search. Output errors are computed from
H = Σ xᵀx over the calibration rows calibration gives (‖xΔ‖² summed = tr(ΔᵀHΔ); every
`quantization.awq.hessian_stride`-th token, calibration.auto_hessian_stride); each α is
scored under the plain quantizer (the tight range, as AutoAWQ's scale search), on a
fixed sample of the output columns (SEARCH_COLUMNS), coarse to fine: every
AWQ_COARSE-th α first, then the grid points within AWQ_COARSE − 1 of the best of those
(11 of the 20 points; the same α as all 20 in each of 270 searches of SmolLM2 at
g32/g64/g128, see AWQ_COARSE). Grid points are evaluated side by
side: R variants of a weight fake-quantized as one [in, R·out] matrix
(`Int4.fake_quantize`), their errors in one H·Δ product on ONNX Runtime
(`quantize.quadratic`).

GPTQ (Frantar et al. 2022): quantize input rows one at a time, and push each row's
rounding error onto the rows not yet quantized through the inverse Hessian
H = XᵀX (+1 % of its mean diagonal, as AutoGPTQ), in blocks of 128 rows with lazy
updates of the rows after a block; block parameters are taken from the error-updated
weights when a block starts. With act-order the rows go in decreasing diag(H) and the
block parameters are fixed beforehand (static groups: the stored blocks stay contiguous).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from llmbuild.quantize.quadratic import column_quadratic_forms
from llmbuild.quantize.schemes import Int4, QuantizedTensor

AWQ_GRID = 20
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128
GRID_BATCH = 5  # grid points quantized side by side (memory: 5 copies of the weight)
# AWQ's α: the loss over α is a wide valley with a few per cent of quantization noise on
# it; scoring every 4th point and then the 6 neighbours of the best (within 3 points)
# finds the grid's minimum unless the noise outweighs the valley's rise over 4 points.
# Measured against the full grid: benchmarks/quantization/RESULTS.md, 2026-12-03 (later).
AWQ_COARSE = 4
# AWQ's α search scores every α on evenly strided output columns, at least this many
# (a column's error depends on that column alone, so this is a fixed sample of the sum
# every α is scored on); the scales then quantize every column. 128 would halve the
# search's H·Δ work but measured worse (int4 g64: KL 0.454 against 0.429; RESULTS.md, 2026-12-03).
SEARCH_COLUMNS = 256


_POOL: ThreadPoolExecutor | None = None


def _grid_workers() -> int:
    """Threads `_grid_map` runs a grid's batches on."""
    return min(os.cpu_count() or 1, 4)


def _grid_map(fn, items) -> list:
    """`[fn(x) for x in items]`, the items on a thread per core: the grid's batches are
    independent and numpy's elementwise work (most of a quantization) and ONNX Runtime
    release the GIL, so the searches use every core, not only BLAS's."""
    global _POOL
    items = list(items)
    if len(items) < 2 or _grid_workers() < 2:
        return [fn(x) for x in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_grid_workers(), thread_name_prefix="llmbuild-grid")
    return list(_POOL.map(fn, items))


# -- AWQ ----------------------------------------------------------------------------------


def _block_normalized_mean(w: np.ndarray, group: int) -> np.ndarray:
    """Per input channel: mean over outputs of |w| / (max |w| of its block) → [in]."""
    k, n = w.shape
    a = np.abs(w)
    g = -(-k // group)
    block_max = np.zeros((g, n), np.float32)
    for b in range(g):
        block_max[b] = a[b * group:(b + 1) * group].max(axis=0)
    norm = a / np.maximum(np.repeat(block_max, group, axis=0)[:k], 1e-12)
    return norm.mean(axis=1)


def _output_errors(h: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Per output column of Δ [in, cols]: Σ over calibration rows of (x·δ_j)² = δ_jᵀ H δ_j
    (H = Σ xᵀx over those rows) → [cols]."""
    return column_quadratic_forms(h, delta)


def _side_by_side(scheme, variants: np.ndarray, scale_dtype, shrink: np.ndarray | None = None) -> np.ndarray:
    """Quantize-dequantize R variants of one weight at once: `variants` [in, R, out] are
    quantized as one [in, R·out] matrix (a scheme's parameters are per output column, so
    each variant gets exactly what quantizing it alone gives); `shrink` [G, R, out]."""
    k, r, n = variants.shape
    flat = None if shrink is None else shrink.reshape(shrink.shape[0], r * n)
    return scheme.fake_quantize(variants.reshape(k, r * n), scale_dtype, shrink=flat).reshape(k, r, n)


def awq_search_scales(h: np.ndarray, x_mean_abs: np.ndarray, weights: list[np.ndarray], scheme: Int4,
                      scale_dtype=np.float16, batch: int = GRID_BATCH,
                      columns: int | None = SEARCH_COLUMNS, coarse: int = AWQ_COARSE) -> tuple[np.ndarray, dict]:
    """Best per-input-channel scales [in] for the linears `weights` sharing one input,
    whose rows give H = Σ xᵀx [in, in] and mean |x| [in]. The grid's points are
    evaluated at most `batch` at a time, side by side in one quantization and one H·Δ
    product, on every ⌊out / columns⌋-th output column (`columns` None: all); the
    reported losses are of those columns. `coarse` > 1: every coarse-th point, then the
    points within coarse − 1 of the best of them (1: all 20)."""
    w = np.concatenate(weights, axis=1).astype(np.float32)
    h = np.asarray(h, np.float32)
    w_mean = _block_normalized_mean(w, scheme.group_size)
    if columns is not None and w.shape[1] >= 2 * columns:
        w = np.ascontiguousarray(w[:, ::w.shape[1] // columns])
    alphas = np.arange(AWQ_GRID, dtype=np.float64)[:, None] / AWQ_GRID
    s = np.power(np.maximum(x_mean_abs, 1e-8), alphas) / (np.power(w_mean, 1 - alphas) + 1e-4)
    s = np.maximum(s, 1e-4)
    s = (s / np.sqrt(s.max(axis=1, keepdims=True) * s.min(axis=1, keepdims=True))).astype(np.float32)  # [R, in]
    # each α is scored under the plain quantizer (the tight range, shrink 1), as AutoAWQ
    # scores it before its clip search picks the final ranges; not under the searched
    # scale factors of `Int4.quantize`, which would cost 16 passes over the weight per
    # point instead of one (measured: benchmarks/quantization/RESULTS.md, 2026-12-03)
    unclipped = np.ones((scheme.num_groups(w.shape[0]), batch, w.shape[1]), np.float32)

    def batch_losses(points: list[int]) -> list[float]:
        sc = s[points].T[:, :, None]  # [in, b, 1]
        wq = _side_by_side(scheme, w[:, None, :] * sc, scale_dtype, unclipped[:, :sc.shape[1]]) / sc
        delta = (w[:, None, :] - wq).reshape(w.shape[0], -1)
        return _output_errors(h, delta).reshape(-1, w.shape[1]).sum(axis=1).tolist()

    losses: dict[int, float] = {}

    def score(points: list[int]) -> None:  # in batches of at most `batch`, one per core
        per = min(batch, -(-len(points) // _grid_workers()))
        parts = [points[i:i + per] for i in range(0, len(points), per)]
        for part, got in zip(parts, _grid_map(batch_losses, parts)):
            losses.update(zip(part, got))

    if coarse > 1:
        score(list(range(0, AWQ_GRID, coarse)))
        c = min(losses, key=losses.__getitem__)
        score([i for i in range(max(0, c - coarse + 1), min(AWQ_GRID, c + coarse)) if i not in losses])
    else:
        score(list(range(AWQ_GRID)))
    best = min(sorted(losses), key=losses.__getitem__)  # ties: the smaller α, as argmin over the grid
    return s[best], {"alpha": best / AWQ_GRID, "loss": losses[best], "loss_alpha0": losses[0],
                     "points_scored": len(losses)}


def awq_search_clip(h: np.ndarray, w: np.ndarray, scheme: Int4, scale_dtype=np.float16,
                    batch: int = GRID_BATCH) -> np.ndarray:
    """Best range shrink [G, out] per block and output channel (1.0 = no clipping), by
    each block's own output error Δ_gᵀ H_gg Δ_g (H's diagonal blocks: all rows), as
    AutoAWQ's auto_clip; all ratios of a batch side by side. An output channel whose
    whole error tr(δᵀHδ) (the cross-block terms included) the chosen shrinks would raise
    keeps the shrink of plain quantization (`default_shrink`), so clipping never increases
    any channel's output error."""
    k, n = w.shape
    group = scheme.group_size
    g = scheme.num_groups(k)
    pad = g * group - k
    w = np.asarray(w, np.float32)
    h = np.asarray(h, np.float32)
    hp = np.zeros((g * group, g * group), np.float32)
    hp[:k, :k] = h
    hb = np.stack([hp[i * group:(i + 1) * group, i * group:(i + 1) * group] for i in range(g)])  # [G, B, B]
    ratios = 1.0 - np.arange(int(CLIP_MAX_SHRINK * CLIP_GRID), dtype=np.float32) / CLIP_GRID

    def batch_errors(r0: int) -> np.ndarray:
        rs = ratios[r0:r0 + batch]
        shrink = np.broadcast_to(rs[None, :, None], (g, len(rs), n))
        delta = _side_by_side(scheme, np.broadcast_to(w[:, None, :], (k, len(rs), n)), scale_dtype, shrink) \
            - w[:, None, :]
        db = np.concatenate([delta, np.zeros((pad, len(rs), n), np.float32)]).reshape(g, group, -1)
        return column_quadratic_forms(hb, db).reshape(g, len(rs), n)

    errs = _grid_map(batch_errors, range(0, len(ratios), batch))
    best = ratios[np.argmin(np.concatenate(errs, axis=1), axis=1)]  # [G, out]; ties: the larger ratio
    default = scheme.default_shrink(w, scale_dtype)  # what quantizing without a clip does
    deltas = np.stack(_grid_map(lambda sh: scheme.fake_quantize(w, scale_dtype, shrink=sh) - w,
                                (default, best)), axis=1)
    whole = _output_errors(h, deltas.reshape(k, -1)).reshape(2, n)
    return np.where(whole[1] <= whole[0], best, default).astype(np.float32)
# -- GPTQ ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GptqInverse:
    """What GPTQ needs of H for any weight reading that input: the row order, the dead
    inputs (diag H = 0) and the upper Cholesky factor U of the damped (and reordered) H⁻¹
    = UᵀU. The linears sharing one input share it (q/k/v, gate/up): one inversion."""

    order: np.ndarray
    dead: np.ndarray
    hinv: np.ndarray
    act_order: bool


def gptq_inverse(hessian: np.ndarray, damp: float = GPTQ_DAMP, act_order: bool = False) -> GptqInverse:
    """`damp` × mean(diag H) is added to H's diagonal (AutoGPTQ's percdamp); with
    `act_order` the rows go in decreasing diag(H)."""
    h = np.array(hessian, np.float64)
    k = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    order = np.arange(k)
    if act_order:
        order = np.argsort(-np.diag(h), kind="stable")
        h = h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    return GptqInverse(order, dead, np.linalg.cholesky(np.linalg.inv(h)).T, act_order)


def gptq_quantize(w: np.ndarray, hessian: np.ndarray | None, scheme: Int4, scale_dtype=np.float16,
                  damp: float = GPTQ_DAMP, block: int = GPTQ_BLOCK, act_order: bool = False,
                  inverse: GptqInverse | None = None) -> QuantizedTensor:
    """GPTQ of `w` [in, out] given H = Σ xᵀx [in, in] (float64) of its inputs, or its
    `inverse` (`gptq_inverse(H, damp, act_order)`, shared by the linears of one input).

    `act_order` (AutoGPTQ's desc_act with static groups): rows are quantized in order of
    decreasing diag(H), the inputs with the largest activations first, while every
    block's parameters come from the weight as it was before any update (the blocks
    stay contiguous input rows, as the graph stores them)."""
    if inverse is None:
        inverse = gptq_inverse(hessian, damp, act_order)
    act_order, order, hinv = inverse.act_order, inverse.order, inverse.hinv
    w = np.array(w, np.float64)
    k, n = w.shape
    group = scheme.group_size
    if block % group:
        raise ValueError(f"GPTQ block {block} must be a multiple of the group size {group}")
    w[inverse.dead, :] = 0.0
    g = scheme.num_groups(k)
    scales = np.zeros((g, n), np.float32)
    zeros = None if scheme.symmetric else np.zeros((g, n), np.float32)  # per-block offsets
    if act_order:
        s, z = scheme.params(w.astype(np.float32), scale_dtype)
        scales[:] = s
        if zeros is not None:
            zeros[:] = z
        w = w[order]
    codes = np.zeros((k, n), np.int8)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = order[i1 + i]  # the input row this step quantizes
            gi = row // group
            if not act_order and row % group == 0:  # parameters of the updated block
                s, z = scheme.params(w1[i:i + group].astype(np.float32), scale_dtype)
                scales[gi] = s[0]
                if zeros is not None:
                    zeros[gi] = z[0]
            z = None if zeros is None else zeros[gi:gi + 1]
            c = scheme.codes(w1[i:i + 1].astype(np.float32), scales[gi:gi + 1], z)
            codes[row] = c[0]
            deq = c[0].astype(np.float64) * scales[gi] + (0 if z is None else z[0].astype(np.float64))
            e = (w1[i] - deq) / h1[i, i]
            w1[i:] -= np.outer(h1[i, i:], e)
            err1[i] = e
        w[i2:] -= hinv[i1:i2, i2:].T @ err1
    return QuantizedTensor("int4", codes, scales, zeros, axis=0, block_size=group)
