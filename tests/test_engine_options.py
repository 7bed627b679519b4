"""Backend/target mismatches are user errors before any work, with a message that says
what was expected, what was found and where: in the recipe (with file:line:column), and
again in `build_engine` for callers that bypass the recipe. None of these needs TensorRT."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from llmbuild.engine.build import build_engine
from llmbuild.engine.options import option_problems, target_label
from llmbuild.errors import UserError
from llmbuild.recipe import RecipeError, load_recipe

HEADER = "name: t\nmodel: {source: m.gguf}\n"


def problems_of(tmp_path: Path, text: str, overrides=()) -> tuple[Path, dict]:
    (tmp_path / "m.gguf").write_text("")
    file = tmp_path / "r.yaml"
    file.write_text(HEADER + text)
    with pytest.raises(RecipeError) as e:
        load_recipe(file, overrides, check_model=False)
    problems = {p.path: p for p in e.value.problems}
    assert len(problems) == len(e.value.problems), e.value
    return file, problems


def line_col(file: Path, needle: str) -> tuple[int, int]:
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if needle in line:
            return number, line.index(needle) + 1
    raise AssertionError(needle)


def test_every_backend_mismatch_in_one_recipe(tmp_path):
    file, problems = problems_of(tmp_path, (
        "engines:\n"
        "  - backend: tensorrt-rtx\n"
        "    compute_capabilities: [sm86, sm90]\n"             # datacenter GPU on tensorrt-rtx
        "    hardware_compatibility: ampere+\n"                # tensorrt-only setting
        "    tiling_optimization_level: fast\n"                # tensorrt-only setting
        "    strongly_typed: false\n"                          # RTX is always strongly typed
        "  - backend: tensorrt\n"
        "    compute_capabilities: [sm89]\n"                   # tensorrt builds for its GPU
        "    l2_limit_for_tiling_kib: 1024\n"                  # fine on tensorrt
        "  - backend: tensorrt-rtx\n"
        "    compute_capabilities: [sm100]\n"
        "    l2_limit_for_tiling_kib: 1024\n"                  # tensorrt-only setting
        "  - backend: tensorrt-rtx\n"
        "    compute_capabilities: [sm_86]\n"                  # typo
        "  - backend: tensorrt-rtx\n"
        "    compute_capabilities: [current, sm86]\n"
    ))
    expected = {
        "engines[0].compute_capabilities[1]": (
            "sm90", "sm90 (Hopper, H100/H200) is not a TensorRT-RTX target; TensorRT-RTX builds for sm75, "
            "sm80, sm86, sm89, sm120, sm121 (or current); for this GPU use backend: tensorrt"),
        "engines[0].hardware_compatibility": (
            "ampere+", "hardware_compatibility is a tensorrt setting, not available for backend tensorrt-rtx: "
            "TensorRT-RTX engines run on the compute capabilities they are built for (compute_capabilities; "
            "default: one portable engine for sm80, sm86, sm89, sm120 and later)"),
        "engines[0].tiling_optimization_level": (
            "fast", "tiling_optimization_level is a tensorrt setting, not available for backend tensorrt-rtx: "
            "TensorRT-RTX's ahead-of-time build does not use tiling settings"),
        "engines[0].strongly_typed": (
            "false", "strongly_typed: false is not available for backend tensorrt-rtx: TensorRT-RTX networks "
            "are always strongly typed (the graph's dtypes are the engine's)"),
        "engines[1].compute_capabilities": (
            "[sm89]", "compute_capabilities is a tensorrt-rtx setting, not available for backend tensorrt: the "
            "tensorrt backend builds for the GPU of the build machine; use hardware_compatibility: ampere+ for "
            "an engine that also runs on other Ampere or later GPUs"),
        "engines[2].compute_capabilities[0]": ("sm100", "sm100 (Blackwell datacenter, B200/GB200) is not a "
                                               "TensorRT-RTX target"),
        "engines[2].l2_limit_for_tiling_kib": ("1024", "l2_limit_for_tiling_kib is a tensorrt setting"),
        "engines[3].compute_capabilities[0]": ("sm_86", "unknown compute capability 'sm_86'; TensorRT-RTX builds "
                                               "for sm75, sm80, sm86, sm89, sm120, sm121 (or current); did you "
                                               "mean 'sm86'?"),
        "engines[4].compute_capabilities[0]": ("current", "compute capability 'current' (the build machine's "
                                               "GPU) cannot be combined with others"),
    }
    assert set(problems) == set(expected)
    lines = file.read_text().splitlines()
    for path, (value, message) in expected.items():
        p = problems[path]
        assert p.message.startswith(message), (path, p.message)
        assert p.file == str(file)
        assert lines[p.line - 1][p.column - 1:].startswith(value), (path, p.line, p.column)


def test_engine_entry_key_typos_and_values(tmp_path):
    file, problems = problems_of(tmp_path, (
        "engines:\n"
        "  - backend: tensorrt\n"
        "    compute_capabilties: [sm89]\n"
        "    hardware_compatibility: ampere\n"
        "    optimization_level: 7\n"
        "    workspace_limit_mib: 0\n"
    ))
    assert problems["engines[0].compute_capabilties"].message.startswith(
        "unknown key 'compute_capabilties' under 'engines[0]'; did you mean 'compute_capabilities'? (valid keys: "
        "backend, compute_capabilities, hardware_compatibility,")
    assert (problems["engines[0].compute_capabilties"].line,
            problems["engines[0].compute_capabilties"].column) == line_col(file, "compute_capabilties")
    assert problems["engines[0].hardware_compatibility"].message == (
        "expected one of none, ampere+, same-compute-capability; found 'ampere' (string); did you mean 'ampere+'?")
    assert problems["engines[0].optimization_level"].message == "expected a number <= 5, found 7 (integer)"
    assert problems["engines[0].workspace_limit_mib"].message == "expected a positive integer, found 0 (integer)"


def test_duplicate_targets_with_different_settings(tmp_path):
    engines = "engines:\n  - tensorrt-rtx\n  - {backend: tensorrt-rtx, weight_streaming: true}\n"
    _, problems = problems_of(tmp_path, engines)
    assert problems["engines[1]"].message == (
        "engine 'tensorrt-rtx (portable)' is listed twice with different settings (first at engines[0]); an "
        "artifact holds one engine per backend and target")


def test_weight_streaming_rules(tmp_path):
    _, problems = problems_of(tmp_path, (
        "limits: {max_batch_size: 8, max_input_len: 256, max_num_tokens: 128}\n"
        "engines:\n"
        "  - tensorrt-rtx\n"
        "  - backend: tensorrt\n"
        "    strongly_typed: false\n"
        "    weight_streaming: true\n"
        "  - backend: tensorrt\n"
        "    weight_streaming_budget_mib: 512\n"
    ))
    assert problems["limits.max_num_tokens"].message == (
        "max_num_tokens 128 is smaller than max_input_len 256; expected at least 256 (a whole prompt must fit "
        "one forward pass)")
    assert problems["engines[1].weight_streaming"].message == (
        "weight_streaming needs a strongly typed network; remove strongly_typed: false")
    assert problems["engines[2].weight_streaming_budget_mib"].message == (
        "weight_streaming_budget_mib is set but weight_streaming is false; expected weight_streaming: true")


def test_valid_entries_and_their_labels(tmp_path):
    (tmp_path / "m.gguf").write_text("")
    file = tmp_path / "r.yaml"
    file.write_text(HEADER + (
        "limits: {max_batch_size: 8, max_input_len: 256, max_num_tokens: 512}\n"
        "engines:\n"
        "  - tensorrt-rtx\n"
        "  - {backend: tensorrt-rtx, compute_capabilities: [SM75, '8.6'], weight_streaming: true}\n"
        "  - {backend: tensorrt, hardware_compatibility: ampere+, tiling_optimization_level: moderate}\n"
        "  - {backend: tensorrt, strongly_typed: false, optimization_level: 5}\n"
    ))
    recipe = load_recipe(file, check_model=False)
    assert [e.label for e in recipe.engines] == ["portable", "sm75-sm86", "ampere-plus", "native"]
    assert recipe.engines[1].compute_capabilities == ["sm75", "sm86"]
    assert recipe.limits.max_num_tokens == 512
    d = recipe.to_dict()["engines"][0]
    assert d == {"backend": "tensorrt-rtx", "compute_capabilities": None, "hardware_compatibility": None,
                 "optimization_level": None, "workspace_limit_mib": None, "tiling_optimization_level": None,
                 "l2_limit_for_tiling_kib": None, "strongly_typed": True, "weight_streaming": False,
                 "weight_streaming_budget_mib": None}
    # the shorthand is also accepted from the command line
    assert [e.backend for e in load_recipe(file, ["engines=[tensorrt]"], check_model=False).engines] == ["tensorrt"]


# -- build_engine (no recipe): the same checks, before TensorRT is imported --------------------


@pytest.mark.parametrize("backend, options, message", [
    ("tensorrt-rtx", {"compute_capabilities": ["sm90"]}, "sm90 (Hopper, H100/H200) is not a TensorRT-RTX target"),
    ("tensorrt-rtx", {"hardware_compatibility": "ampere+"}, "hardware_compatibility is a tensorrt setting"),
    ("tensorrt-rtx", {"strongly_typed": False}, "always strongly typed"),
    ("tensorrt", {"compute_capabilities": ["sm89"]}, "compute_capabilities is a tensorrt-rtx setting"),
    ("tensorrt", {"hardware_compatibility": "ampere"}, "hardware_compatibility 'ampere': choose one of none, "
                                                       "ampere+, same-compute-capability"),
    ("tensorrt", {"weight_streaming_budget_mib": 64}, "weight_streaming_budget_mib is set but weight_streaming "
                                                      "is false"),
    ("tensorrt", {"weight_streaming": True, "strongly_typed": False}, "weight_streaming needs a strongly typed"),
    ("tensorrt", {"tiling": "fast"}, "unknown engine option 'tiling'"),
])
def test_build_engine_rejects_unsupported_settings_before_any_work(tmp_path, monkeypatch, backend, options, message):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # the tensorrt package is not needed to say no
    with pytest.raises(UserError) as e:
        build_engine(tmp_path / "missing.onnx", tmp_path / "e.engine", backend=backend, precision="float16",
                     limits={"max_batch_size": 1, "max_input_len": 8, "max_seq_len": 16}, num_layers=1,
                     options=options)
    assert message in str(e.value) and f"engine backend {backend}" in str(e.value)
    assert not (tmp_path / "e.engine").exists()


def test_current_compute_capability_needs_a_gpu(tmp_path):
    if shutil.which("nvidia-smi") is not None:  # pragma: no cover - GPU machines
        pytest.skip("this machine has a GPU: 'current' is valid here")
    with pytest.raises(UserError) as e:
        build_engine(tmp_path / "missing.onnx", tmp_path / "e.engine", backend="tensorrt-rtx", precision="float16",
                     limits={"max_batch_size": 1, "max_input_len": 8, "max_seq_len": 16}, num_layers=1,
                     targets=["current"])
    assert "'current' means the GPU of the build machine, and this machine has none" in str(e.value)
    assert "compute_capabilities: [sm86, sm89]" in str(e.value)


def test_missing_tensorrt_package_is_named_when_the_settings_are_fine(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    needs = r"needs the Python module 'tensorrt'.*pip install tensorrt \(TensorRT >= 10.15"
    with pytest.raises(UserError, match=needs):
        build_engine(tmp_path / "missing.onnx", tmp_path / "e.engine", backend="tensorrt", precision="float16",
                     limits={"max_batch_size": 1, "max_input_len": 8, "max_seq_len": 16}, num_layers=1,
                     options={"hardware_compatibility": "ampere+", "tiling_optimization_level": "full"})


def test_option_problems_and_labels_are_pure():
    assert option_problems("tensorrt-rtx", {"compute_capabilities": ["sm75", "sm120"], "weight_streaming": True}) == []
    assert option_problems("tensorrt", {"hardware_compatibility": "same-compute-capability"}) == []
    assert option_problems("tensorrt-rtx", {"compute_capabilities": ["sm86", "SM86"]}) == [
        "compute capability sm86 is listed twice"]
    assert target_label("tensorrt-rtx", {}) == "portable"
    assert target_label("tensorrt-rtx", {"compute_capabilities": ["8.9", "SM120"]}) == "sm89-sm120"
    assert target_label("tensorrt", {"hardware_compatibility": "same-compute-capability"}) == "same-cc"


def test_bfloat16_has_no_turing_engine(tmp_path):
    file, problems = problems_of(tmp_path, (
        "precision: bfloat16\n"
        "engines:\n"
        "  - {backend: tensorrt-rtx, compute_capabilities: [sm86, sm75]}\n"
    ))
    [(path, problem)] = problems.items()
    assert path == "engines[0].compute_capabilities[1]"
    assert problem.message == (
        "sm75 (Turing) has no bfloat16 kernels in TensorRT-RTX; build sm75 engines at precision float16")
    assert (problem.line, problem.column) == line_col(file, "sm75")


@pytest.mark.parametrize("precision, engines, message", [
    ("float32", "[tensorrt-rtx]", "engines need precision float16 or bfloat16, found float32"),
    ("float16", "[tensorrt]", "pip install tensorrt (TensorRT >= 10.15"),
])
def test_compile_stops_before_reading_the_model(tmp_path, monkeypatch, precision, engines, message):
    """A config-only model dir: had the source stage run, it would fail on missing weights."""
    from llmbuild.compile import compile_recipe

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, '
        '"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128, "max_position_embeddings": 256}')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: m}}\nprecision: {precision}\nengines: {engines}\n"
                      "limits: {max_batch_size: 1, max_input_len: 8, max_seq_len: 16}\n")
    with pytest.raises(UserError) as e:
        compile_recipe(recipe, out_dir=tmp_path / "out", quiet=True, verify=False)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
