"""Gemma3ForCausalLM (text; tests/tiny_configs.py: 3 local + 1 global layer with a linear-
scaled global rope, and global-then-local MQA untied with head_dim ≠ hidden/heads; local
layers on their own rope base; per-head q/k (1 + w) norms) against HF transformers:
logits (fp32, fp16), greedy past the window for the standard and CPU-lowered graph,
decode = recompute, batched = one-by-one, what the lowering emits, the TensorRT-RTX engine."""

from __future__ import annotations

import numpy as np
import pytest

from tests import family

ARCH = "Gemma3ForCausalLM"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return family.build_family(tmp_path_factory, ARCH)


@pytest.fixture(scope="module", params=[0, 1], ids=["gqa-tied-3local1global", "mqa-untied-d32"])
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


def test_local_rope_base_and_qk_norms_change_the_logits(tiny):
    import torch

    ids = family.PROMPT * 2
    want = family.hf_logits(tiny.ref, ids)
    layer = tiny.ref.model.layers[0].self_attn
    saved = layer.q_norm.weight.detach().clone()
    with torch.no_grad():
        layer.q_norm.weight.zero_()
    try:
        assert np.abs(family.hf_logits(tiny.ref, ids) - want).max() > 1e-2
    finally:
        with torch.no_grad():
            layer.q_norm.weight.copy_(saved)
    ropes = tiny.config["rope_parameters"]
    assert ropes["sliding_attention"]["rope_theta"] != ropes["full_attention"]["rope_theta"]


@pytest.mark.parametrize("lowered", [False, True], ids=["standard", "lowered"])
def test_decode_with_cache_equals_recompute(tiny, lowered):
    family.check_decode_equals_recompute(tiny, lowered=lowered)


def test_batched_equals_one_by_one(tiny):
    family.check_batched_equals_one_by_one(tiny, lowered=True)


def test_every_layer_lowers_with_its_window_and_rope_table(tiny, tmp_path):
    import onnx

    from llmbuild.lowering.cpu import save_lowered_graph

    gqa = family.lowered_attention(tiny, "float32", tmp_path)
    types = tiny.config["layer_types"]
    assert [a.get("local_window_size") for a in gqa] == [tiny.window() if t == "sliding_attention" else None
                                                         for t in types]
    assert all("softcap" not in a for a in gqa)
    graph = onnx.load(str(save_lowered_graph(tiny.artifacts["float32"], tmp_path / "again")),
                      load_external_data=False).graph
    tables = [n.input[7] for n in graph.node if n.op_type == "GroupQueryAttention"]  # cos_cache
    assert len({t for t, k in zip(tables, types) if k == "sliding_attention"}) == 1
    assert set(tables[i] for i, k in enumerate(types) if k == "full_attention").isdisjoint(
        tables[i] for i, k in enumerate(types) if k == "sliding_attention")


def test_tensorrt_rtx_engine_builds(models, tmp_path):
    entry = family.check_engine_builds(models[0], tmp_path)
    assert entry["decomposed_attention"] == []  # no soft-cap: every layer is one Attention


def test_gemma_chat_template_renders_as_hf(models, tmp_path):
    """Gemma 3's real chat template (tests/data/chat_templates/gemma3.jinja: the system
    prompt folded into the first user turn, assistant → model) in the tiny tokenizer:
    the artifact's tokenizer renders and encodes it as HF's, and refuses what HF refuses."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from llmbuild.errors import UserError
    from llmbuild.runtime import load
    from tests.conftest import ROOT
    from tests.tiny import compile_tiny

    hf = tmp_path / "hf"
    shutil.copytree(models[0].hf_dir, hf)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config["chat_template"] = (ROOT / "tests/data/chat_templates/gemma3.jinja").read_text()
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    art = compile_tiny(hf, tmp_path / "out", limits=family.LIMITS)
    theirs = AutoTokenizer.from_pretrained(hf)
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "x "}]}],
    ]
    with load(art, backend="onnxruntime", threads=1) as model:
        tok = model.tokenizer
        for messages in conversations:
            text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert tok.apply_chat_template(messages) == text
            assert tok.encode_chat(messages) == theirs(text, add_special_tokens=False)["input_ids"]
        assert tok.apply_chat_template(conversations[0]).startswith("<s><start_of_turn>user\nBe brief.\n\nHi there")
        bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        with pytest.raises(Exception, match="must alternate"):
            theirs.apply_chat_template(bad, tokenize=False)
        with pytest.raises(UserError, match="must alternate"):
            tok.apply_chat_template(bad)


def test_unsupported_rope_is_refused_per_layer_type(models):
    from llmbuild.errors import UserError
    from llmbuild.models import spec_for

    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}
    with pytest.raises(UserError, match=r"^Gemma3ForCausalLM: full_attention layers: rope_type 'yarn' is not "
                                        r"supported; supported: default, linear, llama3"):
        spec_for({**models[0].config, "rope_parameters": rope})
