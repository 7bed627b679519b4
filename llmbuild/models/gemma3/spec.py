"""Gemma3ForCausalLM (text): Gemma 2's layer plus what HF `modeling_gemma3.py` changes:
- per-head q/k RMSNorm (scale 1 + w, over head_dim) before rotary;
- local/global pattern: `layer_types`, or in older configs `sliding_window_pattern`
  (layer i is global when (i + 1) % pattern == 0; 6 = five local layers per global one);
- local layers use their own rope base: transformers 5's `rope_parameters` keyed by layer
  type, or older configs' `rope_local_base_freq` (default rope) beside the global
  `rope_theta` / `rope_scaling`;
- no attention or final-logit soft-capping (HF's config keeps the keys, set to null).
GGUF (llama.cpp `gemma3`): as Gemma 2, plus attn_q_norm / attn_k_norm (also stored 1 + w).
"""

from __future__ import annotations

from llmbuild.models.gemma2.spec import Gemma2Spec
from llmbuild.models.rope import SUPPORTED_ROPE_TYPES
from llmbuild.models.spec import Dims, TextPart

LAYER_TYPES = ("sliding_attention", "full_attention")


class Gemma3Spec(Gemma2Spec):
    hf_class = "Gemma3ForCausalLM"
    gguf_architectures = ("gemma3",)
    head_norms = ("self_attn.q_norm", "self_attn.k_norm")  # in the tensor table via ArchitectureSpec.tensors

    def layer_type(self, config: dict, layer: int) -> str:
        types = config.get("layer_types")
        if types:
            return types[layer]
        pattern = int(config.get("sliding_window_pattern") or 6)
        return "full_attention" if (layer + 1) % pattern == 0 else "sliding_attention"

    def rope_config(self, config: dict, layer: int) -> tuple[str, dict]:
        kind = self.layer_type(config, layer)
        params = config.get("rope_parameters")
        if isinstance(params, dict) and isinstance(params.get(kind), dict):  # transformers 5
            rope = dict(params[kind])
            theta = rope.pop("rope_theta", 10000.0)
            rope.pop("type", None)
            scaling = None if rope.get("rope_type", "default") == "default" else rope
        elif kind == "sliding_attention":
            theta, scaling = config.get("rope_local_base_freq", 10000.0), None
        else:
            theta, scaling = config.get("rope_theta", 1_000_000.0), config.get("rope_scaling")
        return kind, {"rope_theta": float(theta), "rope_scaling": scaling}

    def check_config(self, config: dict) -> list[str]:
        problems = super().check_config(config)
        layers = config.get("num_hidden_layers")
        if isinstance(layers, int) and layers > 0 and not problems:
            for kind, rope in dict(self.rope_config(config, i) for i in range(layers)).items():
                scaling = rope["rope_scaling"] or {}
                rope_type = scaling.get("rope_type", scaling.get("type", "default"))
                if rope_type not in SUPPORTED_ROPE_TYPES:
                    problems.append(f"{kind} layers: rope_type {rope_type!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        return problems

    def gguf_config(self, get, config: dict) -> dict:
        # llama.cpp's gemma3: no soft-caps, 5 local layers per global one, local rope base
        # 10000 (neither is written to the file); the file's rope base and scaling are the
        # global layers'; query scale 1/sqrt(head_dim) except the 27B model (62 layers).
        out = super().gguf_config(get, config)
        scalar = config["head_dim"]
        if config["num_hidden_layers"] == 62:
            scalar = config["hidden_size"] // config["num_attention_heads"]
        out.update(attn_logit_softcapping=None, final_logit_softcapping=None, query_pre_attn_scalar=scalar,
                   sliding_window_pattern=6, rope_local_base_freq=10000.0)
        return out

    def manifest_dims(self, config: dict, precision: str) -> dict:
        out = super().manifest_dims(config, precision)
        d = self.dims(config)
        out["rope"] = {kind: cfg for kind, cfg in (self.rope_config(config, i) for i in range(d.layers))}
        return out


class Gemma3ConditionalSpec(Gemma3Spec):
    """The text part of Gemma3ForConditionalGeneration (Gemma 3 4B and larger ship only as
    this class): its `text_config` is a Gemma3ForCausalLM config, its decoder tensors sit under
    `language_model.model.` (as transformers saves them) or `model.language_model.` (its
    in-memory layout), the SigLIP vision tower and the projector are not built. Text-only
    prompts give HF's logits; image inputs are not supported. GGUF: llama.cpp's converter
    writes the text part of this class as `gemma3` (read as Gemma3ForCausalLM)."""

    hf_class = "Gemma3ForConditionalGeneration"
    gguf_architectures = ()
    text_part = TextPart(
        config_key="text_config",
        prefixes=(("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")),
        ignored=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
    )
