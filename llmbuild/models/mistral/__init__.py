"""MistralForCausalLM without sliding-window attention: the Llama graph."""

from llmbuild.models import llama


def __getattr__(name: str):  # LlamaDims, build, expected_shapes: the Llama graph, imported on first use
    if name in ("LlamaDims", "build", "expected_shapes"):
        return getattr(llama, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
