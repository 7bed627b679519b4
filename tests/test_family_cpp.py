"""The C++ runtime (cpp/, harness of tests/test_cpp.py) on the new families: greedy ids
past the sliding window (prompt + 64 new tokens) equal Python's, which equal HF's
(tests/family.py), on the artifact's graph (window mask, soft-capped Attention) and on the
CPU-lowered graph (GroupQueryAttention with local_window_size / softcap)."""

from __future__ import annotations

import pytest

from llmbuild.lowering.cpu import save_lowered_graph
from llmbuild.runtime.sampling import SamplingParams
from tests import family
from tests.test_cpp import generate_cpp

FAMILIES = ["MistralForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    return family.build_family(tmp_path_factory, request.param, precisions=("float32",))[0]


@pytest.mark.parametrize("lowered", [False, True], ids=["standard", "lowered"])
def test_cpp_greedy_past_the_window_equals_python_and_hf(cpp_build, tiny, lowered, tmp_path):
    want = family.hf_greedy(tiny.ref, family.PROMPT, family.NEW_TOKENS)
    model = family.open_model(tiny, "float32", lowered=lowered)
    try:  # both runtimes stop at EOS (the C++ CLI has no ignore-EOS switch)
        python = model.submit(family.PROMPT, max_new_tokens=family.NEW_TOKENS).result().token_ids
    finally:
        model.close()
    assert list(python) == want[: len(python)]
    assert len(family.PROMPT) + len(python) > 2 * tiny.window()  # well past the window
    extra = ["--graph", str(save_lowered_graph(tiny.artifacts["float32"], tmp_path / "lowered"))] if lowered else []
    got = generate_cpp(tiny.artifacts["float32"], family.PROMPT, family.NEW_TOKENS, SamplingParams(), *extra)
    assert got["token_ids"] == list(python), got
