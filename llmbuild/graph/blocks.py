"""Decoder building blocks over `GraphBuilder`, each annotating what it builds
(`llmbuild.graph.annotations`) so that later passes read meaning, not node patterns.

Model files (`llmbuild/models/<arch>/model.py`) compose these with explicit keyword
arguments; weights are named by their HF names and read lazily from the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from llmbuild.graph import annotations as ann
from llmbuild.graph.builder import GraphBuilder


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding inputs shared by all layers: cos/sin tables
    [max_positions, dim/2] and the graph's position_ids; `dim` < head_dim = partial."""

    cos: ir.Value
    sin: ir.Value
    position_ids: ir.Value
    dim: int


@dataclass(frozen=True)
class KVCache:
    """One layer's static cache inputs and the per-pass write positions."""

    past_key: ir.Value
    past_value: ir.Value
    write_indices: ir.Value  # [B] tokens already cached
    kv_len: ir.Value  # [B] write_indices + S


def weight(gb: GraphBuilder, source, name: str, shape: tuple[int, ...], *, transpose: bool = False) -> ir.Value:
    """Initializer `name` from the source (HF layout), optionally stored transposed."""
    if transpose:
        return gb.weight(name, shape, lambda: source.load(name).T)
    return gb.weight(name, shape, lambda: source.load(name))


def linear(gb: GraphBuilder, source, x: ir.Value, name: str, *, in_features: int, out_features: int, role: str,
           layer: int | None, parallel: str | None = None, bias: str | None = None) -> ir.Value:
    """
    x [.., in] ──MatMul(W [in, out])──► (+ b [out]) ──► y [.., out]

    W is the HF weight [out, in] stored transposed; the MatMul is annotated with the
    weight's name, role, layer and tensor-parallel kind.
    """
    w = weight(gb, source, name, (in_features, out_features), transpose=True)
    y = gb.op("MatMul", [x, w])
    ann.annotate(y.producer(), ann.LINEAR,
                 {"weight": name, "role": role, "layer": layer, "parallel": parallel, "tied": False})
    if bias is not None:
        y = gb.op("Add", [y, weight(gb, source, bias, (out_features,))])
    return y


def rms_norm(gb: GraphBuilder, source, x: ir.Value, name: str, *, width: int, eps: float,
             layer: int | None, offset: int = 0) -> ir.Value:
    """
    RMSNormalization over the last axis (float32 statistics), weight `name` [width].

    offset 0 (Llama):  x ─RMSNormalization(scale = w)─► y
    offset 1 (Gemma):  w ─Add(1)─► 1 + w ─┐            (HF stores w; the scale is 1 + w;
                       x ─RMSNormalization(scale)─► y   the Add is folded by the runtimes)

    The annotation's `offset` tells weight transforms (AWQ folding a scale s into the
    norm: stored w' = (w + offset) / s - offset) what the stored weight means.
    """
    w = weight(gb, source, name, (width,))
    if offset:
        w = gb.op("Add", [w, gb.const(np.array(offset, gb.np_dtype))])
    y = gb.rms_norm(x, w, eps)
    ann.annotate(y.producer(), ann.NORM, {"weight": name, "layer": layer, "offset": offset})
    return y


def scale_group(value: ir.Value, *, name: str, kind: str, source: str, linears: list[str], layer: int) -> None:
    """Mark the node producing `value` as the head of a scale group (AWQ folding)."""
    ann.annotate(value.producer(), ann.SCALE_GROUP,
                 {"name": name, "kind": kind, "source": source, "linears": linears, "layer": layer})


def attention(gb: GraphBuilder, *, q: ir.Value, k: ir.Value, v: ir.Value, heads: int, kv_heads: int,
              head_dim: int, rotary: Rotary | None, cache: KVCache, layer: int, scale: float,
              window: int | None = None, softcap: float = 0.0,
              q_norm: Callable[[ir.Value], ir.Value] | None = None,
              k_norm: Callable[[ir.Value], ir.Value] | None = None) -> tuple:
    """
    q [B,S,Hq*D] ─Reshape─► [B,S,Hq,D] (─q_norm─) ─Transpose─► [B,Hq,S,D] ─RoPE─────────────────────┐
    k [B,S,Hkv*D] ─Reshape─► (─k_norm─) ─Transpose─► ─RoPE─► TensorScatter(past_key, write_indices) ─► present_key ─┤
    v [B,S,Hkv*D] ─Reshape─► ─Transpose─────────► TensorScatter(past_value, write_indices) ─► present_value ─┴─►
        Attention(is_causal=1, nonpad_kv_seqlen=kv_len, GQA by Hq/Hkv, softcap)       (no window)
        Attention(attn_mask = causal window mask, nonpad_kv_seqlen=kv_len, ...)       (`window`)
            ─► [B,Hq,S,D] ─► o [B,S,Hq*D]

    `window` (sliding-window attention, HF's convention): a token attends to itself and
    the window - 1 tokens before it, through a boolean mask built once per window size
    (`window_mask`). `softcap` > 0: attention logits become softcap·tanh(logits/softcap)
    (the Attention attribute). `q_norm` / `k_norm`: applied per head ([B,S,H,D], last
    axis) before rotary (Qwen3, Gemma 3: per-head RMSNorms).

    Returns (o, present_key, present_value). The Attention node is annotated with the
    [B,S,H,D] q/k/v values as rotary reads them and the rotary inputs (the CPU lowering
    fuses the whole core from them), the window and the soft-cap.
    """
    q_heads = _heads(gb, q, heads, head_dim, f"attention.{layer}.q_heads", q_norm)
    k_heads = _heads(gb, k, kv_heads, head_dim, f"attention.{layer}.k_heads", k_norm)
    v_heads = _heads(gb, v, kv_heads, head_dim, f"attention.{layer}.v_heads", None)
    q4, k4, v4 = (gb.op("Transpose", [x], {"perm": [0, 2, 1, 3]}) for x in (q_heads, k_heads, v_heads))
    if rotary is not None:  # x [B, H, S, D]; HF's rotate_half layout (not interleaved)
        attrs = {"interleaved": 0}
        if rotary.dim != head_dim:
            attrs["rotary_embedding_dim"] = rotary.dim
        q4 = gb.op("RotaryEmbedding", [q4, rotary.cos, rotary.sin, rotary.position_ids], attrs)
        k4 = gb.op("RotaryEmbedding", [k4, rotary.cos, rotary.sin, rotary.position_ids], attrs)
    present_k = gb.op("TensorScatter", [cache.past_key, k4, cache.write_indices], {"axis": 2})
    present_v = gb.op("TensorScatter", [cache.past_value, v4, cache.write_indices], {"axis": 2})
    # TensorRT's IAttention takes a mask or a causal kind, not both: a windowed layer's mask
    # is causal itself.
    attrs = {"is_causal": 1 if window is None else 0, "scale": float(scale)}
    if softcap:
        attrs["softcap"] = float(softcap)
    mask = None if window is None else window_mask(gb, cache, window)
    o4 = gb.op("Attention", [q4, present_k, present_v, mask, None, None, cache.kv_len], attrs)
    ann.annotate(o4.producer(), ann.ATTENTION, {
        "layer": layer, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "scale": float(scale),
        "window": window, "softcap": float(softcap), "q": q_heads.name, "k": k_heads.name, "v": v_heads.name,
        "rotary": None if rotary is None else {"cos": rotary.cos.name, "sin": rotary.sin.name,
                                               "position_ids": rotary.position_ids.name, "dim": rotary.dim},
    })
    o = gb.op("Transpose", [o4], {"perm": [0, 2, 1, 3]})  # [B, S, Hq, D]
    o = gb.op("Reshape", [o, gb.const(np.array([0, 0, heads * head_dim], np.int64))])
    return o, present_k, present_v


def window_mask(gb: GraphBuilder, cache: KVCache, window: int) -> ir.Value:
    """
    The causal sliding-window mask of one pass, shared by every layer with this window:

      rows   = Range(0, cache_len)                              [L]   cache row j
      q_rows = write_indices[:, None] + Range(0, S)[None, :]    [B,S] row of new token s
      mask   = (rows <= q_rows) & (rows > q_rows - window)      [B,1,S,L] bool (True = attend)

    New token s of sequence b sees rows q_row - window + 1 .. q_row: itself and window - 1
    tokens before it, as HF's sliding-window mask (kv_idx > q_idx - sliding_window on top
    of causal). Rows past a sequence's kv_len are excluded by nonpad_kv_seqlen as before.
    The mask replaces is_causal (TensorRT's attention takes one or the other).
    """
    memo = gb.__dict__.setdefault("_window_masks", {})
    key = (cache.write_indices.name, window)
    if key in memo:
        return memo[key]
    zero, one = gb.const(np.array(0, np.int64)), gb.const(np.array(1, np.int64))
    cache_len = gb.op("Squeeze", [gb.op("Shape", [cache.past_key], {"start": 2, "end": 3}),
                                  gb.const(np.array([0], np.int64))])
    rows = gb.op("Range", [zero, cache_len, one])  # [L]
    s_len = gb.op("ReduceMax", [gb.op("Sub", [cache.kv_len, cache.write_indices])], {"keepdims": 0})  # S
    steps = gb.op("Range", [zero, s_len, one])  # [S]
    q_rows = gb.op("Add", [gb.op("Unsqueeze", [cache.write_indices, gb.const(np.array([1], np.int64))]),
                           steps])  # [B, S]
    q_rows = gb.op("Unsqueeze", [q_rows, gb.const(np.array([1, 3], np.int64))])  # [B, 1, S, 1]
    low = gb.op("Sub", [q_rows, gb.const(np.array(window, np.int64))])  # [B, 1, S, 1]
    mask = gb.op("And", [gb.op("LessOrEqual", [rows, q_rows]), gb.op("Greater", [rows, low])])  # [B, 1, S, L]
    mask.name = f"window_mask.{window}"
    memo[key] = mask
    return mask


def _heads(gb: GraphBuilder, x: ir.Value, heads: int, head_dim: int, name: str,
           norm: Callable[[ir.Value], ir.Value] | None) -> ir.Value:
    """[B, S, H*D] -> [B, S, H, D] (then `norm` per head), named for the attention annotation."""
    y = gb.op("Reshape", [x, gb.const(np.array([0, 0, heads, head_dim], np.int64))])
    if norm is not None:
        y = norm(y)
    y.name = name
    return y


def silu_gate(gb: GraphBuilder, gate: ir.Value, up: ir.Value) -> ir.Value:
    """
    gate ─► gate * Sigmoid(gate) ─┐
    up ───────────────────────────┴─Mul─► silu(gate) * up
    """
    return gb.op("Mul", [gb.op("Mul", [gate, gb.op("Sigmoid", [gate])]), up])


def gelu_tanh_gate(gb: GraphBuilder, gate: ir.Value, up: ir.Value) -> ir.Value:
    """
    gate ─► Gelu(approximate="tanh") ─┐
    up ───────────────────────────────┴─Mul─► gelu_tanh(gate) * up     (HF gelu_pytorch_tanh)
    """
    return gb.op("Mul", [gb.op("Gelu", [gate], {"approximate": "tanh"}), up])


def softcap(gb: GraphBuilder, x: ir.Value, cap: float) -> ir.Value:
    """
    x ─Div(cap)─► Tanh ─Mul(cap)─► cap·tanh(x / cap)       (Gemma 2's final-logit soft-capping)
    """
    c = gb.const(np.array(cap, gb.np_dtype))
    return gb.op("Mul", [gb.op("Tanh", [gb.op("Div", [x, c])]), c])


def gathered_rows(gb: GraphBuilder, x: ir.Value, logits_indices: ir.Value) -> ir.Value:
    """
    x [B, S, H] ─GatherND(Unsqueeze(logits_indices, -1), batch_dims=1)─► [B, K, H]
    Only the requested positions go through the final norm and lm_head.
    """
    idx = gb.op("Unsqueeze", [logits_indices, gb.const(np.array([-1], np.int64))])  # [B, K, 1]
    return gb.op("GatherND", [x, idx], {"batch_dims": 1})


def lm_head(gb: GraphBuilder, source, x: ir.Value, *, hidden: int, vocab: int, logits_indices: ir.Value,
            tied_embedding: ir.Value | None, weight_name: str) -> ir.Value:
    """
    untied: x [B,K,H] ─MatMul(lm_head [H, V])─► logits [B,K,V]
    tied:   x ─Reshape [B*K, H]─Gemm(E [V, H], transB=1)─Reshape [B, K, V]─► logits
            (x @ Eᵀ without a transposed copy of the embedding)
    """
    if tied_embedding is None:
        return linear(gb, source, x, weight_name, in_features=hidden, out_features=vocab, role="lm_head", layer=None)
    flat = gb.op("Reshape", [x, gb.const(np.array([-1, hidden], np.int64))])
    logits = gb.op("Gemm", [flat, tied_embedding], {"transB": 1})
    ann.annotate(logits.producer(), ann.LINEAR,
                 {"weight": tied_embedding.name, "role": "lm_head", "layer": None, "parallel": None, "tied": True})
    b_k = gb.op("Shape", [logits_indices])
    out_shape = gb.op("Concat", [b_k, gb.const(np.array([vocab], np.int64))], {"axis": 0})
    return gb.op("Reshape", [logits, out_shape])


@dataclass(frozen=True)
class DecoderInputs:
    """The graph inputs of the decoder contract (llmbuild.graph.io)."""

    input_ids: ir.Value
    position_ids: ir.Value
    write_indices: ir.Value
    logits_indices: ir.Value
    pasts: list[tuple[ir.Value, ir.Value]]
    kv_len: ir.Value  # [B] = write_indices + S

    def cache(self, layer: int) -> KVCache:
        past_key, past_value = self.pasts[layer]
        return KVCache(past_key, past_value, self.write_indices, self.kv_len)


def decoder_inputs(gb: GraphBuilder, *, layers: int, kv_heads: int, head_dim: int) -> DecoderInputs:
    """Declare the contract's inputs (one static KV cache pair per layer)."""
    from llmbuild.graph import io

    input_ids = gb.input(io.INPUT_IDS, ir.DataType.INT64, [io.BATCH, io.SEQ])
    position_ids = gb.input(io.POSITION_IDS, ir.DataType.INT64, [io.BATCH, io.SEQ])
    write_indices = gb.input(io.WRITE_INDICES, ir.DataType.INT64, [io.BATCH])
    logits_indices = gb.input(io.LOGITS_INDICES, ir.DataType.INT64, [io.BATCH, io.NUM_LOGITS])
    shape = [io.BATCH, kv_heads, io.CACHE_LEN, head_dim]
    pasts = [(gb.input(io.past_key(i), gb.dtype, shape), gb.input(io.past_value(i), gb.dtype, shape))
             for i in range(layers)]
    seq_len = gb.op("Shape", [input_ids], {"start": 1, "end": 2})  # [1]
    kv_len = gb.op("Add", [write_indices, seq_len])  # [B]
    return DecoderInputs(input_ids, position_ids, write_indices, logits_indices, pasts, kv_len)


def decoder_outputs(gb: GraphBuilder, logits: ir.Value, presents: list[tuple[ir.Value, ir.Value]], *,
                    vocab: int, kv_heads: int, head_dim: int) -> None:
    """Declare the contract's outputs: float32 logits and every layer's present K/V."""
    from llmbuild.graph import io

    if gb.dtype != ir.DataType.FLOAT:
        logits = gb.op("Cast", [logits], {"to": ir.DataType.FLOAT})
    gb.output(logits, io.LOGITS, ir.DataType.FLOAT, [io.BATCH, io.NUM_LOGITS, vocab])
    shape = [io.BATCH, kv_heads, io.CACHE_LEN, head_dim]
    for i, (pk, pv) in enumerate(presents):
        gb.output(pk, io.present_key(i), gb.dtype, shape)
        gb.output(pv, io.present_value(i), gb.dtype, shape)
