"""MistralForCausalLM without sliding-window attention: the Llama graph."""

from llmbuild.models import llama
from llmbuild.models.llama import LlamaDims, build, expected_shapes


def check_config(config: dict) -> list[str]:
    problems = llama.check_config(config)
    window = config.get("sliding_window")
    if window is not None:
        problems.append(
            f"sliding_window={window} is not supported; only Mistral models without a sliding window"
            " (sliding_window: null) can be built"
        )
    return problems


__all__ = ["LlamaDims", "build", "check_config", "expected_shapes"]
