"""Calibrated int4 algorithms in plain numpy: AWQ (activation-aware scales and clipping)
and GPTQ (second-order error compensation). Weights are `[in, out]`; activations
`x` are `[tokens, in]`.

AWQ (Lin et al. 2023, as AutoAWQ does it): for the linears that share one input,
search α ∈ {0, 1/20, …, 19/20} for per-input-channel scales

    s = mean|x|^α / mean|Ŵ|^(1−α)        (Ŵ: |W| normalised per quantization block)

minimising ‖x·W − (x/s)·Q(s·W)‖²; the 1/s is folded into whatever produced x (the
RMSNorm weight, or the output columns of the linear before it). Then, per linear
except q/k, search a clipping ratio per block and output channel that minimises that
block's output error. RTN is the same quantizer without either search. Output errors are computed from
H = Σ xᵀx over every calibration row (‖xΔ‖² summed = tr(ΔᵀHΔ)), not from a sample.

GPTQ (Frantar et al. 2022): quantize input rows one at a time, and push each row's
rounding error onto the rows not yet quantized through the inverse Hessian
H = XᵀX (+1 % damping), in blocks of 128 rows; block parameters are taken from the
error-updated weights when a block starts.
"""

from __future__ import annotations

import numpy as np

from llmbuild.quantize.schemes import Int4, QuantizedTensor

AWQ_GRID = 20
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128


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


def _output_error(h: np.ndarray, delta: np.ndarray) -> float:
    """Σ over calibration rows of ‖x·Δ‖² = tr(Δᵀ H Δ), H = Σ xᵀx (exact, all rows)."""
    return float(np.sum((h @ delta) * delta))


def awq_search_scales(h: np.ndarray, x_mean_abs: np.ndarray, weights: list[np.ndarray], scheme: Int4,
                      scale_dtype=np.float16) -> tuple[np.ndarray, dict]:
    """Best per-input-channel scales [in] for the linears `weights` sharing one input,
    whose rows give H = Σ xᵀx [in, in] and mean |x| [in]."""
    w = np.concatenate(weights, axis=1).astype(np.float32)
    h = np.asarray(h, np.float32)
    w_mean = _block_normalized_mean(w, scheme.group_size)
    best, best_loss, losses = np.ones(w.shape[0], np.float32), np.inf, []
    for r in range(AWQ_GRID):
        alpha = r / AWQ_GRID
        s = np.power(np.maximum(x_mean_abs, 1e-8), alpha) / (np.power(w_mean, 1 - alpha) + 1e-4)
        s = np.maximum(s, 1e-4)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        wq = scheme.quantize(w * s[:, None], scale_dtype).dequantize() / s[:, None]
        loss = _output_error(h, w - wq)
        losses.append(loss)
        if loss < best_loss:
            best_loss, best = loss, s
    return best, {"alpha": float(np.argmin(losses)) / AWQ_GRID, "loss": best_loss, "loss_alpha0": losses[0]}


def awq_search_clip(h: np.ndarray, w: np.ndarray, scheme: Int4, scale_dtype=np.float16) -> np.ndarray:
    """Best range shrink [G, out] per block and output channel (1.0 = no clipping), by
    each block's own output error Δ_gᵀ H_gg Δ_g (H's diagonal blocks: all rows)."""
    k, n = w.shape
    group = scheme.group_size
    g = scheme.num_groups(k)
    pad = g * group - k
    hp = np.zeros((g * group, g * group), np.float32)
    hp[:k, :k] = h
    hb = np.stack([hp[i * group:(i + 1) * group, i * group:(i + 1) * group] for i in range(g)])  # [G, B, B]

    def block_error(delta):  # [G, out]
        db = np.concatenate([delta, np.zeros((pad, n), np.float32)], axis=0).reshape(g, group, n)
        return np.sum(np.matmul(hb, db) * db, axis=1)

    best_err = np.full((g, n), np.inf, np.float32)
    best = np.ones((g, n), np.float32)
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        ratio = 1.0 - i / CLIP_GRID
        shrink = np.full((g, n), ratio, np.float32)
        err = block_error(scheme.quantize(w, scale_dtype, shrink=shrink).dequantize() - w)
        better = err < best_err
        best_err[better] = err[better]
        best[better] = ratio
    return best


# -- GPTQ ---------------------------------------------------------------------------------


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, scheme: Int4, scale_dtype=np.float16,
                  damp: float = GPTQ_DAMP, block: int = GPTQ_BLOCK) -> QuantizedTensor:
    """GPTQ of `w` [in, out] given H = Σ xᵀx [in, in] (float64) of its inputs."""
    w = np.array(w, np.float64)
    h = np.array(hessian, np.float64)
    k, n = w.shape
    group = scheme.group_size
    if block % group:
        raise ValueError(f"GPTQ block {block} must be a multiple of the group size {group}")
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper U with H⁻¹ = UᵀU
    g = scheme.num_groups(k)
    scales = np.zeros((g, n), np.float32)
    zeros = None if scheme.symmetric else np.zeros((g, n), np.float32)  # per-block offsets
    codes = np.zeros((k, n), np.int8)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if row % group == 0:
                gi = row // group
                s, z = scheme.params(w1[i:i + group].astype(np.float32), scale_dtype)
                scales[gi] = s[0]
                if zeros is not None:
                    zeros[gi] = z[0]
            gi = row // group
            z = None if zeros is None else zeros[gi:gi + 1]
            c = scheme.codes(w1[i:i + 1].astype(np.float32), scales[gi:gi + 1], z)
            codes[row] = c[0]
            deq = c[0].astype(np.float64) * scales[gi] + (0 if z is None else z[0].astype(np.float64))
            e = (w1[i] - deq) / h1[i, i]
            w1[i:] -= np.outer(h1[i, i:], e)
            err1[i] = e
        w[i2:] -= hinv[i1:i2, i2:].T @ err1
    return QuantizedTensor("int4", codes, scales, zeros, axis=0, block_size=group)
