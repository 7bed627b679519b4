"""Gemma 2 / Gemma 3 decoder as an ONNX opset-24 graph, composed from llmbuild.graph.blocks.

    input_ids ─► embed × √H ─► [ decoder layer ] × L ─► gather(logits_indices) ─► norm ─► lm_head
              ─► (final soft-cap: c·tanh(logits/c)) ─► logits

Decoder layer (every norm is RMSNorm with scale 1 + w; "sandwich" norms around both blocks):

    x ─┬─► norm ─► q,k,v ─► (q/k norm per head) ─► RoPE ─► KV cache ─► Attention(window?, softcap?) ─► o_proj ─► norm ─┐
       └──────────────────────────────────────────────────────────────────────────────────────────────────────(+)─► h
    h ─┬─► norm ─► down( gelu_tanh(gate(·)) * up(·) ) ─► norm ─┐
       └──────────────────────────────────────────────────────(+)─► x'

The spec says what varies by family and layer: the window and rope table of layer i
(`attention_window`, `rope_config`), the attention scale and soft-caps, q/k norms (Gemma 3).
"""

from __future__ import annotations

import numpy as np

from llmbuild.graph import blocks
from llmbuild.graph.builder import GraphBuilder
from llmbuild.models.compose import annotate_scale_groups, logits_head
from llmbuild.models.rope import cos_sin_tables


def build(gb: GraphBuilder, spec, config: dict, source, max_seq_len: int) -> None:
    d = spec.dims(config)
    sizes = d.sizes()
    inp = blocks.decoder_inputs(gb, layers=d.layers, kv_heads=d.kv_heads, head_dim=d.head_dim)
    rotaries: dict[str, blocks.Rotary] = {}  # one cos/sin table pair per distinct rope config

    def rotary(layer: int) -> blocks.Rotary:
        key, rope = spec.rope_config(config, layer)
        if key not in rotaries:
            cos, sin = cos_sin_tables(rope, d.head_dim, max_seq_len)  # [max_seq_len, D/2]
            suffix = "" if not rotaries else f".{key}"
            rotaries[key] = blocks.Rotary(gb.const(cos.astype(gb.np_dtype), f"rope.cos{suffix}"),
                                          gb.const(sin.astype(gb.np_dtype), f"rope.sin{suffix}"),
                                          inp.position_ids, d.head_dim)
        return rotaries[key]

    def linear(x, layer, role):
        lin = spec.linear(role)
        return blocks.linear(gb, source, x, spec.linear_weight_name(layer, role), in_features=sizes[lin.inputs],
                             out_features=sizes[lin.outputs], role=role, layer=layer,
                             parallel=None if lin.shard is None else ("row" if lin.shard.row_parallel else "column"))

    def norm(x, name, layer, width=d.hidden):
        return blocks.rms_norm(gb, source, x, name, width=width, eps=d.rms_eps, layer=layer, offset=spec.norm_offset)

    embed = blocks.weight(gb, source, spec.embed, (d.vocab, d.hidden))
    x = gb.op("Gather", [embed, inp.input_ids])  # x: [B, S, H]
    x = gb.op("Mul", [x, gb.const(np.array(d.hidden ** 0.5, gb.np_dtype), "embed.scale")])  # HF: in the dtype
    scale, softcap = spec.attention_scale(config), spec.attention_softcap(config)
    presents = []
    for i in range(d.layers):
        p = spec.layer_prefix(i)
        # -- attention block
        h = norm(x, p + "input_layernorm.weight", i)
        q, k, v = linear(h, i, "q"), linear(h, i, "k"), linear(h, i, "v")  # [B, S, Hq*D], [B, S, Hkv*D] x2
        qk_norms = {}
        if spec.head_norms:  # per head, over head_dim: [B, S, H, D] (Gemma 3)
            qk_norms = {f"{x}_norm": lambda t, m=m, i=i: norm(t, f"{p}{m}.weight", i, d.head_dim)
                        for x, m in zip("qk", spec.head_norms)}
        attn, present_k, present_v = blocks.attention(
            gb, q=q, k=k, v=v, heads=d.heads, kv_heads=d.kv_heads, head_dim=d.head_dim, rotary=rotary(i),
            cache=inp.cache(i), layer=i, scale=scale, window=spec.attention_window(config, i), softcap=softcap,
            **qk_norms)  # attn: [B, S, Hq*D]
        x = gb.op("Add", [x, norm(linear(attn, i, "o"), p + "post_attention_layernorm.weight", i)])
        # -- MLP block
        h2 = norm(x, p + "pre_feedforward_layernorm.weight", i)
        act = blocks.gelu_tanh_gate(gb, linear(h2, i, "gate"), linear(h2, i, "up"))  # [B, S, I]
        x = gb.op("Add", [x, norm(linear(act, i, "down"), p + "post_feedforward_layernorm.weight", i)])
        presents.append((present_k, present_v))
        annotate_scale_groups(spec, i, {"attention_input": h, "mlp_input": h2, "down_input": act})

    logits = logits_head(gb, spec, source, x, inp, d, embed, norm)  # [B, K, V]
    if spec.final_softcap(config):
        logits = blocks.softcap(gb, logits, spec.final_softcap(config))
    blocks.decoder_outputs(gb, logits, presents, vocab=d.vocab, kv_heads=d.kv_heads, head_dim=d.head_dim)
