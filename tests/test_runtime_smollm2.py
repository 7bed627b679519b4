"""The runtime on the real SmolLM2-135M-Instruct: continuous batching of staggered
requests equals each request alone; the CPU lowering equals the standard graph."""

from __future__ import annotations

import numpy as np
import pytest

from llmbuild.runtime import load
from llmbuild.runtime.executors.base import StepInputs
from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor
from llmbuild.runtime.sampling import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence what a compiler does.",
    "Hi!",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_artifact):
    model = load(smollm2_artifact, backend="onnxruntime", max_batch_size=3, max_num_tokens=16)
    yield model
    model.close()


def test_staggered_requests_equal_each_alone(smollm2):
    """Five chat prompts (24..40 tokens, prefilled in chunks of 16) on 3 slots, submitted
    while others decode: greedy and seeded outputs equal each request run alone."""
    ids = [smollm2.encode(p, chat=True) for p in PROMPTS]
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=5), SamplingParams(),
              SamplingParams(temperature=0.7, top_k=20, seed=9), SamplingParams()]
    alone = [smollm2.submit(i, max_new_tokens=20, params=p).result().token_ids for i, p in zip(ids, params)]
    handles = []
    for i, p in zip(ids, params):
        handles.append(smollm2.submit(i, max_new_tokens=20, params=p))
        next(iter(smollm2.submit([1, 2, 3], max_new_tokens=2, stream=True)), None)  # let a step or two pass
    together = [h.result().token_ids for h in handles]
    assert together == alone
    assert smollm2.tokenizer.decode(alone[0]) == "The capital of France is Paris."


def test_cpu_lowering_equals_the_standard_graph(smollm2_fp32_artifact):
    path = smollm2_fp32_artifact / "model" / "model.onnx"
    ids = np.array([[1, 9690, 314, 260, 3575, 282, 4649, 47, 2, 198, 4093, 1114]])
    n = ids.shape[1]
    out = []
    for lowering in (True, False):
        ex = OnnxRuntimeExecutor(path, num_layers=30, cache_len=64, cpu_lowering=lowering)
        prefill = ex.forward(StepInputs(ids, np.arange(n)[None], np.zeros(1, np.int64), np.arange(n)[None]))[0]
        step = ex.forward(StepInputs(np.array([[28]]), np.array([[n]]), np.array([n]), np.zeros((1, 1), np.int64)))[0]
        out.append(np.concatenate([prefill, step]))
        ex.close()
    assert np.abs(out[0] - out[1]).max() < 2e-3
    assert (out[0].argmax(-1) == out[1].argmax(-1)).all()


def test_int8_recipe_with_its_int8_lm_head_answers_on_the_cpu(tmp_path):
    """The shipped int8 recipe (linears and the tied lm_head int8 per channel): the CPU
    lowering runs every linear, the lm_head included, as an 8-bit MatMulNBits with int8
    activations (blocks of 64 inputs), and the model still answers."""
    import onnx

    from llmbuild.compile import compile_recipe
    from llmbuild.lowering.cpu import lowered_model_bytes
    from tests.conftest import ROOT

    art = compile_recipe(ROOT / "recipes" / "smollm2-135m-instruct-int8.yaml", ["~engines", "verify.enabled=false"],
                         tmp_path, quiet=True, verify=False)
    lowered = onnx.load_from_string(lowered_model_bytes(art / "model" / "model.onnx"))
    ops = [n.op_type for n in lowered.graph.node]
    assert "Gemm" not in ops and "DequantizeLinear" not in ops
    head = [n for n in lowered.graph.node if n.op_type == "MatMulNBits"
            and {a.name: a.i for a in n.attribute}.get("N") == 49152]
    assert len(head) == 1 and {a.name: a.i for a in head[0].attribute}["bits"] == 8
    model = load(art, backend="onnxruntime")
    try:
        answer = model.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=12)
    finally:
        model.close()
    assert "Paris" in answer.text, answer.text
