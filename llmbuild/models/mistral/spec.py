"""MistralForCausalLM: the Llama decoder, with sliding-window attention when the config
sets `sliding_window` (every layer attends to itself and the window - 1 tokens before it;
the KV cache stays full-length)."""

from __future__ import annotations

from llmbuild.models.llama.spec import LlamaSpec
from llmbuild.models.spec import _positive_int


class MistralSpec(LlamaSpec):
    hf_class = "MistralForCausalLM"
    gguf_architectures = ("mistral",)  # most llama.cpp Mistral files say `llama` (they load as Llama)

    def check_config(self, config: dict) -> list[str]:
        problems = super().check_config(config)
        if config.get("sliding_window") is not None:
            _positive_int(config, "sliding_window", problems)
        return problems

    def attention_window(self, config: dict, layer: int) -> int | None:
        return config.get("sliding_window")
