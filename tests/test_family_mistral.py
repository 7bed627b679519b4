"""MistralForCausalLM with a sliding window (tests/tiny_configs.py: windows 8 and 5, GQA
and MQA, tied and untied, head_dim ≠ hidden/heads) against HF transformers: logits,
greedy generation past the window (prompt + 64 new tokens) for the standard graph and the
CPU-lowered one (GroupQueryAttention's local_window_size), decode = recompute, batched =
one-by-one, and the window mask in the standard graph."""

from __future__ import annotations

import onnx
import pytest

from tests import family

ARCH = "MistralForCausalLM"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return family.build_family(tmp_path_factory, ARCH)


@pytest.fixture(scope="module", params=[0, 1], ids=["gqa-untied-w8", "mqa-tied-w5"])
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


def test_the_window_cuts(tiny):
    """Without the window HF's logits beyond it differ: the tests above would see a wrong window."""
    ids = family.PROMPT * 2
    windowed = family.hf_logits(tiny.ref, ids)
    tiny.ref.config.sliding_window = None
    try:
        full = family.hf_logits(tiny.ref, ids)
    finally:
        tiny.ref.config.sliding_window = tiny.window()
    assert abs(windowed[-1] - full[-1]).max() > 1e-2
    assert abs(windowed[: tiny.window()] - full[: tiny.window()]).max() < 1e-5


@pytest.mark.parametrize("lowered", [False, True], ids=["standard", "lowered"])
def test_decode_with_cache_equals_recompute(tiny, lowered):
    family.check_decode_equals_recompute(tiny, lowered=lowered)


def test_batched_equals_one_by_one(tiny):
    family.check_batched_equals_one_by_one(tiny, lowered=True)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_every_layer_lowers_with_the_window(tiny, precision, tmp_path):
    gqa = family.lowered_attention(tiny, precision, tmp_path)
    assert len(gqa) == tiny.config["num_hidden_layers"]
    assert all(a["local_window_size"] == tiny.window() and "softcap" not in a for a in gqa)


def test_standard_graph_masks_the_window(tiny):
    """One shared causal boolean mask feeds every layer's Attention (is_causal 0: TensorRT
    takes a mask or a causal kind, not both); the annotation records the window."""
    from llmbuild.graph.annotations import ATTENTION, nodes_with

    graph = onnx.load(str(tiny.artifacts["float32"] / "model" / "model.onnx"), load_external_data=False).graph
    attns = nodes_with(graph, ATTENTION)
    assert len(attns) == tiny.config["num_hidden_layers"]
    assert {n.input[3] for n, _ in attns} == {f"window_mask.{tiny.window()}"}
    assert all(meta["window"] == tiny.window() for _, meta in attns)
    assert all(onnx.helper.get_attribute_value(a) == 0 for n, _ in attns for a in n.attribute if a.name == "is_causal")


def test_tensorrt_rtx_engine_builds(models, tmp_path):
    entry = family.check_engine_builds(models[0], tmp_path)
    assert entry["decomposed_attention"] == []  # the window mask goes into TensorRT's attention
