"""Llama decoder as an ONNX opset-24 graph, composed from llmbuild.graph.blocks.

    input_ids ─► embed ─► [ decoder layer ] × L ─► gather(logits_indices) ─► norm ─► lm_head ─► logits

Decoder layer (pre-norm, SwiGLU MLP, grouped-query attention with rotary positions):

    x ─┬─► RMSNorm ─► q,k,v proj ─► RoPE(q,k) ─► KV-cache update ─► Attention ─► o_proj ─┐
       └──────────────────────────────────────────────────────────────────────────────(+)─► h
    h ─┬─► RMSNorm ─► down( silu(gate(·)) * up(·) ) ─┐
       └────────────────────────────────────────────(+)─► x'

Weights keep their HF names (from the spec); linear weights are stored transposed ([in, out]).
The families on this decoder vary it through their specs only: biases on linears
(`Linear.bias`, Qwen2), per-head q/k norms (`spec.head_norms`, Qwen3; the attention
block's `q_norm`/`k_norm`), partial rotary and
LongRoPE (`spec.rotary_dim`, models/rope.py; Phi-3), fused source tensors (read as the
per-role blocks by llmbuild.source.split, Phi-3).
"""

from __future__ import annotations

import math

from llmbuild.graph import blocks
from llmbuild.graph.builder import GraphBuilder
from llmbuild.models.compose import annotate_scale_groups, logits_head
from llmbuild.models.rope import cos_sin_tables


def dense_mlp(gb: GraphBuilder, linear, h2, layer: int):
    """down(silu(gate(h2)) * up(h2)) [B, S, H], and the values its scale groups read."""
    act = blocks.silu_gate(gb, linear(h2, layer, "gate"), linear(h2, layer, "up"))  # [B, S, I]
    return linear(act, layer, "down"), {"mlp_input": h2, "down_input": act}


def build(gb: GraphBuilder, spec, config: dict, source, max_seq_len: int, *, mlp=None, scale_groups=None) -> None:
    """Add the decoder's inputs, nodes and outputs to `gb`; weights read lazily from `source`.

    `mlp(gb, linear, h2, layer) -> (y, scale-group values)` is the feed-forward of a layer
    (default: `dense_mlp`; the mixture-of-experts decoder, models/mixtral/model.py, passes
    its own), `scale_groups(layer)` the groups it annotates (default: the spec's)."""
    mlp = mlp or dense_mlp
    d = spec.dims(config)
    sizes = d.sizes()
    inp = blocks.decoder_inputs(gb, layers=d.layers, kv_heads=d.kv_heads, head_dim=d.head_dim)
    rotary_dim = spec.rotary_dim(config)  # < head_dim: partial rotary (Phi-4-mini)
    cos, sin = cos_sin_tables(config, rotary_dim, max_seq_len)  # [max_seq_len, rotary_dim/2]
    rotary = blocks.Rotary(gb.const(cos.astype(gb.np_dtype), "rope.cos"), gb.const(sin.astype(gb.np_dtype), "rope.sin"),
                           inp.position_ids, rotary_dim)

    def linear(x, layer, role):
        lin = spec.linear(role)
        return blocks.linear(gb, source, x, spec.linear_weight_name(layer, role), in_features=sizes[lin.inputs],
                             out_features=sizes[lin.outputs], role=role, layer=layer,
                             parallel=None if lin.shard is None else ("row" if lin.shard.row_parallel else "column"),
                             bias=spec.linear_bias_name(layer, role) if lin.bias else None)

    def norm(x, name, layer, width=d.hidden):
        return blocks.rms_norm(gb, source, x, name, width=width, eps=d.rms_eps, layer=layer)

    embed = blocks.weight(gb, source, spec.embed, (d.vocab, d.hidden))
    x = gb.op("Gather", [embed, inp.input_ids])  # x: [B, S, H]
    presents = []
    for i in range(d.layers):
        p = spec.layer_prefix(i)
        # -- attention block
        h = norm(x, p + "input_layernorm.weight", i)
        q, k, v = linear(h, i, "q"), linear(h, i, "k"), linear(h, i, "v")  # [B, S, Hq*D], [B, S, Hkv*D] x2
        head_norms = {}
        if spec.head_norms:  # per-head q/k RMSNorm before rotary, over head_dim: [B, S, H, D] (Qwen3)
            head_norms = {f"{x}_norm": lambda t, m=m, i=i: norm(t, f"{p}{m}.weight", i, d.head_dim)
                          for x, m in zip("qk", spec.head_norms)}
        attn, present_k, present_v = blocks.attention(
            gb, q=q, k=k, v=v, heads=d.heads, kv_heads=d.kv_heads, head_dim=d.head_dim, rotary=rotary,
            cache=inp.cache(i), layer=i, scale=1.0 / math.sqrt(d.head_dim),
            window=spec.attention_window(config, i), **head_norms)  # attn: [B, S, Hq*D]
        x = gb.op("Add", [x, linear(attn, i, "o")])
        # -- MLP block
        h2 = norm(x, p + "post_attention_layernorm.weight", i)
        y, groups = mlp(gb, linear, h2, i)  # [B, S, H]
        x = gb.op("Add", [x, y])
        presents.append((present_k, present_v))
        annotate_scale_groups(spec, i, {"attention_input": h, **groups},
                              groups=None if scale_groups is None else scale_groups(i))

    logits = logits_head(gb, spec, source, x, inp, d, embed, norm)  # [B, K, V]
    blocks.decoder_outputs(gb, logits, presents, vocab=d.vocab, kv_heads=d.kv_heads, head_dim=d.head_dim)
