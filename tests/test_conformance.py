"""Architecture conformance: every architecture registered in `llmbuild.models.ARCHITECTURES`
(HF class -> spec) passes the same checks on a tiny random HF model (fixed seed, 2-3 layers;
its config is the architecture's line in `tests/conformance.py` TINY_CONFIGS — an
architecture without one fails here). Registering an architecture enrolls it.

- fp32 logits = HF transformers within 1e-4, fp16 within 2e-2 (prefills of 1, 5, 37 tokens);
- decode with the KV cache = one pass over the whole sequence (token by token and a chunk);
- a batch of prompts of different lengths = each prompt alone, and the greedy tokens are HF's;
- the CPU lowering applies: every layer the spec does not list in `cpu_attention_fallbacks`
  becomes one GroupQueryAttention, no WARNING is logged, and its logits equal the standard
  graph's;
- simulated tp = 2 (llmbuild.parallel.simulate) = tp = 1;
- int8 and int4 (round to nearest, groups of 32) artifacts pass their accuracy gate
  (`tests/conformance.py` GATES) with every linear quantized, and every routed expert
  (MoE classes) quantized with its own scales;
- the fp16 graph builds into a TensorRT-RTX engine whose I/O contract and profiles are the
  manifest's (running it needs a GPU);
- the C++ runtime's greedy ids equal Python's (graph as written and CPU-lowered).

Each artifact is compiled once per architecture, on first use (`TinyArchitecture`).
Seconds per architecture: benchmarks/conformance_time.md.

Measured on the tiny models (max |logit| 0.66 Llama, 1.30 Mistral): max |Δ| to HF 1.8e-7 /
2.4e-7 (fp32) and 3.6e-4 / 5.5e-4 (fp16); lowered vs standard 2.1e-7 / 1.8e-7 (fp32) and
3.0e-4 / 3.6e-4 (fp16). Gates (int8; int4 g32): KL 9.7e-7 / 9.1e-7; 2.3e-4 / 1.6e-4 nats,
top-1 0.988 / 1.000; 0.870 / 0.994, perplexity +0.0 %; +0.35 % / -0.18 % (Llama / Mistral).
With Qwen3 (head_dim 32) and Phi-3 (hidden 128) enrolled, their int4 g32 figures were KL
4.1e-4 / 1.04e-3 nats and top-1 0.793 / 0.691: these random models are near-uniform
(perplexity ~255 of 256 tokens), so top-1 flips among near-ties; the int4 gate's top-1
floor is 0.6 and its KL ceiling 2e-3 nats (a model reduced to uniform output would be
about 0.02 nats away, ten times that).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from llmbuild.artifact import read_manifest
from llmbuild.graph import io
from llmbuild.graph.annotations import MOE, nodes_with
from llmbuild.models import ARCHITECTURES
from llmbuild.runtime import load
from llmbuild.runtime.executors.base import StepInputs
from tests.conformance import gate as conformance_gate
from tests.family import decode_in_steps
from tests.conformance import LIMITS, TINY_CONFIGS, VOCAB, TinyArchitecture, tiny_config_kwargs

TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def tiny(request, tmp_path_factory) -> TinyArchitecture:
    tiny_config_kwargs(request.param)  # fails every test of an architecture without a tiny config
    return TinyArchitecture(request.param, tmp_path_factory.mktemp(request.param))


def test_every_registered_architecture_has_a_tiny_config():
    missing = sorted(set(ARCHITECTURES) - set(TINY_CONFIGS))
    assert not missing, f"no tiny config in tests/conformance.py TINY_CONFIGS for {missing}"
    stale = sorted(set(TINY_CONFIGS) - set(ARCHITECTURES))
    assert not stale, f"tiny configs of unregistered architectures: {stale}"


def test_tiny_model_is_the_architecture(tiny):
    """The tiny directory is what the registry resolves to, with 2-3 layers."""
    assert tiny.config["architectures"] == [tiny.arch]
    assert type(tiny.spec).__name__ == ARCHITECTURES[tiny.arch].rpartition(":")[2]
    assert 2 <= tiny.spec.dims(tiny.config).layers <= 3


# -- helpers -------------------------------------------------------------------------------------


def executor(artifact, *, lowered: bool):
    model = load(artifact, backend="onnxruntime", threads=2, cpu_lowering=lowered)
    assert model.executor.lowered == lowered
    return model


def prefill(ex, ids: list[int], slot: int = 0) -> np.ndarray:
    """Logits of every position of one prompt prefilled alone in `slot`."""
    ar = np.arange(len(ids), dtype=np.int64)[None]
    return ex.forward(StepInputs(np.array([ids]), ar, np.zeros(1, np.int64), ar), slot)[0]


def trace(ex) -> list[np.ndarray]:
    """Ragged prefills in slots 0 and 1, three batched decode steps, a 3-token chunk in slot 1."""
    a, b = [5, 40, 77, 12, 90, 33, 61, 7, 88, 21, 54, 66, 13, 99, 101], [17, 18, 200, 4, 9, 120, 64, 65, 66, 31]
    out = [prefill(ex, a[:12], 0), prefill(ex, b[:7], 1)]
    for k in range(3):
        pos = np.array([12 + k, 7 + k])
        out.append(ex.forward(StepInputs(np.array([[a[12 + k]], [b[7 + k]]]), pos[:, None], pos,
                                         np.zeros((2, 1), np.int64))))
    out.append(ex.forward(StepInputs(np.array([b[7:10]]), np.arange(7, 10)[None], np.array([7]),
                                     np.arange(3)[None]), 1))
    return out


# -- numerics against HF transformers --------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_logits_match_hf(tiny, precision):
    model = executor(tiny.artifact(precision), lowered=False)  # the graph TensorRT parses
    rng = np.random.default_rng(7)
    try:
        for length in (1, 5, 37):
            ids = rng.integers(5, VOCAB, length).tolist()
            ours, theirs = prefill(model.executor, ids), tiny.hf_logits(ids)
            assert ours.shape == theirs.shape == (length, VOCAB)
            err = np.abs(ours - theirs).max()
            assert err < TOLERANCE[precision], f"{tiny.arch} {precision} length {length}: max |Δ| {err}"
            # the tolerance is small against the logits, or it would hide a wrong model
            assert np.abs(theirs).max() > 10 * TOLERANCE[precision]
    finally:
        model.close()


@pytest.mark.parametrize("lowered", [False, True], ids=["standard", "lowered"])
def test_decode_with_cache_equals_full_recompute(tiny, lowered):
    model = executor(tiny.artifact("float32"), lowered=lowered)
    ex = model.executor
    try:
        ids = np.random.default_rng(1).integers(5, VOCAB, 20).tolist()
        full = prefill(ex, ids)
        steps = decode_in_steps(ex, ids)  # prefill 8 tokens, then 8 one at a time and a chunk of 4
        np.testing.assert_allclose(steps, full[8:], atol=1e-5, rtol=0)
    finally:
        model.close()


@pytest.mark.parametrize("lowered", [False, True], ids=["standard", "lowered"])
def test_batch_of_different_lengths_equals_one_by_one(tiny, lowered):
    model = executor(tiny.artifact("float32"), lowered=lowered)
    try:
        rng = np.random.default_rng(2)
        prompts = [rng.integers(5, VOCAB, n).tolist() for n in (3, 17, 9, 1)]
        alone = [model.generate_ids([p], max_new_tokens=10)[0].token_ids for p in prompts]
        batched = [g.token_ids for g in model.generate_ids(prompts, max_new_tokens=10)]
        assert batched == alone
        assert all(len(t) > 0 for t in alone)
        for p, toks in zip(prompts, alone):  # and the greedy tokens are HF's (teacher-forced)
            hf = tiny.hf_logits(p + toks[:-1])[len(p) - 1:]
            assert hf.argmax(-1).tolist() == toks
    finally:
        model.close()


# -- the CPU lowering -------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_cpu_lowering_applies_to_every_lowerable_layer(tiny, precision, caplog):
    """Every layer not in the spec's `cpu_attention_fallbacks` is one GroupQueryAttention
    (identified by the present_key.<i> it writes); the only WARNINGs are one per fallback
    layer, both when the graph is lowered and when the runtime loads the artifact (which
    would otherwise run the whole standard graph, with a WARNING)."""
    from llmbuild.lowering.cpu import lowered_model_bytes

    art = tiny.artifact(precision)
    layers = tiny.spec.dims(tiny.config).layers
    fallbacks = tiny.spec.cpu_attention_fallbacks(tiny.config)
    assert set(fallbacks) <= set(range(layers))

    def warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        caplog.clear()
        assert len(found) == len(fallbacks), found
        assert all("keeps the standard Attention" in w for w in found), found
        return found

    with caplog.at_level(logging.WARNING):
        model = onnx.load_from_string(lowered_model_bytes(art / read_manifest(art)["graph"]["file"]))
        warnings()
        runtime = load(art, backend="onnxruntime", threads=2)  # lowered when it can be, else a WARNING
        warnings()
    assert runtime.executor.lowered
    runtime.close()
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert sorted(n.output[1] for n in gqa) == sorted(io.present_key(i) for i in range(layers) if i not in fallbacks)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_lowered_graph_gives_the_standard_graphs_logits(tiny, precision):
    """float32: the same numbers up to summation order; float16: the lowered graph computes in
    float32, the standard one in float16."""
    art = tiny.artifact(precision)
    standard, lowered = executor(art, lowered=False), executor(art, lowered=True)
    try:
        for got, want in zip(trace(lowered.executor), trace(standard.executor)):
            np.testing.assert_allclose(got, want, atol=TOLERANCE[precision], rtol=0)
    finally:
        standard.close()
        lowered.close()


# -- tensor parallelism -----------------------------------------------------------------------------


def test_simulated_tp2_equals_tp1(tiny):
    from llmbuild.parallel.hints import tp_problems
    from tests.test_parallel import run_steps

    problems, _ = tp_problems(tiny.config, 2)
    if problems:
        pytest.skip(f"the tiny {tiny.arch} cannot be split in 2: {problems}")
    one, two = load(tiny.artifact("float32"), backend="onnxruntime"), load(tiny.artifact("tp2"), backend="onnxruntime")
    try:
        assert two.executor.name == "onnxruntime-tp" and two.executor.tp == 2
        ref, got = run_steps(one.executor), run_steps(two.executor)
        for a, b in zip(got, ref):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
        assert np.abs(ref[0]).max() > 0.1
    finally:
        one.close()
        two.close()


# -- quantization -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_artifact_passes_its_accuracy_gate(tiny, scheme):
    """compile ran the gate (a miss would have failed it); every linear the spec lists is
    stored quantized behind a DequantizeLinear, and quantization changed the logits."""
    art = tiny.artifact(scheme)
    m = read_manifest(art)
    v = m["verification"]
    assert v["kind"] == "accuracy" and v["passed"], v
    gate = conformance_gate(tiny.arch, scheme)
    assert v["perplexity_increase"] <= gate["max_perplexity_increase"]
    assert v["kl_divergence"] <= gate["max_kl_divergence"]
    assert v["top1_agreement"] >= gate["min_top1_agreement"]
    assert v["kl_divergence"] > 0  # the candidate is not the float graph
    graph = onnx.load(str(art / m["graph"]["file"]), load_external_data=False)
    init = {t.name: t.data_type for t in graph.graph.initializer}
    dequantized = {n.input[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"}
    code = onnx.TensorProto.INT8 if scheme == "int8" else onnx.TensorProto.INT4
    linears = tiny.spec.linear_weights(tiny.spec.dims(tiny.config))
    for name, w in linears.items():
        if w.layer is None:
            continue  # lm_head: quantized or not by the scheme's defaults
        assert name in dequantized and init[name] == code, name
    dims = {t.name: list(t.dims) for t in graph.graph.initializer}
    for _, meta in nodes_with(graph.graph, MOE):  # routed experts: codes and scales per expert
        experts = meta["experts"]
        for proj, name in meta["stacked"].items():
            assert name in dequantized and init[name] == code, name
            rows = meta["intermediate"] if proj == "down" else meta["hidden"]
            blocks = 1 if scheme == "int8" else -(-rows // 32)  # int8 per channel: one block of all rows
            assert dims[f"{name}.scale"] == [experts, blocks, dims[name][2]], name
    assert bool(nodes_with(graph.graph, MOE)) == ("experts" in m["quantization"])


# -- the TensorRT-RTX engine ------------------------------------------------------------------------


def test_fp16_graph_builds_an_engine_with_the_manifests_contract(tiny):
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    from llmbuild.engine.build import describe_network, parse_onnx

    art = tiny.artifact("float16")
    m = read_manifest(art)
    [engine] = m["engines"]
    assert (art / engine["file"]).stat().st_size == engine["bytes"] > 0
    layers, d = m["model"]["num_layers"], tiny.spec.dims(tiny.config)
    # names, order and dtypes are the graph contract the manifest records
    for mode, entries in (("input", m["graph"]["inputs"]), ("output", m["graph"]["outputs"])):
        got = [(t["name"], t["dtype"]) for t in engine["io"] if t["mode"] == mode]
        assert got == [(t["name"], t["dtype"]) for t in entries]
    shapes = {t["name"]: t["shape"] for t in engine["io"]}
    cache = [-1, d.kv_heads, LIMITS["max_seq_len"], d.head_dim]  # cache length pinned to the limit
    for past, present in io.cache_pairs(layers):
        assert shapes[past] == shapes[present] == cache
    assert shapes[io.LOGITS] == [-1, -1, d.vocab]
    assert engine["aliases"] == {present: past for past, present in io.cache_pairs(layers)}
    # what TensorRT parses from the artifact's own graph
    parsed = parse_onnx(trt, art / m["graph"]["file"], cache_len=LIMITS["max_seq_len"])
    assert [{k: v for k, v in t.items() if k != "profile_shapes"} for t in engine["io"]] == \
        describe_network(parsed.network)
    # two profiles (prefill, decode) spanning the limits
    b, s = LIMITS["max_batch_size"], LIMITS["max_input_len"]
    assert engine["profile_names"] == ["prefill", "decode"]
    prefill_p, decode_p = engine["profiles"]
    assert prefill_p[io.INPUT_IDS][0] == [1, 1] and prefill_p[io.INPUT_IDS][2][1] == s
    assert decode_p[io.INPUT_IDS] == [[1, 1], [b, 1], [b, 1]]
    assert decode_p[io.past_key(layers - 1)][2] == [b, *cache[1:]]


# -- the C++ runtime --------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_cpp_greedy_ids_equal_python(cpp_build, tiny, precision, tmp_path):
    """C++ on the graph as written = Python with cpu_lowering=False; C++ on the lowered graph
    (--graph) = Python as loaded by default."""
    from llmbuild.lowering.cpu import save_lowered_graph
    from llmbuild.runtime.sampling import SamplingParams
    from tests.test_cpp import TINY_PROMPTS, assert_same_ids, python_model

    art = tiny.artifact(precision)
    model = python_model(art, lowered=False)
    try:
        results = assert_same_ids(model, art, TINY_PROMPTS, 24, SamplingParams())
        assert all(r["token_ids"] for r in results)
    finally:
        model.close()
    graph = save_lowered_graph(art, tmp_path / "lowered")
    model = python_model(art, lowered=True)
    try:
        assert_same_ids(model, art, TINY_PROMPTS, 24, SamplingParams(), "--graph", str(graph))
    finally:
        model.close()
