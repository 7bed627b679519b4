"""Architecture registry, keyed by HF `architectures[0]`; modules are imported lazily.

Each module provides `check_config(config) -> list[str]`, `expected_shapes(dims)`,
`LlamaDims`-style `*.from_config`, and `build(graph_builder, config, source, max_seq_len)`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from llmbuild.errors import UserError

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llmbuild.models.llama",
    "MistralForCausalLM": "llmbuild.models.mistral",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def architecture_of(config: dict) -> str:
    archs = config.get("architectures") or []
    if not archs:
        raise UserError("model config has no 'architectures' entry; cannot choose a graph builder")
    return archs[0]


def get_architecture(config: dict) -> ModuleType:
    arch = architecture_of(config)
    if arch not in ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    module = importlib.import_module(ARCHITECTURES[arch])
    problems = module.check_config(config)
    if problems:
        raise UserError(f"{arch}: " + "; ".join(problems))
    return module
