"""The recipe's `quantization:` section and the `verify:` gate keys: valid forms resolve
to the documented defaults; every mistake is reported at its YAML line with the choices."""

from __future__ import annotations

import json

import pytest

from llmbuild.recipe import load_recipe
from llmbuild.recipe.problems import RecipeError

HEAD = "name: q\nmodel: {source: ./m}\n"


def load(tmp_path, body: str, overrides=()):
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + body)
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text("{}")
    return load_recipe(path, overrides, check_model=False)


def problems(tmp_path, body: str) -> dict[str, str]:
    with pytest.raises(RecipeError) as e:
        load(tmp_path, body)
    return {p.path: f"{p.line}: {p.message}" for p in e.value.problems}


# A small model's config for the checks that need the model (check_model=True).
LLAMA = {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False, "num_hidden_layers": 2,
         "max_position_embeddings": 4096, "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}


def with_model(tmp_path, body: str, config: dict):
    """The recipe HEAD + body at tmp_path/r.yaml, its model's config.json beside it."""
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + body)
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    return path


def the_problem(path):
    """The one problem load_recipe(path) reports."""
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    [p] = e.value.problems
    return p


def test_issue_example_resolves_with_defaults(tmp_path):
    r = load(tmp_path, (
        "quantization:\n"
        "  weights: {scheme: int4, algorithm: awq, group_size: 128}\n"
        "  overrides: [{match: \"lm_head\", scheme: none}, {layers: [0, -1], scheme: int8}]\n"
        "  calibration: {dataset: kjv, samples: 128, seq_len: 512, seed: 0}\n"
        "verify: {max_perplexity_increase: 0.05, min_top1_agreement: 0.9}\n"))
    q = r.to_dict()["quantization"]
    assert q["weights"] == {"scheme": "int4", "algorithm": "awq", "group_size": 128, "symmetric": True}
    assert q["overrides"][1] == {"match": None, "layers": [0, -1], "scheme": "int8", "algorithm": None,
                                 "group_size": None, "symmetric": None}
    v = r.to_dict()["verify"]
    assert (v["max_perplexity_increase"], v["min_top1_agreement"], v["max_kl_divergence"]) == (0.05, 0.9, None)
    assert load(tmp_path, "").quantization is None
    # the section can be switched on from the command line
    r = load(tmp_path, "", ["quantization={weights: {scheme: fp8}}"])
    q = r.to_dict()["quantization"]
    assert q["calibration"] == {"dataset": "kjv", "samples": 128, "seq_len": 512, "seed": 0, "propagate": "auto"}
    from llmbuild.quantize.calibration import AlgorithmOptions  # unset: calibration chooses it

    assert q["awq"] == {"clip": True, "hessian_stride": None} and q["gptq"] == {"act_order": True, "damp": 0.01}
    assert AlgorithmOptions.from_recipe(q).awq_hessian_stride is None


def test_algorithm_options_are_validated_where_they_are(tmp_path):
    r = load(tmp_path, (
        "quantization:\n"
        "  weights: {scheme: int4, algorithm: gptq}\n"
        "  gptq: {act_order: true, damp: 0.05}\n"
        "  awq: {clip: false, hessian_stride: 4}\n"
        "  calibration: {propagate: float}\n"))
    from llmbuild.quantize.calibration import AlgorithmOptions

    opts = AlgorithmOptions.from_recipe(r.to_dict()["quantization"])
    assert opts == AlgorithmOptions(awq_clip=False, awq_hessian_stride=4, gptq_act_order=True, gptq_damp=0.05,
                                    propagate="float")
    errors = problems(tmp_path, (
        "quantization:\n"
        "  weights: {scheme: int4, algorithm: gptq}\n"
        "  gptq: {damp: 0, order: 1}\n"
        "  calibration: {propagate: sideways}\n"
        "  awq: {hessian_stride: 0}\n"))
    assert errors["quantization.gptq.damp"].startswith("5:")
    assert errors["quantization.gptq.order"].startswith("5:")
    assert errors["quantization.calibration.propagate"].startswith("6:") and "auto, quantized, float" in errors[
        "quantization.calibration.propagate"]
    assert errors["quantization.awq.hessian_stride"].startswith("7:")


def test_mistakes_are_reported_where_they_are(tmp_path):
    found = problems(tmp_path, (
        "quantization:\n"
        "  weights: {scheme: fp8, algorithm: gptq, group_size: 64}\n"
        "  overrides:\n"
        "    - {scheme: none}\n"
        "    - {match: '*.q_proj', scheme: int5}\n"
        "  calibration: {dataset: wikitext, samples: 0}\n"
        "verify: {max_perplexity_increase: -1, eval_dataset: 'kjv:test'}\n"))
    assert found["quantization.weights.algorithm"].startswith(
        "4: algorithm 'gptq' applies to scheme int4 only; the scheme here is fp8")
    assert found["quantization.weights.group_size"].startswith(
        "4: group_size 64 applies to scheme int4 and int8 only; the scheme here is fp8")
    assert "an override needs `match`" in found["quantization.overrides[0]"]
    # the choices are listed (the optional section's fields are found: llmbuild.recipe.paths.section_at)
    assert found["quantization.overrides[1].scheme"] == (
        "7: expected one of int8, int4, fp8, none; found 'int5' (string); did you mean 'int8'?")
    assert "expected a bundled corpus (kjv) or a path to a .txt or .jsonl file" in found["quantization.calibration.dataset"]
    assert found["quantization.calibration.samples"].startswith("8: ")
    assert found["verify.max_perplexity_increase"].startswith("9: ")
    assert "has splits ['calibration', 'evaluation'], not 'test'" in found["verify.eval_dataset"]
    found = problems(tmp_path, (
        "quantization:\n"
        "  weights: {scheme: int8, symmetric: false}\n"
        "  overrides: [{match: lm_head, scheme: fp8, group_size: 64}, {match: '*.o_proj', scheme: fp8,"
        " symmetric: false}]\n"))
    assert found["quantization.weights"].startswith(  # int8 per channel has no offsets
        "4: symmetric false with scheme int8 needs a group_size (32, 64 or 128)")
    assert found["quantization.overrides[0].group_size"].startswith(
        "5: group_size 64 applies to scheme int4 and int8 only; the scheme here is fp8")
    assert found["quantization.overrides[1].symmetric"].startswith(
        "5: symmetric False applies to scheme int4 and int8 only; the scheme here is fp8")
    r = load(tmp_path, "quantization: {weights: {scheme: int8, group_size: 32, symmetric: false},"
                       " overrides: [{match: '*.o_proj', scheme: int8, symmetric: true}]}\n")
    assert r.to_dict()["quantization"]["weights"] == {"scheme": "int8", "algorithm": "rtn", "group_size": 32,
                                                      "symmetric": False}
    r = load(tmp_path, "quantization: {weights: {scheme: int8, group_size: 32}}\n")
    assert r.to_dict()["quantization"]["weights"]["group_size"] == 32
    found = problems(tmp_path, "quantization: {weights: {scheme: int4, group_size: 48}}\n")
    assert found["quantization.weights.group_size"] == "3: expected one of 32, 64, 128; found 48 (integer)"


def test_quantization_composes_with_tensor_parallelism(tmp_path):
    """tp > 1 with quantization is a valid recipe (tests/test_parallel.py checks the numbers)."""
    r = load(tmp_path, "parallel: {tp: 2}\nquantization: {weights: {scheme: int8}}\n")
    assert r.to_dict()["parallel"]["tp"] == 2 and r.to_dict()["quantization"]["weights"]["scheme"] == "int8"


def test_calibrated_override_of_a_tied_lm_head_is_refused_at_its_line(tmp_path):
    config = LLAMA | {"tie_word_embeddings": True}
    path = with_model(tmp_path, "quantization:\n  weights: {scheme: int4, algorithm: awq}\n"
                      "  overrides:\n    - {layers: [0], scheme: int8}\n    - {match: lm_head, group_size: 64}\n", config)
    p = the_problem(path)
    assert (p.path, p.line) == ("quantization.overrides[1]", 7)
    assert "round-to-nearest only" in p.message and "int4 g64 sym awq" in p.message
    path.write_text(path.read_text().replace("group_size: 64", "scheme: int8"))
    assert load_recipe(path).to_dict()["quantization"]["overrides"][1]["scheme"] == "int8"
    config["tie_word_embeddings"] = False  # an untied lm_head is calibrated like any linear
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    path.write_text(path.read_text().replace("{match: lm_head, scheme: int8}", "{match: lm_head, group_size: 64}"))
    assert load_recipe(path).to_dict()["quantization"]["overrides"][1]["group_size"] == 64


def test_scale_bits_is_an_int4_setting_not_for_gptq(tmp_path):
    """`scale_bits: 8` (int4's block scales as 8-bit codes): int4 only, not with GPTQ, and an
    unset one leaves the resolved recipe (its content hash) as before."""
    found = problems(tmp_path, (
        "quantization:\n"
        "  weights: {scheme: int8, group_size: 32, scale_bits: 8}\n"
        "  overrides: [{match: lm_head, scheme: int4, algorithm: gptq, scale_bits: 8}]\n"))
    assert found["quantization.weights.scale_bits"].startswith(
        "4: scale_bits 8 applies to scheme int4 only; the scheme here is int8")
    assert "scale_bits 8 does not apply to algorithm gptq" in found["quantization.overrides[0]"]
    found = problems(tmp_path, "quantization: {weights: {scheme: int4, scale_bits: 4}}\n")
    assert found["quantization.weights.scale_bits"].startswith("3: expected one of 8, 16; found 4")
    r = load(tmp_path, "quantization: {weights: {scheme: int4, group_size: 32, symmetric: false, scale_bits: 8}}\n")
    assert r.to_dict()["quantization"]["weights"]["scale_bits"] == 8
    r = load(tmp_path, "quantization: {weights: {scheme: int4}}\n")
    assert "scale_bits" not in r.to_dict()["quantization"]["weights"]
    r = load(tmp_path, "quantization: {weights: {scheme: int4}}\n", ["quantization.weights.scale_bits=8"])
    assert r.to_dict()["quantization"]["weights"]["scale_bits"] == 8


def test_inherited_scale_bits_with_gptq_is_refused_at_validate(tmp_path):
    """scale_bits 8 in `weights` and algorithm gptq in an override are each valid; together
    on a module they are not: validate reports it at the overrides (not compile, later)."""
    path = with_model(tmp_path, "quantization:\n  weights: {scheme: int4, group_size: 32, scale_bits: 8}\n"
                      "  overrides:\n    - {match: '*.q_proj', algorithm: gptq}\n", LLAMA)
    p = the_problem(path)
    assert (p.path, p.line) == ("quantization.overrides", 6)
    assert "model.layers.0.self_attn.q_proj: scale_bits 8 does not apply to algorithm gptq" in p.message
    path.write_text(path.read_text().replace("algorithm: gptq}", "algorithm: gptq, scale_bits: 16}"))
    assert load_recipe(path).to_dict()["quantization"]["overrides"][0]["scale_bits"] == 16


def test_scale_bits_on_routed_experts_is_refused_at_validate(tmp_path):
    """Routed experts take no 8-bit scale codes: validate says so at `weights` and names the
    override that keeps them on float scales, which then validates."""
    mixtral = {"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
               "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 4096}
    path = with_model(tmp_path, "quantization:\n  weights: {scheme: int4, group_size: 32, scale_bits: 8}\n", mixtral)
    p = the_problem(path)
    assert (p.path, p.line) == ("quantization.weights", 4)
    assert "scale_bits 8 applies to dense linears only" in p.message and "{match: '*.experts.*'" in p.message
    path.write_text(path.read_text() + "  overrides: [{match: '*.experts.*', scale_bits: 16}]\n")
    assert load_recipe(path).to_dict()["quantization"]["weights"]["scale_bits"] == 8
