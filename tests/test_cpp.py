"""The C++ runtime (cpp/): built once per session by cpp/build.sh into cpp/build, its
ctest suite run against tiny artifacts compiled here, and its CLI `llmbuild-generate`
compared with the Python runtime on the same artifacts: greedy and seeded sampled token
ids must be identical, and user errors must be clear (exit status 2).

Both runtimes run, by default, the artifact's CPU-ready graph (graph.cpu.file: lowered
for ONNX Runtime's CPU kernels at compile time, llmbuild/lowering/cpu_graph.py). Ids are
compared graph for graph: C++ --standard-graph (graph.file) against Python with
cpu_lowering=False, C++'s default against Python's default (both the CPU-ready graph),
and C++ given a graph lowered afterwards (--graph) against Python's default.

A failing configure or build fails these tests (it is never a skip); the build is the
session fixture `cpp_build` in tests/conftest.py (shared with tests/test_conformance.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from llmbuild.runtime import load
from llmbuild.lowering.cpu import save_lowered_graph
from llmbuild.runtime.sampling import SamplingParams
from tests.conftest import BUILD, CLI
from tests.tiny import EOS, compile_tiny, make_tiny_hf


TINY_PROMPTS = [[5, 40, 41, 42], [3, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110]]
SAMPLING = [
    SamplingParams(temperature=1.0, seed=123),
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7),
    SamplingParams(temperature=1.3, top_p=0.5, seed=2**63 + 5),
    SamplingParams(temperature=0.6, top_k=3, seed=0),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama artifacts: float32 (ONNX Runtime) and, where tensorrt_rtx is installed,
    float16 with a TensorRT-RTX engine (its ONNX graph runs with a float16 cache)."""
    out = tmp_path_factory.mktemp("cpp_tiny")
    hf = make_tiny_hf(out / "hf", tie=True)
    artifacts = {"float32": compile_tiny(hf, out / "fp32")}
    engines = ("tensorrt-rtx",) if importlib.util.find_spec("tensorrt_rtx") else ()
    limits = {"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 96}
    artifacts["float16"] = compile_tiny(hf, out / "fp16", precision="float16", engines=engines, limits=limits)
    return artifacts


def generate_cpp(artifact: Path, prompt: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 *extra: str) -> dict:
    cmd = [
        str(CLI), str(artifact), "--prompt-ids", *map(str, prompt), "--max-new-tokens", str(max_new_tokens),
        "--temperature", repr(params.temperature), "--top-k", str(params.top_k), "--top-p", repr(params.top_p),
        "--seed", str(params.seed), "--threads", "2", "--json", *extra,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def python_model(artifact: Path, *, lowered: bool):
    """The Python runtime on ONNX Runtime, on the lowered graph (its default: the artifact's
    CPU-ready graph) or graph.file."""
    model = load(artifact, backend="onnxruntime", threads=2, cpu_lowering=None if lowered else False)
    assert model.executor.lowered == lowered
    assert model.executor.graph_source == ("cpu_graph" if lowered else "standard")
    return model


def assert_same_ids(model, artifact: Path, prompts, max_new_tokens: int, params: SamplingParams,
                    *extra: str) -> list[dict]:
    """Python's and C++'s generations for each prompt have the same ids; C++'s results.
    C++ runs the graph Python runs (--standard-graph when Python runs graph.file) unless
    `extra` names one (--graph)."""
    if model.executor.graph_source == "standard" and "--graph" not in extra:
        extra = ("--standard-graph", *extra)
    results = []
    for prompt in prompts:
        (expected,) = model.generate_ids([prompt], max_new_tokens=max_new_tokens, params=params)
        got = generate_cpp(artifact, prompt, max_new_tokens, params, *extra)
        assert got["token_ids"] == expected.token_ids, (prompt, params)
        assert got["finish_reason"] == expected.finish_reason
        assert got["backend"] == "onnxruntime"
        results.append(got)
    return results


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True)


def test_configure_reports_the_executors(cpp_build):
    assert "llmbuild executor onnxruntime: built" in cpp_build
    assert "llmbuild executor tensorrt: " in cpp_build  # built or "not built: <why>"


def test_ctest_suite(cpp_build, tiny):
    env = dict(os.environ, LLMBUILD_TEST_ARTIFACT=str(tiny["float32"]))
    engine_built = bool(json.loads((tiny["float16"] / "manifest.json").read_text())["engines"])
    if engine_built:
        env["LLMBUILD_TEST_ENGINE_ARTIFACT"] = str(tiny["float16"])
    result = subprocess.run(["ctest", "--test-dir", str(BUILD), "--output-on-failure"], capture_output=True,
                            text=True, env=env)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "100% tests passed" in result.stdout
    skipped = result.stdout.count("***Skipped")
    assert skipped == (0 if engine_built else 1), result.stdout


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_greedy_ids_equal_python(cpp_build, tiny, precision):
    model = python_model(tiny[precision], lowered=False)
    assert_same_ids(model, tiny[precision], TINY_PROMPTS, 40, SamplingParams())
    model.close()


@pytest.mark.parametrize("params", SAMPLING, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_seeded_sampled_ids_equal_python(cpp_build, tiny, params):
    model = python_model(tiny["float32"], lowered=False)
    assert_same_ids(model, tiny["float32"], TINY_PROMPTS, 30, params)
    model.close()


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_cpu_graph_ids_equal_python_default(cpp_build, tiny, precision):
    """Both runtimes as loaded by default run the artifact's CPU-ready graph (float32 cache,
    GroupQueryAttention), written at compile: the same ids, greedy and sampled."""
    manifest = json.loads((tiny[precision] / "manifest.json").read_text())
    assert manifest["graph"]["cpu"]["file"] == "model/model.cpu.onnx"
    model = python_model(tiny[precision], lowered=True)
    for params in (SamplingParams(), SAMPLING[1]):
        for got in assert_same_ids(model, tiny[precision], TINY_PROMPTS, 30, params):
            assert got["graph"] == "model/model.cpu.onnx"
    model.close()


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_graph_lowered_later_ids_equal_the_cpu_graph(cpp_build, tiny, precision, tmp_path):
    """C++ on a graph lowered after the build (save_lowered_graph, --graph) = Python on the
    CPU-ready graph written at compile."""
    graph = save_lowered_graph(tiny[precision], tmp_path / "lowered")
    model = python_model(tiny[precision], lowered=True)
    for got in assert_same_ids(model, tiny[precision], TINY_PROMPTS, 30, SamplingParams(), "--graph", str(graph)):
        assert got["graph"] == str(graph)
    model.close()


def test_eos_stops_both_runtimes_at_the_same_token(cpp_build, tiny, tmp_path):
    """An artifact whose EOS is the 6th greedy token: both stop before it."""
    source = tiny["float32"]
    (greedy,) = python_model(source, lowered=False).generate_ids([TINY_PROMPTS[0]], max_new_tokens=20)
    eos = greedy.token_ids[5]
    cut = greedy.token_ids.index(eos)
    variant = tmp_path / "eos-variant"
    variant.mkdir()
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["tokenizer"]["eos_token_ids"] = [EOS, eos]
    (variant / "manifest.json").write_text(json.dumps(manifest))
    for sub in ("model", "tokenizer"):  # copies: the runtime refuses links out of an artifact
        shutil.copytree(source / sub, variant / sub)
    (expected,) = python_model(variant, lowered=False).generate_ids([TINY_PROMPTS[0]], max_new_tokens=20)
    got = generate_cpp(variant, TINY_PROMPTS[0], 20, SamplingParams(), "--standard-graph")
    assert expected.token_ids == greedy.token_ids[:cut] and expected.finish_reason == "eos"
    assert got["token_ids"] == expected.token_ids and got["finish_reason"] == "eos"


def test_stream_prints_the_same_ids(cpp_build, tiny):
    prompt = [str(t) for t in TINY_PROMPTS[1]]
    plain = run_cli(tiny["float32"], "--prompt-ids", ",".join(prompt), "--max-new-tokens", 16)
    streamed = run_cli(tiny["float32"], "--prompt-ids", *prompt, "--max-new-tokens", 16, "--stream")
    assert plain.returncode == streamed.returncode == 0
    assert plain.stdout == streamed.stdout
    assert 1 <= len(plain.stdout.split()) <= 16


def test_smollm2_ids_equal_python(cpp_build, smollm2_artifact, tmp_path):
    model = python_model(smollm2_artifact, lowered=False)
    prompt = model.encode("What is the capital of France?", chat=True)
    (got,) = assert_same_ids(model, smollm2_artifact, [prompt], 16, SamplingParams())
    assert model.tokenizer.decode(got["token_ids"]) == "The capital of France is Paris."
    assert got["finish_reason"] == "eos"
    assert_same_ids(model, smollm2_artifact, [prompt], 8, SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=11))
    model.close()

    model = python_model(smollm2_artifact, lowered=True)  # both on the CPU-ready graph
    (got,) = assert_same_ids(model, smollm2_artifact, [prompt], 16, SamplingParams())
    assert got["graph"] == "model/model.cpu.onnx"
    assert model.tokenizer.decode(got["token_ids"]) == "The capital of France is Paris."
    model.close()


# -- clear errors (exit status 2, a message saying what and where) ------------------------------


def test_missing_artifact(cpp_build, tmp_path):
    result = run_cli(tmp_path / "nowhere", "--prompt-ids", 1, 2)
    assert result.returncode == 2
    assert f"artifact {tmp_path / 'nowhere'} does not exist" in result.stderr
    result = run_cli(tmp_path, "--prompt-ids", 1, 2)
    assert result.returncode == 2
    assert "is not a complete llmbuild artifact (no manifest.json)" in result.stderr


def test_incompatible_schema_version(cpp_build, tiny, tmp_path):
    manifest = json.loads((tiny["float32"] / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(tmp_path, "--prompt-ids", 1, 2)
    assert result.returncode == 2
    assert "manifest schema version 99 is not supported by this llmbuild runtime (expected 1)" in result.stderr


def test_requests_beyond_the_limits(cpp_build, tiny):
    artifact = tiny["float32"]  # max_input_len 64, max_seq_len 128
    too_long = run_cli(artifact, "--prompt-ids", *([7] * 65), "--max-new-tokens", 1)
    assert too_long.returncode == 2
    assert "prompt has 65 tokens; this artifact accepts at most max_input_len=64" in too_long.stderr
    too_many = run_cli(artifact, "--prompt-ids", *([7] * 64), "--max-new-tokens", 65)
    assert too_many.returncode == 2
    assert "prompt (64 tokens) + max_new_tokens (65) exceeds max_seq_len=128" in too_many.stderr
    usage = run_cli(artifact, "--max-new-tokens", 3)
    assert usage.returncode == 2 and "missing --prompt-ids" in usage.stderr
