"""Llama decoder as an ONNX opset-24 graph.

    input_ids ─► embed ─► [ decoder layer ] × L ─► gather(logits_indices) ─► norm ─► lm_head ─► logits

Decoder layer (pre-norm, SwiGLU MLP, grouped-query attention with rotary positions):

    x ─┬─► RMSNorm ─► q,k,v proj ─► RoPE(q,k) ─► KV-cache update ─► Attention ─► o_proj ─┐
       └──────────────────────────────────────────────────────────────────────────────(+)─► h
    h ─┬─► RMSNorm ─► down( silu(gate(·)) * up(·) ) ─┐
       └────────────────────────────────────────────(+)─► x'

Weights keep their HF names; linear weights are stored transposed ([in, out]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from llmbuild.graph import io
from llmbuild.graph.builder import GraphBuilder
from llmbuild.models.rope import cos_sin_tables


@dataclass(frozen=True)
class LlamaDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    tied: bool

    @classmethod
    def from_config(cls, c: dict) -> "LlamaDims":
        heads = int(c["num_attention_heads"])
        return cls(
            hidden=int(c["hidden_size"]),
            intermediate=int(c["intermediate_size"]),
            layers=int(c["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            vocab=int(c["vocab_size"]),
            rms_eps=float(c.get("rms_norm_eps", 1e-6)),
            tied=bool(c.get("tie_word_embeddings", False)),
        )


def expected_shapes(d: LlamaDims) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> HF shape, for every tensor the graph reads."""
    shapes = {"model.embed_tokens.weight": (d.vocab, d.hidden), "model.norm.weight": (d.hidden,)}
    if not d.tied:
        shapes["lm_head.weight"] = (d.vocab, d.hidden)
    for i in range(d.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d.hidden,),
            p + "post_attention_layernorm.weight": (d.hidden,),
            p + "self_attn.q_proj.weight": (d.heads * d.head_dim, d.hidden),
            p + "self_attn.k_proj.weight": (d.kv_heads * d.head_dim, d.hidden),
            p + "self_attn.v_proj.weight": (d.kv_heads * d.head_dim, d.hidden),
            p + "self_attn.o_proj.weight": (d.hidden, d.heads * d.head_dim),
            p + "mlp.gate_proj.weight": (d.intermediate, d.hidden),
            p + "mlp.up_proj.weight": (d.intermediate, d.hidden),
            p + "mlp.down_proj.weight": (d.hidden, d.intermediate),
        }
    return shapes


def build(gb: GraphBuilder, config: dict, source, max_seq_len: int) -> None:
    """Add the decoder's inputs, nodes and outputs to `gb`; weights read lazily from `source`."""
    d = LlamaDims.from_config(config)

    def norm_weight(name):
        return gb.weight(name, (d.hidden,), lambda: source.load(name))

    def linear_weight(name, out_features, in_features):
        # HF stores [out, in]; MatMul wants [in, out].
        return gb.weight(name, (in_features, out_features), lambda: source.load(name).T)

    # -- inputs --------------------------------------------------------------------
    input_ids = gb.input(io.INPUT_IDS, ir.DataType.INT64, [io.BATCH, io.SEQ])
    position_ids = gb.input(io.POSITION_IDS, ir.DataType.INT64, [io.BATCH, io.SEQ])
    write_indices = gb.input(io.WRITE_INDICES, ir.DataType.INT64, [io.BATCH])
    logits_indices = gb.input(io.LOGITS_INDICES, ir.DataType.INT64, [io.BATCH, io.NUM_LOGITS])
    cache_shape = [io.BATCH, d.kv_heads, io.CACHE_LEN, d.head_dim]
    pasts = [
        (gb.input(io.past_key(i), gb.dtype, cache_shape), gb.input(io.past_value(i), gb.dtype, cache_shape))
        for i in range(d.layers)
    ]

    # -- shared per-step values ----------------------------------------------------
    cos, sin = cos_sin_tables(config, d.head_dim, max_seq_len)
    cos = gb.const(cos.astype(gb.np_dtype), "rope.cos")
    sin = gb.const(sin.astype(gb.np_dtype), "rope.sin")
    seq_len = gb.op("Shape", [input_ids], {"start": 1, "end": 2})  # [1]
    kv_len = gb.op("Add", [write_indices, seq_len])  # [B]
    scale = 1.0 / math.sqrt(d.head_dim)

    embed = gb.weight("model.embed_tokens.weight", (d.vocab, d.hidden), lambda: source.load("model.embed_tokens.weight"))
    x = gb.op("Gather", [embed, input_ids])  # x: [B, S, H]

    presents = []
    for i in range(d.layers):
        p = f"model.layers.{i}."
        # -- attention block
        h = gb.rms_norm(x, norm_weight(p + "input_layernorm.weight"), d.rms_eps)
        q = gb.linear(h, linear_weight(p + "self_attn.q_proj.weight", d.heads * d.head_dim, d.hidden))
        k = gb.linear(h, linear_weight(p + "self_attn.k_proj.weight", d.kv_heads * d.head_dim, d.hidden))
        v = gb.linear(h, linear_weight(p + "self_attn.v_proj.weight", d.kv_heads * d.head_dim, d.hidden))
        q = gb.split_heads(q, d.heads, d.head_dim)  # q: [B, Hq, S, D]
        k = gb.split_heads(k, d.kv_heads, d.head_dim)  # k: [B, Hkv, S, D]
        v = gb.split_heads(v, d.kv_heads, d.head_dim)  # v: [B, Hkv, S, D]
        q = gb.rotary(q, cos, sin, position_ids)
        k = gb.rotary(k, cos, sin, position_ids)
        attn, present_k, present_v = gb.cached_attention(q, k, v, *pasts[i], write_indices, kv_len, scale)
        attn = gb.merge_heads(attn, d.heads, d.head_dim)  # attn: [B, S, Hq*D]
        o = gb.linear(attn, linear_weight(p + "self_attn.o_proj.weight", d.hidden, d.heads * d.head_dim))
        x = gb.op("Add", [x, o])
        # -- MLP block
        h = gb.rms_norm(x, norm_weight(p + "post_attention_layernorm.weight"), d.rms_eps)
        gate = gb.linear(h, linear_weight(p + "mlp.gate_proj.weight", d.intermediate, d.hidden))
        up = gb.linear(h, linear_weight(p + "mlp.up_proj.weight", d.intermediate, d.hidden))
        act = gb.op("Mul", [gb.op("Mul", [gate, gb.op("Sigmoid", [gate])]), up])  # silu(gate) * up
        x = gb.op("Add", [x, gb.linear(act, linear_weight(p + "mlp.down_proj.weight", d.hidden, d.intermediate))])
        presents.append((present_k, present_v))

    # -- head: only the requested positions get logits ------------------------------
    idx = gb.op("Unsqueeze", [logits_indices, gb.const(np.array([-1], np.int64))])  # [B, K, 1]
    x = gb.op("GatherND", [x, idx], {"batch_dims": 1})  # x: [B, K, H]
    x = gb.rms_norm(x, norm_weight("model.norm.weight"), d.rms_eps)
    if d.tied:
        # lm_head shares the embedding [V, H]: x @ E^T without a transposed copy.
        flat = gb.op("Reshape", [x, gb.const(np.array([-1, d.hidden], np.int64))])
        logits = gb.op("Gemm", [flat, embed], {"transB": 1})
        b_k = gb.op("Shape", [logits_indices])
        out_shape = gb.op("Concat", [b_k, gb.const(np.array([d.vocab], np.int64))], {"axis": 0})
        logits = gb.op("Reshape", [logits, out_shape])
    else:
        logits = gb.linear(x, linear_weight("lm_head.weight", d.vocab, d.hidden))
    if gb.dtype != ir.DataType.FLOAT:
        logits = gb.op("Cast", [logits], {"to": ir.DataType.FLOAT})

    gb.output(logits, io.LOGITS, ir.DataType.FLOAT, [io.BATCH, io.NUM_LOGITS, d.vocab])
    cache_shape = [io.BATCH, d.kv_heads, io.CACHE_LEN, d.head_dim]
    for i, (pk, pv) in enumerate(presents):
        gb.output(pk, io.present_key(i), gb.dtype, cache_shape)
        gb.output(pv, io.present_value(i), gb.dtype, cache_shape)
