"""Qwen2ForCausalLM (Qwen2, Qwen2.5): the Llama decoder with biases on q/k/v (not on o_proj).

Tied (0.5B–3B) or untied embeddings, GQA. llama.cpp (`qwen2`) writes q/k rows unpermuted
(its `Qwen2Model` is not a `LlamaModel`), biases as `blk.<i>.attn_{q,k,v}.bias`.

`use_sliding_window: true` (HF: layers i >= `max_window_layers` attend within
`sliding_window`) is refused: the window is not built into this graph. Published Qwen2.5
checkpoints set it false (their `sliding_window` value is then unused).
"""

from __future__ import annotations

from llmbuild.models.llama.spec import LlamaSpec
from llmbuild.models.spec import COLUMN_HEADS, COLUMN_KV_HEADS, Linear


class Qwen2Spec(LlamaSpec):
    hf_class = "Qwen2ForCausalLM"
    gguf_architectures = ("qwen2",)

    linears = (
        Linear("q", "self_attn.q_proj", "hidden", "q_width", COLUMN_HEADS, bias=True),
        Linear("k", "self_attn.k_proj", "hidden", "kv_width", COLUMN_KV_HEADS, bias=True),
        Linear("v", "self_attn.v_proj", "hidden", "kv_width", COLUMN_KV_HEADS, bias=True),
        *LlamaSpec.linears[3:],
    )
    gguf_permuted_roles = {}

    def check_config(self, config: dict) -> list[str]:
        problems = super().check_config(config)
        sliding = sliding_layers(config)
        if sliding:
            problems.append(
                f"use_sliding_window=true is not supported (layers {sliding[0]}..{sliding[-1]} would attend within "
                f"sliding_window={config.get('sliding_window')}); only checkpoints with use_sliding_window: false "
                "can be built")
        return problems


def sliding_layers(config: dict) -> list[int]:
    """Layers HF runs with sliding-window attention: `layer_types` if the config has it
    (transformers 5), else layers >= max_window_layers when use_sliding_window is set."""
    layers = int(config.get("num_hidden_layers") or 0)
    types = config.get("layer_types")
    if isinstance(types, list) and types:
        return [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not config.get("use_sliding_window") or config.get("sliding_window") is None:
        return []
    first = int(config.get("max_window_layers") or 0)
    return list(range(first, layers))
