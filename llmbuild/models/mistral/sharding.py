"""MistralForCausalLM shards exactly like the Llama graph it reuses."""

from llmbuild.models.llama.sharding import CONFIG_KEYS, WEIGHTS, sizes

__all__ = ["CONFIG_KEYS", "WEIGHTS", "sizes"]
