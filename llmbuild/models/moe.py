"""Mixture-of-experts decoders as data: the routed-expert table of a family and the spec
mixin that turns it into tensors, linears and dims. Pure Python (no numpy, no onnx),
like llmbuild.models.spec; the graph is llmbuild/models/mixtral/model.py over the block
llmbuild/graph/moe.py.

A sparse layer's feed-forward is a router (a linear [E, H], never quantized) choosing
top-k of E experts per token, each expert a SwiGLU MLP of width `moe_intermediate`
stored in the checkpoint per expert (HF's saved layout):

    <layer>.<module>.gate.weight                      [E, H]        router
    <layer>.<module>.experts.<e>.<gate|up>.weight     [I_e, H]      e = 0 .. E-1
    <layer>.<module>.experts.<e>.<down>.weight        [H, I_e]
    <layer>.mlp.shared_expert.{gate,up,down}_proj     (Qwen2-MoE)   a dense SwiGLU every token runs,
    <layer>.mlp.shared_expert_gate.weight  [1, H]                   scaled by sigmoid(x · g)

Dense layers (Qwen's `mlp_only_layers`, `decoder_sparse_step`) are Llama's MLP of width
`intermediate_size`. The router's probabilities follow HF per family: softmax over all
E experts (float32), top-k, then renormalised to sum 1 when `normalize` says so
(Mixtral: always; Qwen2-MoE / Qwen3-MoE: the config's `norm_topk_prob`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llmbuild.models.spec import (Dims, Linear, ScaleGroup, Shard, _positive_int,
                                  layer_index)


@dataclass(frozen=True)
class Experts:
    """Where a family keeps its routed experts (module paths inside `model.layers.<i>.`)."""

    module: str  # the sparse block: "block_sparse_moe" (Mixtral) | "mlp" (Qwen)
    gate: str  # expert projections, in the order gate, up, down
    up: str
    down: str
    experts_keys: tuple[str, ...]  # config keys of E, the first present wins (transformers 5
    # writes Qwen3-MoE's num_experts as num_local_experts; published configs say num_experts)
    intermediate_key: str  # config key of an expert's width
    # normalise the top-k probabilities: True / False, or the config key that says
    normalize: bool | str = True

    @property
    def router(self) -> str:
        return f"{self.module}.gate"

    def expert(self, e: int, proj: str) -> str:
        """Module of expert e's projection `proj` ("gate" | "up" | "down")."""
        return f"{self.module}.experts.{e}.{getattr(self, proj)}"

    def stacked(self, proj: str) -> str:
        """Module name of the graph's stacked tensor of every expert's `proj`
        (the per-expert path without the index, as llama.cpp's `ffn_<proj>_exps`)."""
        return f"{self.module}.experts.{getattr(self, proj)}"


@dataclass(frozen=True)
class MoEDims(Dims):
    """Dims of a mixture-of-experts decoder (sizes named for `Linear.inputs/outputs`:
    `moe_intermediate`, `shared_intermediate`, `experts`)."""

    experts: int
    top_k: int
    moe_intermediate: int
    shared_intermediate: int  # 0: no shared expert
    normalize: bool
    sparse_layers: tuple[int, ...]

    def sizes(self) -> dict[str, int]:
        return {**super().sizes(), "moe_intermediate": self.moe_intermediate,
                "shared_intermediate": self.shared_intermediate, "experts": self.experts}


COLUMN_EXPERT = Shard(dim=0, count="moe_intermediate")
ROW_EXPERT = Shard(dim=1, count="moe_intermediate")
COLUMN_SHARED = Shard(dim=0, count="shared_intermediate")
ROW_SHARED = Shard(dim=1, count="shared_intermediate")
# The shared expert (Qwen2-MoE): Llama's MLP under another module, width shared_intermediate.
SHARED_EXPERT = (
    Linear("shared_gate", "mlp.shared_expert.gate_proj", "hidden", "shared_intermediate", COLUMN_SHARED),
    Linear("shared_up", "mlp.shared_expert.up_proj", "hidden", "shared_intermediate", COLUMN_SHARED),
    Linear("shared_down", "mlp.shared_expert.down_proj", "shared_intermediate", "hidden", ROW_SHARED),
)
DENSE_ROLES = ("gate", "up", "down")
ATTENTION_ROLES = ("q", "k", "v", "o")


class RoutedExpertsSpec:
    """Mixin for a spec whose layers' MLPs are routed experts (put it before the dense
    parent: `class MixtralSpec(RoutedExpertsSpec, MistralSpec)`). The parent's `linears`
    stay the attention and dense-MLP linears; the experts and the router are not
    `linears` (they are not MatMuls over one weight; the router stays unquantized)."""

    graph_module: ClassVar[str] = "llmbuild.models.mixtral.model"
    experts: ClassVar[Experts]
    shared_expert: ClassVar[bool] = False  # the family may have a shared expert
    shared_gate: ClassVar[str] = "mlp.shared_expert_gate"
    gguf_normalize_top_k: ClassVar[bool] = True

    # -- config ------------------------------------------------------------------------
    def check_config(self, config: dict) -> list[str]:
        problems = super().check_config(config)
        t = self.experts
        key = self.experts_key(config)
        e = _positive_int(config, key, problems)
        k = _positive_int(config, "num_experts_per_tok", problems)
        _positive_int(config, t.intermediate_key, problems)
        if e and k and k > e:
            problems.append(f"num_experts_per_tok={k} exceeds {key}={e}")
        return problems

    def experts_key(self, config: dict) -> str:
        return next((k for k in self.experts.experts_keys if k in config), self.experts.experts_keys[0])

    def sparse_layers(self, config: dict) -> tuple[int, ...]:
        """Layers whose MLP is the routed experts (HF's rule: every layer i with
        (i + 1) % decoder_sparse_step == 0 that is not in mlp_only_layers)."""
        layers = int(config["num_hidden_layers"])
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or ())
        return tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)

    def dims(self, config: dict) -> MoEDims:
        base = super().dims(config)
        t = self.experts
        normalize = t.normalize if isinstance(t.normalize, bool) else bool(config.get(t.normalize, False))
        shared = int(config.get("shared_expert_intermediate_size") or 0) if self.shared_expert else 0
        return MoEDims(**base.__dict__, experts=int(config[self.experts_key(config)]),
                       top_k=int(config["num_experts_per_tok"]), moe_intermediate=int(config[t.intermediate_key]), shared_intermediate=shared,
                       normalize=normalize, sparse_layers=self.sparse_layers(config))

    def manifest_dims(self, config: dict, precision: str) -> dict:
        d = self.dims(config)
        return {**super().manifest_dims(config, precision),
                "moe": {"experts": d.experts, "top_k": d.top_k, "moe_intermediate_size": d.moe_intermediate,
                        "shared_expert_intermediate_size": d.shared_intermediate, "normalize_top_k": d.normalize,
                        "sparse_layers": list(d.sparse_layers)}}

    # -- tensor parallelism: every expert split as a dense MLP (gate/up by output rows,
    # down by input columns of its width); the router and the shared expert's gate are
    # replicated, so every rank routes identically and the block's output is a partial sum.
    @property
    def config_keys(self) -> dict[str, str]:
        return {**super().config_keys, "moe_intermediate": self.experts.intermediate_key,
                "shared_intermediate": "shared_expert_intermediate_size"}

    def shard_hints(self, config: dict | None = None) -> dict[str, Shard]:
        hints = super().shard_hints(config)
        if self.shared_expert:
            hints.update({f"{lin.module}.weight": lin.shard for lin in SHARED_EXPERT})
        if config is not None:
            t = self.experts
            for e in range(int(config[self.experts_key(config)])):
                hints[f"{t.expert(e, 'gate')}.weight"] = hints[f"{t.expert(e, 'up')}.weight"] = COLUMN_EXPERT
                hints[f"{t.expert(e, 'down')}.weight"] = ROW_EXPERT
        return hints

    # -- per layer ---------------------------------------------------------------------
    def layer_roles(self, d: MoEDims, layer: int) -> tuple[str, ...]:
        """Roles of the linears (MatMuls over one weight) of `layer`."""
        if layer not in d.sparse_layers:
            return ATTENTION_ROLES + DENSE_ROLES
        return ATTENTION_ROLES + (tuple(lin.role for lin in SHARED_EXPERT) if d.shared_intermediate else ())

    def layer_scale_groups(self, d: MoEDims, layer: int) -> tuple[ScaleGroup, ...]:
        """AWQ scale groups of `layer`. A sparse layer's MLP input feeds the router and the
        experts too, so no scale is folded into post_attention_layernorm there; the shared
        expert's down_proj input is its own group."""
        if layer not in d.sparse_layers:
            return self.scale_groups
        groups = tuple(g for g in self.scale_groups if g.name == "attention_input")
        if d.shared_intermediate:
            groups += (ScaleGroup("shared_down_input", "linear", "shared_up", ("shared_down",)),)
        return groups

    def linear(self, role: str) -> Linear:
        for lin in SHARED_EXPERT:
            if lin.role == role:
                return lin
        return super().linear(role)

    def expert_weights(self, d: MoEDims, layer: int) -> dict[str, list[str]]:
        """proj ("gate" | "up" | "down") -> the HF names of every expert's weight, by expert."""
        p = self.layer_prefix(layer)
        return {proj: [f"{p}{self.experts.expert(e, proj)}.weight" for e in range(d.experts)]
                for proj in ("gate", "up", "down")}

    def layer_linears(self, d: MoEDims, layer: int) -> tuple[Linear, ...]:
        return tuple(self.linear(role) for role in self.layer_roles(d, layer))

    def layer_tensors(self, d: MoEDims, layer: int) -> dict[str, tuple[int, ...]]:
        if layer not in d.sparse_layers:
            return {}
        p = self.layer_prefix(layer)
        shapes = {f"{p}{self.experts.router}.weight": (d.experts, d.hidden)}
        for proj, names in self.expert_weights(d, layer).items():
            shape = (d.hidden, d.moe_intermediate) if proj == "down" else (d.moe_intermediate, d.hidden)
            shapes.update({name: shape for name in names})
        if d.shared_intermediate:
            shapes[f"{p}{self.shared_gate}.weight"] = (1, d.hidden)
        return shapes

    def role_of(self, weight_name: str) -> tuple[int | None, str] | None:
        found = super().role_of(weight_name)
        if found is not None:
            return found
        layer = layer_index(weight_name)
        for lin in SHARED_EXPERT:
            if layer is not None and weight_name.startswith(f"{self.layer_prefix(layer)}{lin.module}.weight"):
                return layer, lin.role
        return None

    # -- GGUF (llama.cpp stores each projection's experts stacked, `blk.<i>.ffn_<proj>_exps`
    # [E, out, in] in HF order; llmbuild.source.split serves them per expert) --------------
    @property
    def gguf_layer_names(self) -> dict[str, str]:
        t = self.experts
        return {**super().gguf_layer_names, "ffn_gate_inp": t.router, "ffn_gate_exps": t.stacked("gate"),
                "ffn_up_exps": t.stacked("up"), "ffn_down_exps": t.stacked("down"),
                "ffn_gate_shexp": SHARED_EXPERT[0].module, "ffn_up_shexp": SHARED_EXPERT[1].module,
                "ffn_down_shexp": SHARED_EXPERT[2].module, "ffn_gate_inp_shexp": self.shared_gate}

    def gguf_config(self, get, config: dict) -> dict:
        """llama.cpp's expert keys; it builds every layer sparse (no dense layers) and
        renormalises the top-k as `gguf_normalize_top_k` says for the family."""
        t = self.experts
        out = {t.experts_keys[0]: get("expert_count"), "num_experts_per_tok": get("expert_used_count"),
               t.intermediate_key: get("expert_feed_forward_length"), "decoder_sparse_step": 1,
               "mlp_only_layers": []}
        if isinstance(t.normalize, str):
            out[t.normalize] = self.gguf_normalize_top_k
        if self.shared_expert:
            out["shared_expert_intermediate_size"] = get("expert_shared_feed_forward_length") or 0
        if out[t.intermediate_key] is None:  # Mixtral-style files: the experts' width is feed_forward_length
            out[t.intermediate_key] = config.get("intermediate_size")
        return {k: v for k, v in out.items() if v is not None}

    def from_gguf(self, hf_name: str, array):
        if hf_name.endswith(f"{self.shared_gate}.weight") and array.ndim == 1:
            return array[None, :]  # llama.cpp drops the [1, H] gate's unit dimension
        return super().from_gguf(hf_name, array)

    def parameter_count(self, d: MoEDims) -> dict[str, int]:
        """Adds `experts` (every routed expert's weights) and `active` (the parameters one
        token computes with: everything but the unselected experts; the router included)."""
        counts = super().parameter_count(d)
        per_expert = 3 * d.hidden * d.moe_intermediate
        experts = per_expert * d.experts * len(d.sparse_layers)
        counts["replicated"] -= experts  # the base class counts every non-linear as replicated
        counts["experts"] = experts
        total = counts["layer_matrices"] + counts["replicated"] + experts
        counts["active"] = total - per_expert * (d.experts - d.top_k) * len(d.sparse_layers)
        return counts
