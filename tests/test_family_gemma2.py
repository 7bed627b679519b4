"""Gemma2ForCausalLM (tests/tiny_configs.py: GQA tied and MQA untied with head_dim ≠
hidden/heads; alternating sliding/global layers with windows 6 and 4 shorter than the
prompts; attention and final-logit soft-caps that change the logits; (1 + w) norms with
random w) against HF transformers: logits (fp32, fp16), greedy past the window for the
standard and the CPU-lowered graph, decode = recompute, batched = one-by-one, what the
lowering emits, the TensorRT-RTX engine and the decomposed graph TensorRT parses."""

from __future__ import annotations

import numpy as np
import pytest

from tests import family

ARCH = "Gemma2ForCausalLM"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return family.build_family(tmp_path_factory, ARCH)


@pytest.fixture(scope="module", params=[0, 1], ids=["gqa-tied", "mqa-untied-d32"])
def tiny(request, models):
    return models[request.param]


@pytest.mark.parametrize("lowered", [False, True], ids=["standard", "lowered"])
def test_logits_match_hf(tiny, lowered, caplog):
    family.check_logits(tiny, "float32", lowered=lowered, atol=1e-4, caplog=caplog if lowered else None)


@pytest.mark.parametrize("lowered", [False, True], ids=["standard", "lowered"])
def test_fp16_logits_match_hf(tiny, lowered):
    family.check_logits(tiny, "float16", lowered=lowered, atol=3e-2)  # fp16 weights: measured max 0.024


@pytest.mark.parametrize("lowered", [False, True], ids=["standard", "lowered"])
def test_greedy_past_the_window_equals_hf(tiny, lowered):
    family.check_greedy_past_window(tiny, lowered=lowered)


@pytest.mark.parametrize("key", ["attn_logit_softcapping", "final_logit_softcapping", "sliding_window"])
def test_each_variation_changes_the_logits(tiny, key):
    """Without the soft-cap (or the window) HF's logits differ by far more than the tolerance."""
    ids = family.PROMPT * 2
    want = family.hf_logits(tiny.ref, ids)
    holders = [tiny.ref.config] + [m for m in tiny.ref.modules() if hasattr(m, key)]  # HF copies it at init
    saved = [getattr(h, key) for h in holders]
    for h in holders:  # a window longer than the prompt = no window
        setattr(h, key, 10_000 if key == "sliding_window" else None)
    try:
        changed = family.hf_logits(tiny.ref, ids)
    finally:
        for h, value in zip(holders, saved):
            setattr(h, key, value)
    assert np.abs(want - changed).max() > 1e-2


@pytest.mark.parametrize("lowered", [False, True], ids=["standard", "lowered"])
def test_decode_with_cache_equals_recompute(tiny, lowered):
    family.check_decode_equals_recompute(tiny, lowered=lowered)


def test_batched_equals_one_by_one(tiny):
    family.check_batched_equals_one_by_one(tiny, lowered=True)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_every_layer_lowers_with_window_and_softcap(tiny, precision, tmp_path):
    gqa = family.lowered_attention(tiny, precision, tmp_path)
    types = tiny.config["layer_types"]
    assert len(gqa) == len(types)
    for attrs, kind in zip(gqa, types):
        want = tiny.window() if kind == "sliding_attention" else None
        assert attrs.get("local_window_size") == want
        assert attrs["softcap"] == pytest.approx(tiny.config["attn_logit_softcapping"])
        assert attrs["scale"] == pytest.approx(tiny.config["query_pre_attn_scalar"] ** -0.5)


def test_tensorrt_graph_decomposes_softcapped_attention_and_equals_hf(tiny, tmp_path):
    records = family.check_tensorrt_graph_logits(tiny, tmp_path)
    assert [r["layer"] for r in records] == list(range(tiny.config["num_hidden_layers"]))
    assert all("softcap" in r["reason"] for r in records)


def test_tensorrt_rtx_engine_builds(models, tmp_path):
    entry = family.check_engine_builds(models[0], tmp_path)
    assert [r["layer"] for r in entry["decomposed_attention"]] == [0, 1, 2]


@pytest.mark.parametrize("change, message", [
    ({"hidden_activation": "relu"}, "hidden_activation='relu' is not supported (expected 'gelu_pytorch_tanh')"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true (an encoder, e.g. EmbeddingGemma) is "
                                            "not supported; only causal decoders can be built"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     "layer_types must list 'sliding_attention' or 'full_attention' for each of the 3 layers"),
    ({"attn_logit_softcapping": -1.0}, "attn_logit_softcapping=-1.0 must be a positive number or null"),
    ({"sliding_window": 0}, "sliding_window=0 must be a positive integer"),
    ({"attention_bias": True}, "attention_bias=true is not supported for Gemma2ForCausalLM"),
])
def test_refusals_name_the_problem(models, change, message):
    from llmbuild.errors import UserError
    from llmbuild.models import spec_for

    config = {**models[0].config, **change}
    with pytest.raises(UserError, match="^Gemma2ForCausalLM: .*" + __import__("re").escape(message)):
        spec_for(config)
