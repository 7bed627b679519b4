"""Architecture registry, keyed by HF `architectures[0]`; spec modules are imported lazily.

    spec = spec_for(config)        # the ArchitectureSpec (llmbuild.models.spec), config checked
    spec.build(gb, config, source, max_seq_len)   # the graph (imports models/<arch>/model.py)

Registering an architecture is one line here plus `models/<arch>/spec.py` (what differs
from its parent spec) and, if its decoder differs, `models/<arch>/model.py`. The
conformance suite (tests/test_conformance.py) enrolls every entry automatically.
"""

from __future__ import annotations

import importlib

from llmbuild.errors import UserError

# HF class -> "module:SpecClass"
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llmbuild.models.llama.spec:LlamaSpec",
    "MistralForCausalLM": "llmbuild.models.mistral.spec:MistralSpec",
    "Qwen2ForCausalLM": "llmbuild.models.qwen2.spec:Qwen2Spec",
    "Qwen3ForCausalLM": "llmbuild.models.qwen3.spec:Qwen3Spec",
    "Phi3ForCausalLM": "llmbuild.models.phi3.spec:Phi3Spec",
    "Gemma2ForCausalLM": "llmbuild.models.gemma2.spec:Gemma2Spec",
    "Gemma3ForCausalLM": "llmbuild.models.gemma3.spec:Gemma3Spec",
    "Gemma3ForConditionalGeneration": "llmbuild.models.gemma3.spec:Gemma3ConditionalSpec",  # text part
    "MixtralForCausalLM": "llmbuild.models.mixtral.spec:MixtralSpec",
    "Qwen2MoeForCausalLM": "llmbuild.models.qwen2_moe.spec:Qwen2MoeSpec",
    "Qwen3MoeForCausalLM": "llmbuild.models.qwen3_moe.spec:Qwen3MoeSpec",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
# Architectures users ask for that are refused on purpose: HF class -> why (the error says it).
REFUSED_ARCHITECTURES: dict[str, str] = {
    "GptOssForCausalLM": (
        "gpt-oss is not supported: its attention adds learned per-head sink logits to the softmax "
        "(opset-24 Attention and TensorRT-RTX's fused attention have no sink input), its router takes a "
        "bias and applies softmax after top-k, and its experts use biases and a clamped SwiGLU "
        "(alpha 1.702, limit 7) over MXFP4 weights; none of these is built by llmbuild's graph yet"),
    "DeepseekV3ForCausalLM": (
        "DeepSeek-V3 is not supported: multi-head latent attention (compressed KV) and its grouped "
        "sigmoid router with a score-correction bias are not built by llmbuild's graph"),
}
_SPECS: dict = {}


def architecture_of(config: dict) -> str:
    archs = config.get("architectures") or []
    if not archs:
        raise UserError("model config has no 'architectures' entry; cannot choose a graph builder")
    return archs[0]


def architecture_spec(arch: str):
    """The registered spec of HF class `arch` (a UserError naming the supported ones if none)."""
    if arch in REFUSED_ARCHITECTURES:
        raise UserError(f"{REFUSED_ARCHITECTURES[arch]}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch not in ARCHITECTURES:
        raise UserError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch not in _SPECS:
        module, _, cls = ARCHITECTURES[arch].partition(":")
        _SPECS[arch] = getattr(importlib.import_module(module), cls)()
    return _SPECS[arch]


def spec_for(config: dict, *, check: bool = True):
    """The spec of the config's architecture; with `check`, a UserError listing every
    problem that makes the config unbuildable."""
    arch = architecture_of(config)
    spec = architecture_spec(arch)
    if check:
        problems = spec.check_config(config)
        if problems:
            raise UserError(f"{arch}: " + "; ".join(problems))
    return spec


def text_part_of(config: dict):
    """The `TextPart` of a registered multimodal class named by `config`, or None."""
    archs = config.get("architectures") or []
    if not archs or archs[0] not in ARCHITECTURES:
        return None
    return architecture_spec(archs[0]).text_part


def gguf_architectures() -> dict[str, str]:
    """llama.cpp `general.architecture` -> HF class, over the registered specs."""
    return {g: arch for arch in ARCHITECTURES for g in architecture_spec(arch).gguf_architectures}
