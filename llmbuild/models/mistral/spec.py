"""MistralForCausalLM without sliding-window attention: the Llama decoder."""

from __future__ import annotations

from llmbuild.models.llama.spec import LlamaSpec


class MistralSpec(LlamaSpec):
    hf_class = "MistralForCausalLM"
    gguf_architectures = ("mistral",)  # most llama.cpp Mistral files say `llama` (they load as Llama)

    def check_config(self, config: dict) -> list[str]:
        problems = super().check_config(config)
        window = config.get("sliding_window")
        if window is not None:
            problems.append(
                f"sliding_window={window} is not supported; only Mistral models without a sliding window"
                " (sliding_window: null) can be built"
            )
        return problems
