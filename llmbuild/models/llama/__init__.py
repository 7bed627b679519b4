"""LlamaForCausalLM: GQA or MHA, tied or untied embeddings, default/linear/llama3 rope."""

# The graph code (numpy, onnx_ir) is imported on first use, so that recipe validation
# and `llmbuild plan` can read check_config and the sharding hints cheaply.
_MODEL_NAMES = ("LlamaDims", "build", "expected_shapes")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        from llmbuild.models.llama import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_config(config: dict) -> list[str]:
    """Problems that make this config unbuildable by this architecture's graph."""
    problems = []
    if config.get("attention_bias"):
        problems.append("attention_bias=true is not supported for LlamaForCausalLM yet")
    if config.get("mlp_bias"):
        problems.append("mlp_bias=true is not supported for LlamaForCausalLM yet")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r} is not supported (expected 'silu')")
    return problems


__all__ = ["LlamaDims", "build", "check_config", "expected_shapes"]
