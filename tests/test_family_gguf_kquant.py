"""K-quant GGUF input (issue #12): a tiny Qwen2 model converted by llama.cpp's converter to
F16, then quantized by llama.cpp's own `llama-quantize` (built once per session from the
llama-cpp-python sdist, tests/llama_cpp.py) to Q4_K_M and Q6_K. K-quants work on rows of
256 values, so the tiny model is 256 wide (intermediate 512, vocab 256): every matrix can
take the K-quant and none falls back. Our GGUF source gives back every tensor exactly as
transformers' GGUF loading does (both dequantize with gguf-py), and the compiled graph's
logits, standard and CPU-lowered, are transformers' on the same file."""

from __future__ import annotations

import numpy as np
import pytest

from llmbuild.models import spec_for
from tests import family_checks as fc
from tests.tiny import compile_tiny, make_tiny_hf

ARCH = "Qwen2ForCausalLM"
SHAPE = dict(hidden=256, intermediate=512, num_heads=4, num_kv_heads=2, vocab=256, layers=2, tie=False)
# llama-quantize's type -> the ggml types its matrices must hold (Q4_K_M keeps some in Q6_K)
QTYPES = {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q6_K": {"Q6_K"}}


@pytest.fixture(scope="module")
def kquant(llama_cpp, llama_quantize, tmp_path_factory):
    from tests.llama_cpp import convert, quantize

    root = tmp_path_factory.mktemp("kquant")
    model_dir = make_tiny_hf(root / "hf", ARCH, **SHAPE)
    f16 = convert(llama_cpp, model_dir, root / "gguf" / "tiny-f16.gguf", "f16")
    files = {q: quantize(llama_quantize, f16, root / "gguf" / f"tiny-{q}.gguf", q) for q in QTYPES}
    return model_dir, files


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_llama_quantize_wrote_k_quant_matrices(kquant, qtype):
    from gguf import GGUFReader

    _, files = kquant
    matrices = {t.name: t.tensor_type.name for t in GGUFReader(files[qtype]).tensors if len(t.shape) == 2}
    assert len(matrices) == 2 * 7 + 2  # q k v o gate up down per layer, the embedding, the untied output
    assert set(matrices.values()) == QTYPES[qtype], matrices


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_k_quant_tensors_equal_transformers_gguf_loading(kquant, qtype):
    import torch
    from transformers import AutoModelForCausalLM

    from llmbuild.source import open_source

    model_dir, files = kquant
    path = files[qtype]
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    state = {k: v.float().numpy() for k, v in theirs.state_dict().items()}
    checkpoint = {k: v.float().numpy() for k, v in fc.hf_reference(model_dir).state_dict().items()}
    with open_source(path) as src:
        assert src.config["architectures"] == [ARCH]
        spec = spec_for(src.config)
        names = spec.tensors(spec.dims(src.config))
        assert set(names) == fc.safetensors_names(model_dir)
        worst = 0.0
        for name in names:
            ours = src.load(name).astype(np.float32)
            np.testing.assert_array_equal(ours, state[name], err_msg=name)
            if ours.ndim == 2:
                worst = max(worst, float(np.abs(ours - checkpoint[name]).max() / np.abs(checkpoint[name]).max()))
    # a real 4/6-bit file: the matrices differ from the checkpoint by its rounding, no more
    assert 1e-3 < worst < (0.15 if qtype == "Q4_K_M" else 0.04), worst


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_compiled_k_quant_gguf_logits_match_transformers_on_it(kquant, qtype, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    _, files = kquant
    path = files[qtype]
    art = compile_tiny(path, tmp_path, limits=fc.LIMITS)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for lowered in (False, True):
        fc.check_logits_match_hf(art, theirs, "float32", lowered=lowered, lengths=(7, 30))
