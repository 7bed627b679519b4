"""Gemma3ForConditionalGeneration built as its text part (llmbuild.models.gemma3.spec:
Gemma3ConditionalSpec). The conformance suite runs the whole contract on it (logits vs HF,
decode, batching, lowering, tp, int4/int8, engine, C++); these tests check what is
particular to a multimodal checkpoint: the vision tower and projector are left out, both
tensor layouts transformers uses are read, the flattened config is the text config, and
llama.cpp's GGUF of the same checkpoint (written as `gemma3`) holds the same tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conformance import TinyArchitecture

ARCH = "Gemma3ForConditionalGeneration"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinyArchitecture(ARCH, tmp_path_factory.mktemp("gemma3-conditional"))


def _text_state(tiny) -> dict[str, np.ndarray]:
    """HF's text decoder parameters under Gemma3ForCausalLM's names."""
    state = tiny.reference.state_dict()
    out = {}
    for name, value in state.items():
        for prefix in ("model.language_model.", "language_model.model."):
            if name.startswith(prefix):
                out["model." + name[len(prefix):]] = value.numpy()
    return out


def test_source_reads_the_text_decoder_and_leaves_out_the_vision_tower(tiny):
    from safetensors import safe_open

    from llmbuild.models import spec_for
    from llmbuild.source import open_source

    with safe_open(tiny.hf_dir / "model.safetensors", "np") as f:
        saved = list(f.keys())
    vision = [n for n in saved if n.startswith(("vision_tower.", "multi_modal_projector."))]
    assert vision, "the tiny checkpoint has no vision tower: the test would prove nothing"
    want = _text_state(tiny)
    with open_source(tiny.hf_dir) as source:
        names = set(source.names())
        assert not any("vision" in n or "multi_modal" in n for n in names)
        spec = spec_for(source.config)
        tensors = spec.tensors(spec.dims(source.config))
        assert set(tensors) <= names
        for name in tensors:
            np.testing.assert_array_equal(source.load(name), want[name], err_msg=name)


def test_config_is_the_text_config(tiny):
    raw = json.loads((tiny.hf_dir / "config.json").read_text())
    assert "hidden_size" not in raw  # nested: the flattening is what makes it buildable
    cfg = tiny.config
    assert cfg["architectures"] == [ARCH]
    for key in ("hidden_size", "num_hidden_layers", "sliding_window", "layer_types", "vocab_size"):
        assert cfg[key] == raw["text_config"][key], key
    assert cfg["tie_word_embeddings"] is True


def test_in_memory_layout_reads_the_same_tensors(tiny, tmp_path):
    """Checkpoints saved with transformers' in-memory names (`model.language_model.…`,
    `model.vision_tower.…`) read as the saved layout does."""
    from safetensors.numpy import load_file, save_file

    from llmbuild.source import open_source

    tensors = load_file(tiny.hf_dir / "model.safetensors")
    renamed = {}
    for name, value in tensors.items():
        if name.startswith("language_model.model."):
            name = "model.language_model." + name[len("language_model.model."):]
        elif name.startswith(("vision_tower.", "multi_modal_projector.")):
            name = "model." + name
        renamed[name] = value
    for f in tiny.hf_dir.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(renamed, tmp_path / "model.safetensors")
    with open_source(tiny.hf_dir) as saved, open_source(tmp_path) as in_memory:
        assert sorted(saved.names()) == sorted(in_memory.names())
        for name in saved.names():
            np.testing.assert_array_equal(saved.load(name), in_memory.load(name), err_msg=name)


def test_llama_cpp_gguf_of_the_checkpoint_holds_the_same_text_tensors(llama_cpp, tmp_path_factory):
    """llama.cpp's converter writes the text part as `gemma3` (its fixed values: five local
    layers per global one, local rope base 10000, query scale 1/sqrt(head_dim)); our GGUF
    source reads it as Gemma3ForCausalLM with the checkpoint's text tensors."""
    import torch
    import transformers

    from llmbuild.source import open_source
    from tests.llama_cpp import convert
    from tests.test_family_gguf import write_sentencepiece

    root = tmp_path_factory.mktemp("gemma3-conditional-gguf")
    text = dict(vocab_size=256, max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=6)
    config = transformers.Gemma3Config(text_config=text, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14), mm_tokens_per_image=4, boi_token_index=250, eoi_token_index=251, image_token_index=252)
    torch.manual_seed(5)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    hf = root / "hf"
    model.save_pretrained(hf)
    write_sentencepiece(hf)
    gguf = convert(llama_cpp, hf, root / "tiny-f32.gguf", "f32")
    with open_source(hf) as want, open_source(gguf) as got:
        assert got.config["architectures"] == ["Gemma3ForCausalLM"]
        assert sorted(got.names()) == sorted(want.names())
        for name in want.names():
            np.testing.assert_allclose(got.load(name), want.load(name), rtol=0, atol=1e-6, err_msg=name)  # norms: (1 + w) - 1
