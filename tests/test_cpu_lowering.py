"""The CPU lowering (llmbuild/lowering/: cpu.py with quantized.py)
on tiny random Llamas, quantized (int4 in groups of 64 over 96 and 160 input rows, i.e.
a short last block; int8 per channel) and float, float32 and float16: the lowered graph
gives the standard graph's logits on ONNX Runtime (ragged prefills in two slots, batched
decode, a chunk at an offset), has the nodes the rewrites promise, and decoding with its
cache equals recomputing the whole sequence."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pytest

from llmbuild.runtime import load
from llmbuild.lowering.cpu import save_lowered_graph
from llmbuild.runtime.executors.base import StepInputs
from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor
from tests.test_quant_graph import write_recipe
from tests.tiny import make_tiny_hf

HIDDEN, INTER, LAYERS = 96, 160, 2
CASES = {  # name: (model, quantization, precision)
    "int4-g64": ("untied", {"scheme": "int4", "group_size": 64}, "float32"),
    "int4-g64-fp16": ("untied", {"scheme": "int4", "group_size": 64}, "float16"),
    "int8": ("untied", {"scheme": "int8"}, "float32"),
    "float-tied": ("tied", None, "float32"),
    "float-tied-fp16": ("tied", None, "float16"),
}
CACHE_LEN = 128
A = [5, 40, 77, 12, 90, 33, 61, 7, 88, 21, 54, 66, 13, 99, 101, 7, 3, 250]
B = [17, 18, 200, 4, 9, 120, 64, 65, 66, 31, 32]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    from llmbuild.compile import compile_recipe

    root = tmp_path_factory.mktemp("cpu_lowering")
    models = {
        "untied": make_tiny_hf(root / "untied", hidden=HIDDEN, num_heads=6, num_kv_heads=2, layers=LAYERS,
                               intermediate=INTER, tie=False, seed=0),
        "tied": make_tiny_hf(root / "tied", hidden=64, num_heads=4, num_kv_heads=2, layers=LAYERS,
                             intermediate=128, tie=True, seed=1),
    }
    return {name: compile_recipe(write_recipe(root, name, models[m], q, precision=p, verify={"enabled": False}),
                                 out_dir=root / "out", quiet=True)
            for name, (m, q, p) in CASES.items()}


def executor(graph: Path) -> OnnxRuntimeExecutor:
    """The graph file as it is (already lowered, or the standard graph). ONNX Runtime's own
    DequantizeLinear → MatMul fusion is kept in float32 (as the accuracy figures do), so
    the standard graph computes what it says."""
    from llmbuild.eval.runners import float_matmuls
    from llmbuild.runtime.executors import onnxruntime as executors

    def options(*args, **kwargs):
        opts = session_options(*args, **kwargs)
        float_matmuls(opts)
        return opts

    session_options = executors.session_options
    with mock.patch.object(executors, "session_options", options):
        return OnnxRuntimeExecutor(graph, num_layers=LAYERS, cache_len=CACHE_LEN, batch_size=2, threads=2,
                                   cpu_lowering=False)


def logits_trace(ex: OnnxRuntimeExecutor, stride: int = 1) -> list[np.ndarray]:
    """Ragged prefills in slots 0 and 1, three decode steps of both, a 3-token chunk in slot 1
    at an offset. Token i of a sequence is at position stride·i (the runtime's is 1)."""
    out = []
    for slot, ids in enumerate((A[:12], B[:7])):
        n = len(ids)
        out.append(ex.forward(StepInputs(np.array([ids]), stride * np.arange(n)[None], np.zeros(1, np.int64),
                                         np.arange(n)[None]), slot))
    for k in range(3):
        pos = np.array([12 + k, 7 + k])
        out.append(ex.forward(StepInputs(np.array([[A[12 + k]], [B[7 + k]]]), stride * pos[:, None], pos,
                                         np.zeros((2, 1), np.int64))))
    out.append(ex.forward(StepInputs(np.array([B[7:10]]), stride * np.arange(7, 10)[None], np.array([7]),
                                     np.arange(3)[None]), 1))
    return out


def lowered_graph(artifact: Path, dst: Path, **levels) -> onnx.ModelProto:
    path = save_lowered_graph(artifact, dst, **levels)
    return onnx.load(str(path), load_external_data=False)


@pytest.mark.parametrize("case", list(CASES))
def test_lowered_graph_gives_the_standard_graphs_logits(case, artifacts, tmp_path):
    """MatMulNBits at accuracy level 1 (float32 activations) is the standard graph's
    product up to summation order; level 4 quantizes activations to int8 per block.
    float16 graphs compute in float16 on the standard graph, float32 once lowered."""
    art = artifacts[case]
    standard = logits_trace(executor(art / "model" / "model.onnx"))
    fp16 = CASES[case][2] == "float16"
    levels = ((1, 0.05 if fp16 else 1e-4), (4, 0.05)) if CASES[case][1] else ((4, 0.05 if fp16 else 1e-4),)
    for level, atol in levels:
        lowered_graph(art, tmp_path / f"l{level}", int4_accuracy_level=level, int8_accuracy_level=level)
        ours = logits_trace(executor(tmp_path / f"l{level}" / "model.onnx"))
        for got, want in zip(ours, standard):
            np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def attr(node: onnx.NodeProto, name: str):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.mark.parametrize("case", ["int4-g64", "int4-g64-fp16", "int8"])
def test_quantized_linears_become_matmulnbits_without_pads(case, artifacts, tmp_path):
    """int4 codes padded to whole blocks: the MatMulNBits reads the unpadded activation
    (K = 96 or 160 in blocks of 64) and no Pad is left; int8 per channel: blocks of 32 (the
    largest power of two dividing 96 and 160)."""
    standard = onnx.load(str(artifacts[case] / "model" / "model.onnx"), load_external_data=False)
    model = lowered_graph(artifacts[case], tmp_path)
    count = ops(model)
    assert "Pad" not in count and "DequantizeLinear" not in count
    if case.startswith("int4"):
        # q/k/v, o_proj, gate/up and lm_head inputs (96 wide), down_proj's (160): padded to 128 and 192
        assert ops(standard)["Pad"] == 4 * LAYERS + 1
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {attr(n, "K") for n in nbits} == {HIDDEN, INTER}
    assert {attr(n, "block_size") for n in nbits} == {64 if case.startswith("int4") else 32}
    assert {attr(n, "bits") for n in nbits} == {4 if case.startswith("int4") else 8}


@pytest.mark.parametrize("case", list(CASES))
def test_lowered_graph_nodes(case, artifacts, tmp_path):
    """Per layer: one projection for q/k/v feeding GroupQueryAttention packed (rotary inside
    it, no RotaryEmbedding or Split left), one for gate/up (+ Split), o_proj, down_proj;
    each residual Add fused with the norm after it (all but the first layer's input norm
    and the final norm, which reads the gathered rows)."""
    model = lowered_graph(artifacts[case], tmp_path)
    count = ops(model)
    linear = "MatMulNBits" if CASES[case][1] else "MatMul"
    head = 1 if CASES[case][0] == "untied" else 0  # a tied lm_head is a Gemm over the embedding
    assert count[linear] == 4 * LAYERS + head
    assert count["Split"] == LAYERS and "RotaryEmbedding" not in count and "Attention" not in count
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == LAYERS
    for n in gqa:
        assert attr(n, "do_rotary") == 1 and list(n.input[1:3]) == ["", ""]  # packed q/k/v
        assert list(n.input[7:10]) == ["rope.cos.float32" if CASES[case][2] == "float16" else "rope.cos",
                                       "rope.sin.float32" if CASES[case][2] == "float16" else "rope.sin",
                                       "position_ids"]
    assert count["SkipSimplifiedLayerNormalization"] == 2 * LAYERS - 1 and count["RMSNormalization"] == 2
    skip = [n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert all(list(n.output[1:3]) == ["", ""] and n.output[3] for n in skip)  # the residual stream out


@pytest.mark.parametrize("qkv", ["packed", "apart"])
def test_rotary_inside_attention_reads_position_ids_as_given(qkv, artifacts, tmp_path):
    """GroupQueryAttention's rotary embedding uses the graph's position_ids, not positions it
    would derive from the cache lengths: positions 2·i give the standard graph's logits;
    with q/k/v packed in one input and apart (when they are not one fused projection)."""
    from llmbuild.lowering import cpu as cpu_lowering

    art = artifacts["float-tied"]
    with mock.patch.object(cpu_lowering, "_packed_qkv", return_value=None) if qkv == "apart" else nullcontext():
        model = lowered_graph(art, tmp_path)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(bool(n.input[1]) == (qkv == "apart") for n in gqa) and len(gqa) == LAYERS
    standard = logits_trace(executor(art / "model" / "model.onnx"), stride=2)
    ours = logits_trace(executor(tmp_path / "model.onnx"), stride=2)
    assert not np.allclose(standard[0], logits_trace(executor(tmp_path / "model.onnx"))[0], atol=1e-3)
    for got, want in zip(ours, standard):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["int4-g64", "int8", "float-tied-fp16"])
def test_decode_with_cache_equals_full_recompute(case, artifacts):
    """llmbuild.load (lowered by default): greedy tokens decoded with the cache are the argmax
    of one pass over the whole sequence, and the logits are the same."""
    model = load(artifacts[case], backend="onnxruntime", threads=2)
    try:
        ex = model.executor
        assert ex.lowered
        prompt = A[:6]
        generated = model.submit(prompt, max_new_tokens=10, ignore_eos=True).result().token_ids
        assert len(generated) == 10
        seq = prompt + list(generated)
        n = len(seq) - 1
        step = []  # the engine is idle: its executor's slot 0 is ours
        logits = ex.forward(StepInputs(np.array([prompt]), np.arange(6)[None], np.zeros(1, np.int64),
                                       np.array([[5]])), 0)
        step.append(logits[0, 0])
        for i in range(6, n):
            logits = ex.forward(StepInputs(np.array([[seq[i]]]), np.array([[i]]), np.array([i]),
                                           np.zeros((1, 1), np.int64)), 0)
            step.append(logits[0, 0])
        whole = ex.forward(StepInputs(np.array([seq[:n]]), np.arange(n)[None], np.zeros(1, np.int64),
                                      np.arange(5, n)[None]), 0)[0]
        assert [int(x.argmax()) for x in step] == list(generated) == [int(x.argmax()) for x in whole]
        # int8 activations (accuracy level 4) may round a value apart once prefill and decode
        # attention differ in the last bit
        np.testing.assert_allclose(np.stack(step), whole, atol=1e-2 if CASES[case][1] else 1e-4, rtol=0)
    finally:
        model.close()
