"""Phi3ForCausalLM (Phi-3/3.5-mini, Phi-4-mini) on tiny random models against HF
transformers: the shared family checks (tests/test_family_qwen2.py, tests/family_checks.py)
on Phi-3's shapes, plus what is new: fused qkv_proj / gate_up_proj read as row blocks,
LongRoPE past original_max_position_embeddings (greedy = HF's cached generation), partial
rotary lowered into GroupQueryAttention (and the per-layer fallback where its kernel
cannot), the Phi-3.5 chat template, and the refusal of a sliding window that cuts."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from llmbuild.errors import UserError
from llmbuild.models import spec_for
from llmbuild.runtime import load
from tests import family_checks as fc
from tests.test_family_qwen2 import (  # noqa: F401  (the shared checks, collected here for Phi-3)
    first, shape, test_batched_equals_one_by_one_and_greedy_equals_hf, test_cpu_lowering_applies_and_equals_standard_and_hf,
    test_cpp_greedy_equals_python, test_decode_with_cache_equals_recompute, test_gguf_from_llama_cpp_matches_transformers_tensor_for_tensor,
    test_logits_match_hf, test_quantized_accuracy_gate_passes, test_tensor_parallel_tp2_equals_tp1,
    test_tensorrt_rtx_fp16_engine_builds)
from tests.tiny import compile_tiny, make_tiny_hf
from tests.tiny_configs import TINY_SHAPES

ARCH = "Phi3ForCausalLM"
LONGROPE = TINY_SHAPES[ARCH][0]
ORIGINAL = LONGROPE["rope_scaling"]["original_max_position_embeddings"]


@pytest.fixture(scope="module")
def arch() -> str:
    return ARCH


def test_fused_tensors_are_read_as_their_row_blocks(shape):
    from llmbuild.source import open_source

    cfg = json.loads((shape["dir"] / "config.json").read_text())
    state = shape["ref"].state_dict()
    with open_source(shape["dir"]) as src:
        spec = spec_for(src.config)
        d = spec.dims(src.config)
        names = set(src.names())
        assert "model.layers.0.self_attn.qkv_proj.weight" not in names and "model.layers.0.mlp.gate_up_proj.weight" not in names
        qkv = state["model.layers.1.self_attn.qkv_proj.weight"].numpy()
        q, k, v = (src.load(f"model.layers.1.self_attn.{m}_proj.weight") for m in "qkv")
        assert q.shape == (d.q_width, cfg["hidden_size"]) and k.shape == v.shape == (d.kv_width, cfg["hidden_size"])
        np.testing.assert_array_equal(np.concatenate([q, k, v]), qkv)
        gate_up = state["model.layers.1.mlp.gate_up_proj.weight"].numpy()
        gate, up = (src.load(f"model.layers.1.mlp.{m}_proj.weight") for m in ("gate", "up"))
        np.testing.assert_array_equal(gate, gate_up[: d.intermediate])  # HF: gate, up = chunk(2)
        np.testing.assert_array_equal(up, gate_up[d.intermediate:])


def test_partial_rotary_is_in_the_graph(shape):
    cfg = json.loads((shape["dir"] / "config.json").read_text())
    spec = spec_for(cfg)
    rotary = spec.rotary_dim(cfg)
    assert rotary == int(spec.dims(cfg).head_dim * cfg.get("partial_rotary_factor", 1.0))
    import onnx

    from llmbuild.artifact import read_manifest

    g = onnx.load(str(shape["fp32"] / read_manifest(shape["fp32"])["graph"]["file"]), load_external_data=False).graph
    ropes = [n for n in g.node if n.op_type == "RotaryEmbedding"]
    assert len(ropes) == 2 * shape["layers"]
    dims = {a.i for n in ropes for a in n.attribute if a.name == "rotary_embedding_dim"}
    assert dims == ({rotary} if rotary != spec.dims(cfg).head_dim else set())


@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3-longrope")
    model_dir = make_tiny_hf(root / "hf", ARCH, **LONGROPE)
    limits = {"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 160}
    from llmbuild.source import read_config

    return {"dir": model_dir, "ref": fc.hf_reference(model_dir), "cfg": read_config(model_dir),
            "art": compile_tiny(model_dir, root / "out", limits=limits)}


@pytest.mark.parametrize("lowered", [False, True], ids=["standard", "cpu-lowered"])
def test_longrope_decode_past_original_equals_hf_cached_decoding(longrope, lowered):
    """A 40-token prompt (short factors), then 60 tokens one per pass with HF's KV cache, crossing
    position 64 where HF's rotary switches to the long factors: every step's logits are HF's.
    (HF's `generate` for Phi-3 differs from its own cached decoding here: it drops the cache
    once the sequence crosses original_max_position_embeddings and recomputes every position
    with the long factors; llmbuild.models.rope.longrope_tables says why one table cannot.)"""
    from transformers import DynamicCache

    from llmbuild.runtime.executors.base import StepInputs

    ref, n = longrope["ref"], 40
    ids = np.random.default_rng(3).integers(5, 256, n).tolist()
    theirs, tokens = [], []
    with torch.no_grad():
        out = ref(torch.tensor([ids]), past_key_values=DynamicCache(config=ref.config), use_cache=True)
        for i in range(60):
            theirs.append(out.logits[0, -1].numpy())
            tokens.append(int(theirs[-1].argmax()))
            out = ref(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True,
                      position_ids=torch.tensor([[n + i]]))
    ex = load(longrope["art"], backend="onnxruntime", cpu_lowering=lowered).executor
    ex.reset(1)
    ours = [ex.forward(StepInputs(np.array([ids]), np.arange(n)[None], np.zeros(1, np.int64), np.array([[n - 1]])))[0, 0]]
    for i, t in enumerate(tokens[:-1]):
        pos = n + i
        ours.append(ex.forward(StepInputs(np.array([[t]]), np.array([[pos]]), np.array([pos]), np.array([[0]])))[0, 0])
    assert n + len(tokens) > ORIGINAL + 30
    np.testing.assert_allclose(np.stack(ours), np.stack(theirs), atol=1e-4, rtol=0)
    # and greedy generation gives HF's greedy tokens
    greedy = load(longrope["art"], backend="onnxruntime", cpu_lowering=lowered).generate_ids([ids], max_new_tokens=60)
    assert greedy[0].token_ids == tokens


def test_longrope_tables_switch_factor_at_original(longrope):
    """Rows below original_max_position_embeddings use the short factors, rows from it on the long
    ones, both scaled by HF's attention factor."""
    from llmbuild.models.rope import cos_sin_tables
    from llmbuild.source import read_config

    cfg = read_config(longrope["dir"])
    cos, sin = cos_sin_tables(cfg, spec_for(cfg).rotary_dim(cfg), 160)
    rot = longrope["ref"].model.rotary_emb
    for pos in (0, ORIGINAL - 1, ORIGINAL, 150):  # HF: a pass whose last position is `pos`
        x = torch.zeros(1, 1, 8)
        hf_cos, hf_sin = rot(x, torch.arange(pos + 1)[None])
        np.testing.assert_allclose(cos[pos], hf_cos[0, pos, : cos.shape[1]].numpy(), atol=2e-6)
        np.testing.assert_allclose(sin[pos], hf_sin[0, pos, : sin.shape[1]].numpy(), atol=2e-6)
    assert abs(float(rot.attention_scaling) - 1.0) > 0.05  # the attention factor is in play


def test_partial_rotary_gqa_cannot_run_falls_back_per_layer_with_a_warning(tmp_path, caplog):
    """rotary 24 of head_size 32: GroupQueryAttention's CPU kernel needs cos/sin widths that are
    multiples of 8 (rotary % 16); each layer keeps the standard Attention, says so, and still
    gives HF's logits."""
    model_dir = make_tiny_hf(tmp_path / "hf", ARCH, num_heads=4, num_kv_heads=2, hidden=128, seed=44,
                             extra_config={"partial_rotary_factor": 0.75})
    art = compile_tiny(model_dir, tmp_path / "out", limits=fc.LIMITS)
    caplog.clear()  # compile lowered it too (its CPU-ready graph stage): count this lowering's warnings
    with caplog.at_level(logging.WARNING, logger="llmbuild.cpu_lowering"):
        ops = fc.lowered_ops(art)
    assert ops["GroupQueryAttention"] == 0 and ops["Attention"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmbuild.cpu_lowering"]
    assert len(warnings) == 2 and all("partial rotary dim 24 of head_size 32 is not a multiple of 16" in w
                                      for w in warnings), warnings
    fc.check_logits_match_hf(art, fc.hf_reference(model_dir), "float32", lowered=True)


def test_phi35_chat_template_renders_as_hf(llama_cpp, tmp_path):
    from tests.llama_cpp import template

    model_dir = make_tiny_hf(tmp_path / "hf", ARCH, **TINY_SHAPES[ARCH][2])
    ours, hf = fc.tokenizers_with_template(model_dir, template(llama_cpp, "microsoft-Phi-3.5-mini-instruct"), tmp_path / "out")
    for messages in ([{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert "<|assistant|>" in expected
        assert ours.apply_chat_template(messages) == expected


def _config(**extra) -> dict:
    return {"architectures": [ARCH], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256, "hidden_act": "silu",
            "max_position_embeddings": 4096, **extra}


def test_sliding_window_that_cuts_is_refused_naming_the_key():
    with pytest.raises(UserError, match=r"Phi3ForCausalLM: sliding_window=2047 \(< max_position_embeddings=4096\) "
                                        r"is not supported; only Phi-3 models whose window is null or covers the "
                                        r"whole context can be built"):
        spec_for(_config(sliding_window=2047))  # Phi-3-mini-4k-instruct
    spec_for(_config(sliding_window=262144))  # Phi-3.5-mini / Phi-4-mini: never cuts
    spec_for(_config(sliding_window=None))


def test_longrope_factors_of_the_wrong_length_are_refused(tmp_path):
    from llmbuild.models.rope import cos_sin_tables

    cfg = _config(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8,
                                "original_max_position_embeddings": 64})
    with pytest.raises(UserError, match=r"longrope rope scaling: short_factor must list 8 numbers \(rotary dims / 2\), "
                                        r"found 3 values"):
        cos_sin_tables(cfg, 16, 32)


def test_longrope_gguf_from_llama_cpp_carries_the_factors(llama_cpp, tmp_path):
    """llama.cpp writes LongRoPE as rope_factors_long/short tensors plus the original context and
    attention factor; the GGUF source turns them back into HF's rope_scaling, and the graph built
    from an f32 GGUF gives the HF checkpoint's logits (partial rotary from rope.dimension_count)."""
    from llmbuild.source import read_config
    from tests.llama_cpp import convert

    model_dir = make_tiny_hf(tmp_path / "hf", ARCH, **LONGROPE)
    gguf = convert(llama_cpp, model_dir, tmp_path / "m.f32.gguf", "f32")
    ours, hf = read_config(gguf), read_config(model_dir)
    scaling = ours["rope_scaling"]
    assert scaling["rope_type"] == "longrope"
    np.testing.assert_allclose(scaling["short_factor"], hf["rope_scaling"]["short_factor"], rtol=1e-6)
    np.testing.assert_allclose(scaling["long_factor"], hf["rope_scaling"]["long_factor"], rtol=1e-6)
    assert scaling["original_max_position_embeddings"] == ORIGINAL
    assert ours["partial_rotary_factor"] == 0.5
    art = compile_tiny(gguf, tmp_path / "out", limits=fc.LIMITS)
    fc.check_logits_match_hf(art, fc.hf_reference(model_dir), "float32", lengths=(7, 30))
