"""Qwen2ForCausalLM (Qwen2, Qwen2.5) on tiny random models against HF transformers:
the checks of tests/family_checks.py for every shape in TINY_SHAPES, GGUF from llama.cpp's
converter tensor for tensor against transformers' GGUF loading, the real chat template,
and the refusal of `use_sliding_window`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmbuild.errors import UserError
from llmbuild.models import spec_for
from tests import family_checks as fc
from tests.tiny import compile_tiny, make_tiny_hf
from tests.tiny_configs import TINY_SHAPES

ARCH = "Qwen2ForCausalLM"
SHAPES = TINY_SHAPES[ARCH]


# The checks below are shared by the families that import them (tests/test_family_qwen3.py):
# they read the architecture from the `arch` fixture, which each family module defines.
@pytest.fixture(scope="module")
def arch() -> str:
    return ARCH


@pytest.fixture(scope="module", params=range(3), ids=["shape0", "shape1", "shape2"])
def shape(request, arch, tmp_path_factory):
    cfg = TINY_SHAPES[arch][request.param]
    root = tmp_path_factory.mktemp(f"{arch}-{request.param}")
    model_dir = make_tiny_hf(root / "hf", arch, **cfg)
    art = compile_tiny(model_dir, root / "fp32", limits=fc.LIMITS)
    return {"dir": model_dir, "root": root, "ref": fc.hf_reference(model_dir), "fp32": art,
            "layers": cfg.get("layers", 2)}


@pytest.fixture(scope="module")
def first(arch, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"{arch}-first")
    model_dir = make_tiny_hf(root / "hf", arch, **TINY_SHAPES[arch][0])
    return {"dir": model_dir, "root": root, "fp32": compile_tiny(model_dir, root / "fp32", limits=fc.LIMITS)}


def test_config_has_biases_and_the_graph_reads_them(shape):
    cfg = json.loads((shape["dir"] / "config.json").read_text())
    spec = spec_for(cfg)
    tensors = spec.tensors(spec.dims(cfg))
    assert {n for n in tensors if n.endswith(".bias")} == {
        f"model.layers.{i}.self_attn.{m}_proj.bias" for i in range(shape["layers"]) for m in "qkv"}
    # the random biases are not zero, so a graph without them would not match HF below
    assert float(shape["ref"].model.layers[0].self_attn.q_proj.bias.detach().abs().max()) > 0.01


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_logits_match_hf(shape, precision):
    art = shape["fp32"] if precision == "float32" else compile_tiny(shape["dir"], shape["root"] / "fp16",
                                                                      precision="float16", limits=fc.LIMITS)
    fc.check_logits_match_hf(art, shape["ref"], precision)


def test_decode_with_cache_equals_recompute(shape):
    fc.check_decode_equals_recompute(shape["fp32"], shape["ref"].config.vocab_size)


def test_batched_equals_one_by_one_and_greedy_equals_hf(shape):
    fc.check_batched_equals_one_by_one_and_hf(shape["fp32"], shape["ref"])


def test_cpu_lowering_applies_and_equals_standard_and_hf(shape, caplog):
    fc.check_cpu_lowering_applies(shape["fp32"], shape["layers"], caplog)
    fc.check_lowered_equals_standard(shape["fp32"], shape["ref"].config.vocab_size)
    fc.check_logits_match_hf(shape["fp32"], shape["ref"], "float32", lowered=True)
    fc.check_decode_equals_recompute(shape["fp32"], shape["ref"].config.vocab_size, lowered=True)


def test_tensor_parallel_tp2_equals_tp1(first):
    """q/k/v biases are split with their rows (whole heads per rank)."""
    fc.check_tp2_equals_tp1(first["dir"], first["root"] / "tp", first["fp32"])


@pytest.mark.parametrize("weights", [{"scheme": "int4", "group_size": 32}, {"scheme": "int8"}],
                         ids=["int4-rtn-g32", "int8"])
def test_quantized_accuracy_gate_passes(first, weights):
    fc.check_quantized_gate(first["dir"], first["root"] / "quant", weights)


def test_tensorrt_rtx_fp16_engine_builds(first):
    fc.check_trt_rtx_engine(first["dir"], first["root"] / "trt")


def test_cpp_greedy_equals_python(first, cpp_build, tmp_path):
    """The C++ runtime's greedy ids equal Python's, on the standard graph and on the lowered one."""
    from llmbuild.lowering.cpu import save_lowered_graph
    from llmbuild.runtime.sampling import SamplingParams
    from tests.test_cpp import TINY_PROMPTS, assert_same_ids, python_model

    art = first["fp32"]
    assert_same_ids(python_model(art, lowered=False), art, TINY_PROMPTS, 30, SamplingParams())
    graph = save_lowered_graph(art, tmp_path / "lowered")
    assert_same_ids(python_model(art, lowered=True), art, TINY_PROMPTS, 30, SamplingParams(), "--graph", str(graph))


# -- GGUF ------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1, 2], ids=["shape0", "shape1", "shape2"])
@pytest.mark.parametrize("outtype", ["q8_0", "f16"])
def test_gguf_from_llama_cpp_matches_transformers_tensor_for_tensor(arch, llama_cpp, tmp_path, index, outtype):
    """llama.cpp's converter writes the GGUF; our source gives back every tensor the graph
    reads exactly as transformers' GGUF loading does, and the graph's logits are
    transformers' on the GGUF. transformers 5.24 builds GGUF configs without head_dim (it
    takes the config class's default: hidden / heads, or 128 for Qwen3) and then refuses the
    weights, so where that default is not the model's head_dim the tensors are compared with
    the original checkpoint within the outtype's rounding instead. transformers' phi3 GGUF
    config also drops partial rotary (llama.cpp's rope.dimension_count): the logits are then
    compared with the checkpoint's, within the 16-bit tolerance."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmbuild.source import open_source
    from tests.llama_cpp import convert

    cfg = TINY_SHAPES[arch][index]
    model_dir = make_tiny_hf(tmp_path / "hf", arch, **cfg)
    gguf = convert(llama_cpp, model_dir, tmp_path / f"m.{outtype}.gguf", outtype)
    from transformers import AutoConfig

    guessed = AutoConfig.from_pretrained(tmp_path, gguf_file=gguf.name)
    head_dim = cfg.get("head_dim") or cfg["hidden"] // cfg["num_heads"]
    explicit_head_dim = (getattr(guessed, "head_dim", None) or guessed.hidden_size // guessed.num_attention_heads) != head_dim
    if explicit_head_dim:
        theirs = fc.hf_reference(model_dir)
    else:
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    state = {k: v.float().numpy() for k, v in theirs.state_dict().items()}
    with open_source(gguf) as src:
        assert src.config["architectures"] == [arch]
        spec = spec_for(src.config)
        names = spec.tensors(spec.dims(src.config))
        assert set(names) == set(fc.split_names(spec, fc.safetensors_names(model_dir)))
        for name in names:
            ours = src.load(name).astype(np.float32)
            if explicit_head_dim:  # against the checkpoint: f16 rounding, or q8_0's per-32 scale
                ref = fc.split_tensor(spec, src.config, state, name)
                atol = 1e-3 if outtype == "f16" or ours.ndim == 1 else np.abs(ref).max() / 127
                np.testing.assert_allclose(ours, ref, atol=atol, rtol=1e-3, err_msg=name)
            else:
                np.testing.assert_array_equal(ours, fc.split_tensor(spec, src.config, state, name), err_msg=name)
    art = compile_tiny(gguf, tmp_path / "out", limits=fc.LIMITS)
    their_rotary = getattr(guessed, "partial_rotary_factor", None) or 1.0
    if not explicit_head_dim and their_rotary == (cfg.get("extra_config") or {}).get("partial_rotary_factor", 1.0):
        # what the graph computes from the GGUF is what transformers computes from it
        fc.check_logits_match_hf(art, theirs, "float32", lengths=(7, 30))
    else:  # transformers misreads this GGUF's config (head_dim, or partial rotary for phi3): the checkpoint's logits
        fc.check_logits_match_hf(art, fc.hf_reference(model_dir), "float16", lengths=(7, 30))


# -- chat template -----------------------------------------------------------------------------
def test_qwen25_chat_template_renders_as_hf(llama_cpp, tmp_path):
    from tests.llama_cpp import template

    model_dir = make_tiny_hf(tmp_path / "hf", ARCH, **SHAPES[0])
    ours, hf = fc.tokenizers_with_template(model_dir, template(llama_cpp, "Qwen-Qwen2.5-7B-Instruct"), tmp_path / "out")
    for messages in ([{"role": "user", "content": "Hi there"}],  # default system prompt inserted
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert "<|im_start|>assistant\n" in expected
        assert ours.apply_chat_template(messages) == expected
    assert "You are Qwen" in ours.apply_chat_template([{"role": "user", "content": "x"}])


# -- refusals ------------------------------------------------------------------------------------
def _config(**extra) -> dict:
    return {"architectures": [ARCH], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "hidden_act": "silu", **extra}


def test_use_sliding_window_is_refused_naming_the_key():
    msg = (r"Qwen2ForCausalLM: use_sliding_window=true is not supported \(layers 2\.\.3 would attend within "
           r"sliding_window=32\); only checkpoints with use_sliding_window: false can be built")
    with pytest.raises(UserError, match=msg):
        spec_for(_config(use_sliding_window=True, sliding_window=32, max_window_layers=2))
    with pytest.raises(UserError, match=msg):  # transformers 5 writes layer_types
        spec_for(_config(use_sliding_window=True, sliding_window=32, max_window_layers=2,
                         layer_types=["full_attention"] * 2 + ["sliding_attention"] * 2))
    # Qwen2.5's published configs: the window is set but unused
    spec_for(_config(use_sliding_window=False, sliding_window=32768, max_window_layers=2))
    spec_for(_config(use_sliding_window=True, sliding_window=32, max_window_layers=4))  # no layer slides


def test_use_sliding_window_is_refused_by_validate(tmp_path):
    from llmbuild.recipe import RecipeError, load_recipe

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(_config(use_sliding_window=True, sliding_window=32,
                                                                max_window_layers=0, model_type="qwen2")))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: q\nmodel:\n  source: {model_dir}\nprecision: float32\n")
    with pytest.raises(RecipeError, match=r"use_sliding_window=true is not supported"):
        load_recipe(recipe)
