"""ONNX graph on ONNX Runtime vs HF transformers on tiny random models (fixed seeds):
logits, decode with cache vs full recompute, batched vs one-by-one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmbuild.runtime import load
from llmbuild.runtime.sampling import SamplingParams
from tests.family import decode_in_steps, prefill_all
from tests.tiny import compile_tiny, make_tiny_hf

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

VARIANTS = {
    # name: (make_tiny_hf kwargs)
    "llama-gqa-untied": dict(num_heads=4, num_kv_heads=2, tie=False),
    "llama-mha-tied": dict(num_heads=4, num_kv_heads=4, tie=True),
    "llama-mqa-llama3rope": dict(num_heads=4, num_kv_heads=1, rope_scaling=LLAMA3, seed=3),
    "llama-fp16-weights": dict(num_heads=4, num_kv_heads=2, dtype="float16", seed=4),
    "mistral-gqa": dict(arch="MistralForCausalLM", num_heads=8, num_kv_heads=2, hidden=64, seed=5),
}
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
LIMITS = {"max_batch_size": 4, "max_input_len": 64, "max_seq_len": 128}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model_dir = make_tiny_hf(root / "hf", **VARIANTS[name])
    from transformers import AutoModelForCausalLM

    # The reference computes in float32 whatever the stored dtype (fp16 weights upcast exactly).
    return name, model_dir, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logits(ref, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_logits_match_hf(variant, precision, tmp_path):
    name, model_dir, ref = variant
    art = compile_tiny(model_dir, tmp_path, precision=precision, limits=LIMITS)
    model = load(art, backend="onnxruntime", cpu_lowering=False)  # the artifact's graph as written
    rng = np.random.default_rng(7)
    for length in (1, 5, 37):
        ids = rng.integers(5, 256, length).tolist()
        ours, theirs = prefill_all(model, ids), hf_logits(ref, ids)
        assert ours.shape == theirs.shape == (length, 256)
        err = np.abs(ours - theirs).max()
        assert err < TOLERANCE[precision], f"{name} {precision} len {length}: max |Δ| {err}"
        # The tolerance must be small against the logits themselves, or it would hide a
        # wrong model (random init gives logits of a few tenths).
        assert np.abs(theirs).max() > 10 * TOLERANCE[precision]


def test_decode_with_cache_equals_recompute(variant, tmp_path):
    name, model_dir, ref = variant
    art = compile_tiny(model_dir, tmp_path, limits=LIMITS)
    model = load(art, backend="onnxruntime", cpu_lowering=False)  # the artifact's graph as written
    ids = np.random.default_rng(1).integers(5, 256, 20).tolist()
    full = prefill_all(model, ids)
    # Prefill 8 tokens, then feed the remaining 12 one at a time and in a chunk of 4.
    np.testing.assert_allclose(decode_in_steps(model.executor, ids), full[8:], atol=1e-5, rtol=0)


def test_batch_of_different_lengths_equals_one_by_one(variant, tmp_path):
    name, model_dir, ref = variant
    art = compile_tiny(model_dir, tmp_path, limits=LIMITS)
    model = load(art, backend="onnxruntime", cpu_lowering=False)  # the artifact's graph as written
    rng = np.random.default_rng(2)
    prompts = [rng.integers(5, 256, n).tolist() for n in (3, 17, 9, 1)]
    alone = [model.generate_ids([p], max_new_tokens=12)[0].token_ids for p in prompts]
    batched = [g.token_ids for g in model.generate_ids(prompts, max_new_tokens=12)]
    assert batched == alone
    assert all(len(t) > 0 for t in alone)
    # And the greedy tokens are HF's: recompute each continuation with the reference.
    for p, toks in zip(prompts, alone):
        seq = list(p)
        for t in toks:
            assert int(hf_logits(ref, seq)[-1].argmax()) == t
            seq.append(t)


def test_seeded_sampling_is_reproducible_and_seed_dependent(tmp_path):
    model_dir = make_tiny_hf(tmp_path / "hf", seed=11)
    model = load(compile_tiny(model_dir, tmp_path, limits=LIMITS), backend="onnxruntime")
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234)
    a = model.generate_ids([[5, 6, 7]], max_new_tokens=16, params=params)[0].token_ids
    b = model.generate_ids([[5, 6, 7], [9, 9]], max_new_tokens=16, params=params)[0].token_ids
    c = model.generate_ids([[5, 6, 7]], max_new_tokens=16,
                           params=SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=99))[0].token_ids
    assert a == b
    assert a != c
