"""GGUF input for Gemma 2 and Gemma 3 (llama.cpp `gemma2` / `gemma3`): tiny HF models
converted by llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist on
PyPI, fetched once per session with pip; a failed fetch fails these tests), read by our
GGUF source tensor for tensor against transformers' own GGUF loading, the config read
from the metadata, and the compiled GGUF's logits against HF on the original directory.

The converter writes f32, f16, bf16 and q8_0 (and ternary tq1_0/tq2_0) but no K-quants,
so the quantized file here is q8_0 (K-quants from the compiled llama-quantize:
tests/test_family_gguf_kquant.py).
Its limits are llama.cpp's: query_pre_attn_scalar is not stored (llama.cpp scales by
1/sqrt(head_dim)), nor Gemma 3's local rope base (10000) and 5:1 pattern; the tiny
configs use those values so the files describe the same models."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import family
from tests.tiny import compile_tiny, make_tiny_from_config

BASE = dict(vocab_size=256, max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0,
            hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            query_pre_attn_scalar=16, tie_word_embeddings=True, initializer_range=0.05, sliding_window=6)
MODELS = {
    "gemma2": ("Gemma2ForCausalLM", dict(BASE, num_hidden_layers=3, attn_logit_softcapping=0.5,
                                         final_logit_softcapping=1.0)),
    "gemma3": ("Gemma3ForCausalLM", dict(BASE, num_hidden_layers=6)),  # layers 0-4 local, 5 global
}


@pytest.fixture(scope="session")
def converter(llama_cpp) -> Path:
    """convert_hf_to_gguf.py beside its gguf-py (the session's llama-cpp-python sdist, tests/llama_cpp.py)."""
    return llama_cpp / "convert_hf_to_gguf.py"


def write_sentencepiece(dst: Path) -> None:
    """A tiny SentencePiece model (the Gemma converters read tokenizer.model)."""
    import sentencepiece as spm

    text = ["the quick brown fox jumps over the lazy dog", "hello world in on an", "abcdefghijklmnopqrstuvwxyz"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 50), model_writer=model, vocab_size=64,
                                   model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    (dst / "tokenizer.model").write_bytes(model.getvalue())


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request, converter, tmp_path_factory):
    arch, config = MODELS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_from_config(root / "hf", arch, config, seed=3)
    write_sentencepiece(hf)
    files = {}
    for outtype in ("f32", "q8_0"):
        files[outtype] = root / f"tiny-{outtype}.gguf"
        result = subprocess.run([sys.executable, str(converter), str(hf), "--outfile", str(files[outtype]),
                                 "--outtype", outtype], capture_output=True, text=True,
                                env={"PYTHONPATH": str(converter.parent / "gguf-py"), "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr[-3000:]
    return request.param, arch, hf, files


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_tensors_equal_transformers_gguf_loading(converted, outtype):
    import torch
    from transformers import AutoModelForCausalLM

    from llmbuild.models import spec_for
    from llmbuild.source import open_source

    name, arch, _, files = converted
    path = files[outtype]
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    with open_source(path) as source:
        assert source.config["architectures"] == [arch]
        spec = spec_for(source.config)
        tensors = spec.tensors(spec.dims(source.config))
        assert len(tensors) == (35 if name == "gemma2" else 6 * 13 + 2)
        for tensor, shape in tensors.items():
            ours = source.load(tensor)
            assert ours.shape == shape == tuple(theirs[tensor].shape), tensor
            np.testing.assert_array_equal(ours, theirs[tensor].numpy(), err_msg=tensor)


def test_config_from_metadata_is_the_models(converted):
    import json

    from llmbuild.models import architecture_spec
    from llmbuild.source import open_source

    name, arch, hf, files = converted
    from llmbuild.source.config import normalize_config

    want = normalize_config(json.loads((hf / "config.json").read_text()))
    with open_source(files["f32"]) as source:
        got = source.config
    spec = architecture_spec(arch)
    for key in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                "head_dim", "num_key_value_heads", "tie_word_embeddings"):
        assert got.get(key) == want.get(key), key
    layers = want["num_hidden_layers"]
    assert [spec.layer_type(got, i) for i in range(layers)] == want["layer_types"]
    assert [spec.rope_config(got, i)[1]["rope_theta"] for i in range(layers)] == [
        spec.rope_config(want, i)[1]["rope_theta"] for i in range(layers)]


def test_compiled_gguf_logits_match_hf_on_the_directory(converted, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from llmbuild.runtime import load

    _, _, hf, files = converted
    art = compile_tiny(files["f32"], tmp_path, limits=family.LIMITS)
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = np.random.default_rng(4).integers(5, 256, 30).tolist()
    for lowered in (False, True):
        with load(art, backend="onnxruntime", threads=2, cpu_lowering=lowered) as model:
            np.testing.assert_allclose(family.prefill_all(model, ids), family.hf_logits(ref, ids), atol=1e-4, rtol=0)
