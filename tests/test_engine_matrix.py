"""Matrix builds and the command line's contract for CI: a recipe's `matrix:` expands into
separately named artifacts; `--json` summaries; exit status 2 for bad input, 1 for a
failed build. Real TensorRT-RTX builds of a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmbuild.artifact import read_manifest
from llmbuild.cli import cli
from llmbuild.compile import compile_recipe
from llmbuild.errors import UserError
from llmbuild.recipe import RecipeError
from llmbuild.recipe.matrix import load_variants
from tests.tiny import make_tiny_hf

MATRIX = (
    "matrix:\n"
    "  precision: [float16, bfloat16]\n"
    "  engines:\n"
    "    portable: [tensorrt-rtx]\n"
    "    ampere: [{backend: tensorrt-rtx, compute_capabilities: [sm86]}]\n"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("matrix") / "hf", tie=True, layers=2, hidden=64, vocab=128, seed=9)


def recipe_file(dst: Path, model: Path, extra: str = "", engines: str = "[tensorrt-rtx]") -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    path = dst / "tiny.yaml"
    path.write_text(
        f"name: tiny\nmodel: {{source: {model}}}\nprecision: float16\n"
        f"limits: {{max_batch_size: 2, max_input_len: 16, max_seq_len: 64}}\nengines: {engines}\n" + extra
    )
    return path


def test_variants_are_validated_and_named(model, tmp_path):
    variants = load_variants(recipe_file(tmp_path, model, MATRIX))
    assert [v.name for v in variants] == ["tiny-float16-portable", "tiny-float16-ampere",
                                          "tiny-bfloat16-portable", "tiny-bfloat16-ampere"]
    assert [(v.precision, v.engines[0].label) for v in variants] == [
        ("float16", "portable"), ("float16", "sm86"), ("bfloat16", "portable"), ("bfloat16", "sm86")]
    assert variants[1].variant == {"of": "tiny", "values": {"precision": "float16", "engines": "ampere"}}
    assert all(v.matrix == {} for v in variants)
    with pytest.raises(UserError, match="declares a matrix"):
        compile_recipe(tmp_path / "tiny.yaml", out_dir=tmp_path / "out", quiet=True, verify=False)


def test_a_bad_variant_points_at_the_matrix_value(model, tmp_path):
    file = recipe_file(tmp_path, model, "matrix:\n  precision: [float16, fp8]\n  limits.max_seq_len: [64, 4096]\n")
    with pytest.raises(RecipeError) as e:
        load_variants(file)
    lines = file.read_text().splitlines()
    by_message = {(p.path, p.message.split(": ", 1)[0]): p for p in e.value.problems}
    fp8 = by_message[("precision", "matrix variant 'tiny-fp8-64'")]
    assert "expected one of float32, float16, bfloat16; found 'fp8' (string)" in fp8.message
    assert lines[fp8.line - 1][fp8.column - 1:].startswith("fp8")
    too_long = by_message[("limits.max_seq_len", "matrix variant 'tiny-float16-4096'")]
    assert "larger than the model's max_position_embeddings 256" in too_long.message
    assert lines[too_long.line - 1][too_long.column - 1:].startswith("4096")


def test_matrix_shape_problems(model, tmp_path):
    file = recipe_file(tmp_path, model, "matrix:\n  precison: [float16]\n  engines: [[tensorrt-rtx]]\n"
                                        "  name: [a, b]\n")
    with pytest.raises(RecipeError) as e:
        load_variants(file, check_model=False)
    [problem] = e.value.problems  # the first bad axis (the schema stops at the first)
    assert problem.path == "matrix.precison"
    assert "unknown key 'precison'; did you mean 'precision'?" in problem.message
    file = recipe_file(tmp_path, model, "matrix:\n  engines: [[tensorrt-rtx]]\n")
    [problem] = pytest.raises(RecipeError, load_variants, file, check_model=False).value.problems
    assert problem.path == "matrix.engines[0]"
    assert "give such values labels with a mapping `label: value`" in problem.message


def test_compile_expands_the_matrix_into_named_artifacts(model, tmp_path):
    file = recipe_file(tmp_path, model, MATRIX)
    result = CliRunner().invoke(cli, ["compile", str(file), "-o", str(tmp_path / "out"), "--no-verify", "--json",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    names = [a["name"] for a in summary["artifacts"]]
    assert names == ["tiny-float16-portable", "tiny-float16-ampere", "tiny-bfloat16-portable", "tiny-bfloat16-ampere"]
    assert "artifact" not in summary  # several artifacts: only the list
    for a in summary["artifacts"]:
        m = read_manifest(a["artifact"])
        assert m["name"] == a["name"] and m["variant"]["of"] == "tiny"
        [engine] = m["engines"]
        assert engine["precision"] == m["recipe"]["precision"] == m["model"]["precision"]
        assert (Path(a["artifact"]) / engine["file"]).stat().st_size == engine["bytes"] == a["engines"][0]["bytes"]
        assert a["engines"][0]["cached"] is False
    assert read_manifest(summary["artifacts"][1]["artifact"])["engines"][0]["targets"]["compute_capabilities"] == [
        "sm86"]


def test_exit_status_bad_input_is_2_and_build_failure_is_1(model, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(cli, ["compile", str(recipe_file(tmp_path / "a", model)), "precision=fp16", "--json",
                              "-o", str(tmp_path / "out")])
    assert bad.exit_code == 2
    error = json.loads(bad.stdout)
    assert error["exit_code"] == 2 and error["problems"][0]["path"] == "precision"
    failing = recipe_file(tmp_path / "b", model, engines="[{backend: tensorrt-rtx, workspace_limit_mib: 1}]")
    failed = runner.invoke(cli, ["compile", str(failing), "--no-verify", "--json", "--no-cache",
                                 "-o", str(tmp_path / "out")])
    assert failed.exit_code == 1, failed.output
    error = json.loads(failed.stdout)
    assert error["kind"] == "build failure" and "workspace limit" in error["error"]
    assert not (tmp_path / "out" / "tiny").exists()  # nothing that looks complete
    valid = runner.invoke(cli, ["validate", str(recipe_file(tmp_path / "c", model, MATRIX)), "--json"])
    assert valid.exit_code == 0 and len(json.loads(valid.stdout)["variants"]) == 4


def test_progress_bars_on_stderr_and_quiet_silences_them(model, tmp_path):
    import subprocess
    import sys

    file = recipe_file(tmp_path, model)
    base = [sys.executable, "-m", "llmbuild.cli", "compile", str(file), "--no-verify", "--no-cache"]
    loud = subprocess.run([*base, "-o", str(tmp_path / "a")], capture_output=True, text=True)
    quiet = subprocess.run([*base, "-o", str(tmp_path / "b"), "--quiet"], capture_output=True, text=True)
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    bar = next(line for line in loud.stderr.splitlines() if line.startswith("engine:tensorrt-rtx:portable"))
    done, total = bar.split()[2].split("/")  # TensorRT's progress monitor: phases of the build
    assert done == total and int(total) > 1
    assert quiet.stderr == ""
    assert quiet.stdout.strip() == f"artifact: {tmp_path / 'b' / 'tiny'}"


def test_json_on_every_command(model, tmp_path):
    runner = CliRunner()
    file = recipe_file(tmp_path, model)

    def run(*args):
        result = runner.invoke(cli, [*args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert run("validate", str(file))["recipe"]["engines"][0]["backend"] == "tensorrt-rtx"
    assert run("plan", str(file))["engines"]["files"] == ["tensorrt-rtx-portable-rank0.engine"]
    built = run("compile", str(file), "-o", str(tmp_path / "out"), "--no-verify", "--cache-dir", str(tmp_path / "c"))
    artifact = built["artifact"]
    assert built["engines"] == ["engines/tensorrt-rtx-portable-rank0.engine"]
    assert run("inspect", artifact)["engines"][0]["profile_names"] == ["prefill", "decode"]
    ids = run("tokenize", artifact, "hi")["ids"]
    assert ids == [ord("h") - 26, ord("i") - 26]  # tiny tokenizer: 5 specials, "\n", then chr(32)...
    assert run("detokenize", artifact, *map(str, ids))["text"] == "hi"
    reply = run("run", artifact, "--prompt", "hi", "--max-new-tokens", "2", "--backend", "onnxruntime", "--raw")
    assert reply["prompt"] == "hi" and isinstance(reply["text"], str)
    missing = runner.invoke(cli, ["inspect", str(tmp_path / "nope"), "--json"])
    assert missing.exit_code == 2 and json.loads(missing.stdout)["error"].startswith("artifact ")
