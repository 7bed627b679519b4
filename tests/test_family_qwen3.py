"""Qwen3ForCausalLM on tiny random models against HF transformers: the shared family checks
(tests/test_family_qwen2.py, tests/family_checks.py) on Qwen3's shapes (head_dim != hidden /
heads), plus what is new: the per-head q/k RMSNorm is in the graph the CPU lowering lowers
(GroupQueryAttention reads the normed, pre-rotary q/k), and it is not an AWQ scale group."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from llmbuild.graph.annotations import ATTENTION, NORM, SCALE_GROUP, nodes_with
from llmbuild.models import spec_for
from tests import family_checks as fc
from tests.test_family_qwen2 import (  # noqa: F401  (the shared checks, collected here for Qwen3)
    first, shape, test_batched_equals_one_by_one_and_greedy_equals_hf, test_cpu_lowering_applies_and_equals_standard_and_hf,
    test_cpp_greedy_equals_python, test_decode_with_cache_equals_recompute, test_gguf_from_llama_cpp_matches_transformers_tensor_for_tensor,
    test_logits_match_hf, test_quantized_accuracy_gate_passes, test_tensor_parallel_tp2_equals_tp1,
    test_tensorrt_rtx_fp16_engine_builds)
from tests.tiny import make_tiny_hf
from tests.tiny_configs import TINY_SHAPES

ARCH = "Qwen3ForCausalLM"


@pytest.fixture(scope="module")
def arch() -> str:
    return ARCH


def _graph(art) -> onnx.GraphProto:
    from llmbuild.artifact import read_manifest

    return onnx.load(str(art / read_manifest(art)["graph"]["file"]), load_external_data=False).graph


def test_head_norms_feed_rotary_and_are_annotated_as_attention_q_k(shape):
    cfg = json.loads((shape["dir"] / "config.json").read_text())
    spec = spec_for(cfg)
    d = spec.dims(cfg)
    assert d.head_dim == cfg["head_dim"]
    tensors = spec.tensors(d)
    for i in range(d.layers):
        assert tensors[f"model.layers.{i}.self_attn.q_norm.weight"] == (d.head_dim,)
    g = _graph(shape["fp32"])
    producers = {o: n for n in g.node for o in n.output}
    norms = {m["weight"] for _, m in nodes_with(g, NORM)}
    for node, meta in nodes_with(g, ATTENTION):
        p = f"model.layers.{meta['layer']}.self_attn."
        for x, norm in (("q", "q_norm"), ("k", "k_norm")):
            producer = producers[meta[x]]  # the annotated q/k are the normed values, before rotary
            assert producer.op_type == "RMSNormalization" and producer.input[1] == p + norm + ".weight"
            assert p + norm + ".weight" in norms
            assert {n.op_type for n in g.node if meta[x] in n.input} == {"Transpose"}  # -> RotaryEmbedding
    # the head norms head no scale group: AWQ never folds a scale into them
    groups = nodes_with(g, SCALE_GROUP)
    assert groups and not [m for _, m in groups if "q_norm" in m["source"] or "k_norm" in m["source"]]
    assert {m["name"] for _, m in groups} == {"attention_input", "mlp_input", "down_input"}
    # the norm weights are random (0.5..1.5), so a graph without them would miss HF's logits
    assert float((shape["ref"].model.layers[0].self_attn.q_norm.weight.detach() - 1).abs().max()) > 0.1


def test_awq_int4_accuracy_gate_passes(first):
    v = fc.check_quantized_gate(first["dir"], first["root"] / "awq", {"scheme": "int4", "group_size": 32,
                                                                     "algorithm": "awq"})
    assert v["top1_agreement"] > 0.5


def test_attention_bias_is_refused():
    from llmbuild.errors import UserError

    cfg = {"architectures": [ARCH], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 256,
           "attention_bias": True}
    with pytest.raises(UserError, match=r"Qwen3ForCausalLM: attention_bias=true is not supported for "
                                        r"Qwen3ForCausalLM yet"):
        spec_for(cfg)


def test_qwen3_chat_template_renders_as_hf(llama_cpp, tmp_path):
    from tests.llama_cpp import template

    model_dir = make_tiny_hf(tmp_path / "hf", ARCH, **TINY_SHAPES[ARCH][0])
    ours, hf = fc.tokenizers_with_template(model_dir, template(llama_cpp, "Qwen-Qwen3-0.6B"), tmp_path / "out")
    for messages in ([{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
                      {"role": "user", "content": "and 3+3?"}]):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert expected.endswith("<|im_start|>assistant\n")
        assert ours.apply_chat_template(messages) == expected
    # the reasoning of earlier assistant turns is dropped, as Qwen3's template does
    assert "add" not in ours.apply_chat_template(messages)
