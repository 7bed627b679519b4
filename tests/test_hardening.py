"""Issue 15: bad inputs end in clear errors, verification cannot be fooled, and what
compile verifies is what runs. One test (or more) per numbered case of the issue,
each checking its message; tiny random models made in-process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmbuild.errors import BuildError, UserError
from llmbuild.recipe import RecipeError, load_recipe
from tests.tiny import compile_tiny, make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 96}


def llmbuild_cli(*args, stdin: bytes | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmbuild.cli", *map(str, args)], capture_output=True, input=stdin,
                          timeout=600, cwd=cwd)


def edit_config(model_dir: Path, **changes) -> Path:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "rope_theta":
            cfg.setdefault("rope_parameters", {})["rope_theta"] = value
        cfg[key] = value
    path.write_text(json.dumps(cfg))
    return model_dir


def recipe_for(tmp: Path, source: Path, extra: str = "", name: str = "t") -> Path:
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(f"name: {name}\nmodel: {{source: {source}}}\nprecision: float32\nengines: []\n"
                      f"limits: {json.dumps(LIMITS)}\n{extra}")
    return recipe


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("hard") / "hf", seed=3)


@pytest.fixture(scope="module")
def tiny_artifact(tiny_dir, tmp_path_factory) -> Path:
    return compile_tiny(tiny_dir, tmp_path_factory.mktemp("hard-out"), limits=LIMITS)


# -- case 8: verification checks the graph the CPU runtime runs ------------------------------
@pytest.fixture(scope="module")
def mistral_head24(tmp_path_factory):
    """A tiny Mistral with head_dim 24 (MHA, tied): GroupQueryAttention's CPU kernel needs
    head_size % 16 == 0, so the CPU lowering must keep the standard Attention."""
    root = tmp_path_factory.mktemp("mistral24")
    model_dir = make_tiny_hf(root / "hf", "MistralForCausalLM", num_heads=4, num_kv_heads=4, hidden=96, tie=True,
                             seed=8)
    return model_dir, root


def test_case8_lowering_falls_back_per_layer_and_compile_verifies_both_graphs(mistral_head24, caplog):
    from llmbuild.runtime import load

    model_dir, root = mistral_head24
    with caplog.at_level(logging.WARNING, logger="llmbuild.cpu_lowering"):
        artifact = compile_tiny(model_dir, root / "out", limits=LIMITS, verify=True)
    manifest = json.loads((artifact / "manifest.json").read_text())
    v = manifest["verification"]
    assert v["passed"] and v["graph"] == "standard" and v["cpu_lowered"]["passed"]
    assert v["cpu_lowered"]["max_abs_logit_diff"] < 1e-3
    warnings = [r.getMessage() for r in caplog.records if "keeps the standard Attention" in r.getMessage()]
    assert warnings and "head_size 24 is not a multiple of 16" in warnings[0]
    # ... and `run` works: the lowered graph (per-layer fallback) equals the standard one.
    prompt = [5, 6, 7, 8, 9]
    with load(artifact, backend="onnxruntime") as lowered, load(artifact, backend="onnxruntime",
                                                                  cpu_lowering=False) as standard:
        assert lowered.executor.lowered
        a = lowered.generate_ids([prompt], max_new_tokens=12)[0].token_ids
        b = standard.generate_ids([prompt], max_new_tokens=12)[0].token_ids
    assert a == b and len(a) > 0


def test_case8_constraint_function_names_each_reason():
    import onnx_ir as ir

    from llmbuild.runtime.cpu_lowering import gqa_constraint_problem

    ok = dict(head_dim=64, num_heads=8, kv_heads=2, dtype=ir.DataType.FLOAT)
    assert gqa_constraint_problem(**ok) is None
    assert "head_size 24" in gqa_constraint_problem(**{**ok, "head_dim": 24})
    assert "dtype" in gqa_constraint_problem(**{**ok, "dtype": ir.DataType.BFLOAT16})
    assert "softcap=30.0" in gqa_constraint_problem(**ok, softcap=30.0)
    assert "not a multiple of 3 KV heads" in gqa_constraint_problem(**{**ok, "kv_heads": 3})


# -- case 2 and 4: config values that compile into NaN or a refused kernel -------------------
@pytest.mark.parametrize("change, message", [
    ({"rope_theta": -10000.0}, "model config rope_theta: expected a finite number > 0, found -10000.0"),
    ({"rms_norm_eps": -1e-5}, "model config rms_norm_eps: expected a finite number > 0, found -1e-05"),
    ({"num_hidden_layers": -2}, "model config num_hidden_layers: expected an integer in [1, 4096], found -2"),
    ({"num_hidden_layers": "2"}, "model config num_hidden_layers: expected an integer in [1, 4096], found '2'"),
    ({"num_key_value_heads": 3}, "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
])
def test_case2_4_bad_config_values_are_recipe_errors(tiny_dir, tmp_path, change, message):
    import shutil

    model_dir = tmp_path / "hf"
    shutil.copytree(tiny_dir, model_dir)
    edit_config(model_dir, **change)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_for(tmp_path, model_dir))
    assert any(p.path == "model.source" and message in p.message for p in info.value.problems), info.value
    # ... and opening the source says the same (a compile that skipped validate).
    from llmbuild.source import open_source

    with pytest.raises(UserError, match="the model config cannot be built"):
        open_source(model_dir)


def test_case2_verification_fails_on_non_finite_logits(tiny_dir, tmp_path):
    """NaN compares false with every threshold: verification must fail, naming where."""
    import shutil

    from safetensors.numpy import load_file, save_file

    model_dir = tmp_path / "hf"
    shutil.copytree(tiny_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    weights["model.norm.weight"][3] = np.nan  # every logit becomes NaN
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BuildError, match=r"non-finite logits \(nan\) from the artifact's graph: first at position 0"):
        compile_tiny(model_dir, tmp_path / "out", limits=LIMITS, verify=True)


def test_case2_first_non_finite():
    from llmbuild.verify.finite import first_non_finite

    x = np.zeros((4, 10), np.float32)
    assert first_non_finite(x) is None
    x[2, 7] = np.inf
    x[3, 1] = np.nan
    assert first_non_finite(x) == (2, 7)


def test_case6_sliding_window_mistral_refused_at_validate(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    cfg = json.loads((ROOT / "tests/data/recipes/tiny-llama/config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=32)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RecipeError, match=r"MistralForCausalLM: sliding_window=32 is not supported"):
        load_recipe(recipe_for(tmp_path, model_dir))
