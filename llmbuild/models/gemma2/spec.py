"""Gemma2ForCausalLM: Llama's linears with Gemma's layer around them.

What differs from Llama (HF `modeling_gemma2.py`):
- RMSNorm scales by (1 + w) (HF stores w), statistics in float32;
- embeddings × √hidden (in the graph's dtype, as HF casts the normalizer);
- four norms per layer ("sandwich"): input_layernorm → attention → post_attention_layernorm
  (+ residual), pre_feedforward_layernorm → MLP → post_feedforward_layernorm (+ residual);
- GELU-tanh gated MLP (`hidden_activation: gelu_pytorch_tanh`);
- attention scale query_pre_attn_scalar^-1/2, logits soft-capped (attn_logit_softcapping),
  final logits soft-capped (final_logit_softcapping);
- `layer_types` alternates sliding-window ("sliding_attention", window `sliding_window`)
  and global ("full_attention") layers; older configs without it: even layers slide.
GGUF (llama.cpp `gemma2`): norms are stored as 1 + w (the converter adds 1), q/k rows
are not permuted; the window, soft-caps and scale are metadata keys.
"""

from __future__ import annotations

from llmbuild.models.llama.spec import LlamaSpec
from llmbuild.models.spec import ScaleGroup, _positive_int

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


class Gemma2Spec(LlamaSpec):
    hf_class = "Gemma2ForCausalLM"
    graph_module = "llmbuild.models.gemma2.model"
    gguf_architectures = ("gemma2",)

    norm_offset = 1  # RMSNorm scale = 1 + w
    layer_norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")
    # The MLP's input is pre_feedforward_layernorm's output (post_attention_layernorm
    # normalizes the attention output before the residual: nothing reads it but the Add).
    scale_groups = (
        ScaleGroup("attention_input", "norm", "input_layernorm", ("q", "k", "v")),
        ScaleGroup("mlp_input", "norm", "pre_feedforward_layernorm", ("gate", "up")),
        ScaleGroup("down_input", "linear", "up", ("down",)),
    )
    gguf_layer_names = {
        **LlamaSpec.gguf_layer_names,
        "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    }
    gguf_permuted_roles: dict = {}

    # -- config ----------------------------------------------------------------------------
    def check_config(self, config: dict) -> list[str]:
        problems = super(LlamaSpec, self).check_config(config)
        if config.get("attention_bias"):
            problems.append(f"attention_bias=true is not supported for {self.hf_class}")
        act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in GELU_TANH:
            problems.append(f"hidden_activation={act!r} is not supported (expected 'gelu_pytorch_tanh')")
        if any(self.attention_window(config, i) is not None for i in range(int(config.get("num_hidden_layers") or 0))):
            _positive_int(config, "sliding_window", problems)
        types = config.get("layer_types")
        if types is not None:
            bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
            if bad or len(types) != config.get("num_hidden_layers"):
                problems.append(f"layer_types must list 'sliding_attention' or 'full_attention' for each of the "
                                f"{config.get('num_hidden_layers')} layers, found {types!r:.200}")
        if config.get("use_bidirectional_attention"):
            problems.append("use_bidirectional_attention=true (an encoder, e.g. EmbeddingGemma) is not supported; "
                            "only causal decoders can be built")
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            value = config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                problems.append(f"{key}={value!r} must be a positive number or null")
        return problems

    def layer_type(self, config: dict, layer: int) -> str:
        types = config.get("layer_types")
        if types:
            return types[layer]
        return "sliding_attention" if layer % 2 == 0 else "full_attention"

    def attention_window(self, config: dict, layer: int) -> int | None:
        if config.get("sliding_window") is None or self.layer_type(config, layer) != "sliding_attention":
            return None
        return config["sliding_window"]

    def rope_config(self, config: dict, layer: int) -> tuple[str, dict]:
        """(key, config) of layer `layer`'s rotary table: layers with one key share one table."""
        return "global", config

    def attention_scale(self, config: dict) -> float:
        scalar = config.get("query_pre_attn_scalar") or self.dims(config).head_dim
        return float(scalar) ** -0.5

    def attention_softcap(self, config: dict) -> float:
        return float(config.get("attn_logit_softcapping") or 0.0)

    def final_softcap(self, config: dict) -> float:
        return float(config.get("final_logit_softcapping") or 0.0)

    # -- GGUF ------------------------------------------------------------------------------
    def from_gguf(self, hf_name: str, array):
        if hf_name.endswith("norm.weight"):  # llama.cpp's converter stores 1 + w (ggml multiplies by it)
            return array - 1.0
        return array

    def gguf_config(self, get, config: dict) -> dict:
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model (46
        # layers): 1/sqrt(hidden/heads), HF's query_pre_attn_scalar of that checkpoint.
        scalar = config["head_dim"]
        if config["num_hidden_layers"] == 46:
            scalar = config["hidden_size"] // config["num_attention_heads"]
        return {"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
                "sliding_window": get("attention.sliding_window"),
                "attn_logit_softcapping": get("attn_logit_softcapping"),
                "final_logit_softcapping": get("final_logit_softcapping"),
                "query_pre_attn_scalar": scalar}

    def manifest_dims(self, config: dict, precision: str) -> dict:
        out = super().manifest_dims(config, precision)
        d = self.dims(config)
        out.update(sliding_window=config.get("sliding_window"),
                   layer_types=[self.layer_type(config, i) for i in range(d.layers)],
                   attn_logit_softcapping=config.get("attn_logit_softcapping"),
                   final_logit_softcapping=config.get("final_logit_softcapping"),
                   query_pre_attn_scalar=config.get("query_pre_attn_scalar"))
        return out
