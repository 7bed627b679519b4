"""Pieces every decoder composition (models/<family>/model.py) shares: the scale-group
annotations of a layer and the logits head. Graph code with tensor names from the spec."""

from __future__ import annotations

from llmbuild.graph import blocks


def annotate_scale_groups(spec, layer: int, values: dict, groups=None) -> None:
    """Annotate each of the spec's scale groups (or `groups`, this layer's) on the value its
    linears read in `layer` (`values`: group name -> value, e.g. {"attention_input": h,
    "mlp_input": h2, "down_input": act})."""
    p = spec.layer_prefix(layer)
    for group in spec.scale_groups if groups is None else groups:
        blocks.scale_group(values[group.name], name=group.name, kind=group.kind, layer=layer,
                           source=(p + group.source + ".weight" if group.kind == "norm"
                                   else spec.linear_weight_name(layer, group.source)),
                           linears=[spec.linear_weight_name(layer, r) for r in group.linears])


def logits_head(gb, spec, source, x, inp, d, embed, norm):
    """Only the requested positions get logits: gather(logits_indices) -> final norm ->
    lm_head (tied to `embed` when the dims say so). Returns logits [B, K, V]."""
    x = blocks.gathered_rows(gb, x, inp.logits_indices)  # x: [B, K, H]
    x = norm(x, spec.final_norm, None)
    return blocks.lm_head(gb, source, x, hidden=d.hidden, vocab=d.vocab, logits_indices=inp.logits_indices,
                          tied_embedding=embed if d.tied else None, weight_name=spec.lm_head)
