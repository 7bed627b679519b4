"""Quantized routed experts (llmbuild/quantize/experts.py, expert_calibration.py,
llmbuild/lowering/moe_quantized.py): per-expert scales, the CPU lowering to QMoE, sparsity
with quantized experts, calibration per expert with its round-to-nearest fallback, plan's
bytes and the TensorRT-RTX engine. The int8 / int4 artifacts of the conformance suite
quantize the experts too (tests/test_conformance.py asserts it and their accuracy gates)."""

from __future__ import annotations

import json
import shutil
from contextlib import closing

import numpy as np
import onnx
import pytest

from llmbuild.artifact import read_manifest
from llmbuild.graph.annotations import MOE, nodes_with
from llmbuild.quantize.plan import ModuleSpec
from llmbuild.runtime import load
from tests.conformance import LIMITS, make_tiny_model
from tests.test_conformance import prefill

IDS = [5, 9, 200, 31, 77, 140, 18]
EXPERTS_ONLY = [{"match": "*", "scheme": "none"}]  # then the experts' own override: only they are quantized


def compile_quantized(hf_dir, out, weights: dict, *, experts_only: bool = False, precision: str = "float32",
                      engines=(), calibration: dict | None = None, quiet: bool = True, parallel: dict | None = None):
    from llmbuild.compile import compile_recipe

    out.mkdir(parents=True, exist_ok=True)
    q = {"weights": weights}
    if experts_only:
        q["overrides"] = [*EXPERTS_ONLY, {"match": "*.experts.*", **weights}]
    if calibration:
        q["calibration"] = calibration
    recipe = out / "r.yaml"
    recipe.write_text(json.dumps({"name": "moeq", "model": {"source": str(hf_dir)}, "limits": LIMITS,
                                  "precision": precision, "engines": list(engines), "quantization": q,
                                  **({"parallel": parallel} if parallel else {})}))
    return compile_recipe(recipe, out_dir=out, quiet=quiet, verify=False)


def logits(art, lowered: bool, **options) -> np.ndarray:
    model = load(art, backend="onnxruntime", threads=2, cpu_lowering=lowered, **options)
    try:
        return prefill(model.executor, IDS)
    finally:
        model.close()


def graph_of(art) -> onnx.ModelProto:
    return onnx.load(str(art / read_manifest(art)["graph"]["file"]), load_external_data=False)


# -- the scheme, per expert ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [ModuleSpec("int8"), ModuleSpec("int8", group_size=32),
                                  ModuleSpec("int4", group_size=32), ModuleSpec("int4", group_size=32, symmetric=False),
                                  ModuleSpec("int4", group_size=64), ModuleSpec("int8", group_size=32, symmetric=False)])
def test_per_expert_scales_round_trip(spec):
    """Experts of magnitudes 1e-3 .. 1e1 stacked [E, in, out]: every expert gets its own
    scales [E, G, out], equal to quantizing that expert alone with the dense scheme, so each
    expert's error is relative to its own magnitude (one shared scale would zero the small one)."""
    from llmbuild.quantize.experts import quantize_stacked

    rng = np.random.default_rng(0)
    e, k, n = 4, 80, 48  # 80 rows: groups of 32 and 64 end with a short block
    w = rng.standard_normal((e, k, n)).astype(np.float32) * (10.0 ** np.arange(-3, 1))[:, None, None]
    sq = quantize_stacked(spec, w, np.float16)
    block = spec.group_size or k
    g = -(-k // block)
    assert sq.codes.shape == (e, g * block, n) and sq.scale.shape == (e, g, n) and sq.block == block
    assert (sq.offset is not None) == (not spec.symmetric)
    assert np.all(sq.codes[:, k:] == 0)  # padding rows
    deq = sq.dequantize()
    assert deq.shape == w.shape
    scheme = spec.make()
    for i in range(e):
        alone = scheme.quantize(w[i], np.float16)
        np.testing.assert_array_equal(sq.codes[i, :k], alone.data)
        np.testing.assert_array_equal(deq[i], alone.dequantize())
        rel = np.abs(deq[i] - w[i]).max() / np.abs(w[i]).max()
        assert rel < (0.02 if spec.scheme == "int8" else 0.2), (i, rel)


# -- the graph and its CPU lowering -------------------------------------------------------------------


@pytest.mark.parametrize("arch,weights,fused", [
    ("Qwen2MoeForCausalLM", {"scheme": "int4", "group_size": 32}, True),  # k=1, not renormalised
    ("Qwen3MoeForCausalLM", {"scheme": "int8"}, True),  # k=2, renormalised
    ("MixtralForCausalLM", {"scheme": "int4", "group_size": 32, "symmetric": False}, False),
    ("Qwen3MoeForCausalLM", {"scheme": "int8", "group_size": 32}, False),
    ("Qwen3MoeForCausalLM", {"scheme": "int8", "group_size": 32, "symmetric": False}, False),
])
def test_quantized_experts_on_the_cpu(arch, weights, fused, tmp_path):
    """Only the experts quantized: the standard graph reads codes + per-expert scales through
    DequantizeLinear → Gather (no float copy of the experts in the artifact); its logits move
    from the float graph's but stay close; the CPU lowering runs com.microsoft.QMoE for int4
    blocks and int8 per channel (else the routed path with the codes gathered before the
    DequantizeLinear), with the standard graph's logits."""
    from llmbuild.lowering.cpu import lowered_model_bytes

    hf = make_tiny_model(arch, tmp_path / "hf")
    art = compile_quantized(hf, tmp_path / "q", weights, experts_only=True)
    ref = compile_quantized(hf, tmp_path / "f", {"scheme": "none"})
    graph = graph_of(art).graph
    init = {t.name: t for t in graph.initializer}
    blocks = nodes_with(graph, MOE)
    assert blocks
    for _, meta in blocks:
        for name in meta["stacked"].values():
            assert init[name].data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8)
            [dq] = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == name]
            assert [n.op_type for n in graph.node if dq.output[0] in n.input] == ["Gather"]
    entry = read_manifest(art)["quantization"]["experts"]
    # float32 experts: int8 codes + float32 scales (+ asym int8 g32's offsets and block indicator: 1.44 bytes)
    asym8 = weights["scheme"] == "int8" and weights.get("symmetric") is False
    assert entry["weight_bytes"] < entry["unquantized_bytes"] / (2.5 if asym8 else 3)
    lowered = onnx.load_from_string(lowered_model_bytes(art / read_manifest(art)["graph"]["file"])).graph
    qmoe = [n for n in lowered.node if n.op_type == "QMoE"]
    assert len(qmoe) == (len(blocks) if fused else 0)
    assert not [n for n in lowered.node if n.op_type == "MoE"]  # quantized blocks never take the float kernel
    if not fused:  # the routed path gathers the picked experts' codes, then dequantizes only those
        for _, meta in blocks:
            for name in meta["stacked"].values():
                readers = [n.op_type for n in lowered.node if set(n.input) & {name, f"{name}.int8"}]
                assert readers == ["Gather"], (name, readers)
    standard, cpu, float_ = logits(art, False), logits(art, True), logits(ref, False)
    np.testing.assert_allclose(cpu, standard, atol=2e-5, rtol=0)
    moved = np.abs(standard - float_).max()
    assert 0 < moved < 0.05 * np.abs(float_).max(), moved


def _picked_experts(art, tmp_path) -> dict[int, set[int]]:
    """Sparse layer -> experts the artifact's own routers pick for IDS (the graph run on ONNX
    Runtime with its routed indices as outputs)."""
    from llmbuild.quantize.calibration import decoder_feeds, ort_session

    m = read_manifest(art)
    proto = graph_of(art)
    blocks = [meta for _, meta in nodes_with(proto.graph, MOE)]
    proto.graph.output.extend([onnx.helper.make_tensor_value_info(b["indices"], onnx.TensorProto.INT64, None)
                               for b in blocks])
    path = (art / m["graph"]["file"]).parent / "picks.onnx"
    onnx.save(proto, str(path))
    sess = ort_session(path, 2)
    d = m["model"]
    outs = sess.run([b["indices"] for b in blocks],
                    decoder_feeds(sess, np.array([IDS], np.int64), d["num_key_value_heads"], d["head_dim"]))
    path.unlink()
    return {b["layer"]: set(o.flatten().tolist()) for b, o in zip(blocks, outs)}


def _poison_scales(art, dst, experts: dict[int, list[int]]):
    """A copy of `art` whose experts `experts[layer]` have NaN scales (every projection),
    without its CPU-ready graph (the lowering then runs at load, from the poisoned graph)."""
    shutil.copytree(art, dst)
    m = json.loads((dst / "manifest.json").read_text())
    cpu = m["graph"].pop("cpu", None)
    if cpu is not None:
        (dst / cpu["file"]).unlink()
        (dst / "manifest.json").write_text(json.dumps(m))
    path = dst / m["graph"]["file"]
    location = next(e.value for t in graph_of(dst).graph.initializer for e in t.external_data if e.key == "location")
    proto = onnx.load(str(path))
    init = {t.name: t for t in proto.graph.initializer}
    for _, meta in nodes_with(proto.graph, MOE):
        for name in meta["stacked"].values():
            t = init[f"{name}.scale"]
            a = onnx.numpy_helper.to_array(t).copy()
            a[experts.get(meta["layer"], [])] = np.nan
            t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
    (path.parent / location).unlink()
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    return dst


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"])
def test_nan_scales_of_unselected_experts_never_reach_the_logits(arch, tmp_path):
    """int4 experts; every expert the artifact's routers do not pick for IDS gets NaN scales:
    the logits stay finite and equal the unpoisoned artifact's, on the standard graph
    (DequantizeLinear → Gather) and on the QMoE lowering. Control: NaN scales in one picked
    expert do reach the logits."""
    art = compile_quantized(make_tiny_model(arch, tmp_path / "hf"), tmp_path / "q",
                            {"scheme": "int4", "group_size": 32})
    picked = _picked_experts(art, tmp_path)
    n = read_manifest(art)["model"]["moe"]["experts"]
    unpicked = {layer: sorted(set(range(n)) - p) for layer, p in picked.items()}
    assert all(unpicked.values()), unpicked
    poisoned = _poison_scales(art, tmp_path / "poisoned", unpicked)
    for lowered in (False, True):
        want = logits(art, lowered)
        got = logits(poisoned, lowered, check_hashes=False)
        assert np.isfinite(got).all(), f"lowered={lowered}: an unselected expert's NaN scale reached the logits"
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    layer = min(picked)
    control = _poison_scales(art, tmp_path / "control", {layer: [min(picked[layer])]})
    for lowered in (False, True):
        assert np.isnan(logits(control, lowered, check_hashes=False)).any()


@pytest.mark.parametrize("weights", [{"scheme": "int4", "group_size": 32}, {"scheme": "int8"},
                                     {"scheme": "int4", "group_size": 32, "symmetric": False}],
                         ids=["int4-g32", "int8", "int4-asym"])
def test_quantized_experts_tensor_parallel_equal_tp1(weights, tmp_path):
    """tp = 2 (each expert split by its width): rank r holds its slice of the tp = 1 artifact's
    per-expert codes and scales, so simulated tp = 2 gives the quantized tp = 1 logits."""
    import llmbuild
    from tests.test_parallel import run_steps

    hf = make_tiny_model("Qwen2MoeForCausalLM", tmp_path / "hf", overrides={"moe_intermediate_size": 64})
    one = compile_quantized(hf, tmp_path / "one", weights, experts_only=True)
    two = compile_quantized(hf, tmp_path / "two", weights, experts_only=True, parallel={"tp": 2})
    m = read_manifest(two)
    assert m["quantization"]["experts"] == read_manifest(one)["quantization"]["experts"]
    for r in m["parallel"]["ranks"]:
        graph = onnx.load(str(two / r["graph"]), load_external_data=False).graph
        init = {t.name: t for t in graph.initializer}
        for _, meta in nodes_with(graph, MOE):
            assert init[meta["stacked"]["down"]].dims[1] == 32  # its 32 of 64 expert rows
            assert init[meta["stacked"]["gate"]].data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8)
    ref = run_steps(llmbuild.load(one, backend="onnxruntime", cpu_lowering=False).executor)
    sim = run_steps(llmbuild.load(two, backend="onnxruntime").executor)
    for a, b in zip(sim, ref):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_tp_expert_groups_that_straddle_a_rank_are_refused(tmp_path):
    """moe_intermediate 32 split 16 + 16 at tp = 2: int4 groups of 32 of the down experts'
    input rows would straddle the ranks."""
    from llmbuild.errors import UserError

    hf = make_tiny_model("Qwen2MoeForCausalLM", tmp_path / "hf")
    with pytest.raises(UserError, match=r"experts\.0\.down_proj\.weight: tensor-parallel rank 0 holds expert "
                                        r"input rows 0\.\.16 of 32, which do not start and end on whole int4 groups"):
        compile_quantized(hf, tmp_path / "two", {"scheme": "int4", "group_size": 32}, experts_only=True,
                          parallel={"tp": 2})


# -- calibration per expert ---------------------------------------------------------------------------


def _model_with_an_unreachable_expert(dst, tmp_path, expert: int, channel: int = 5):
    """Tiny Qwen3-MoE whose expert `expert` no token can be routed to: the embedding (scaled to
    std 1) is 5 in channel `channel` for every token, so the router's input is positive there
    whatever the token, and the router reads that channel only for `expert`, with weight -50."""
    import torch
    from transformers import AutoModelForCausalLM

    src = make_tiny_model("Qwen3MoeForCausalLM", tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50.0)  # std 1: the other channels vary the routing
        model.model.embed_tokens.weight[:, channel] = 5.0
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.gate.weight[:, channel] = 0.0
                layer.mlp.gate.weight[expert, channel] = -50.0
    model.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_expert_without_calibration_tokens_falls_back_to_rtn(algorithm, tmp_path, capsys):
    """Per-expert calibration from the tokens the model's router sends to each expert: the
    expert no token reaches is quantized round-to-nearest, listed per layer in the manifest
    and printed by compile; a reached expert's codes are the calibrated ones (not RTN's)."""
    from llmbuild.quantize.experts import quantize_stacked

    unreachable = 6
    hf = _model_with_an_unreachable_expert(tmp_path / "hf", tmp_path, unreachable)
    weights = {"scheme": "int4", "group_size": 32, "algorithm": algorithm}
    art = compile_quantized(hf, tmp_path / "q", weights, experts_only=True, quiet=False,
                            calibration={"dataset": "kjv", "samples": 8, "seq_len": 64})
    entry = read_manifest(art)["quantization"]["experts"]
    [layer] = entry["calibration"]
    assert layer["tokens_per_expert"][unreachable] == 0 and sum(layer["tokens_per_expert"]) == 8 * 64 * 2
    assert sum(t > 0 for t in layer["tokens_per_expert"]) >= 4
    assert entry["round_to_nearest"] == {str(layer["layer"]): [unreachable]}
    printed = capsys.readouterr()
    printed = " ".join((printed.out + printed.err).split())  # the console wraps long lines
    assert f"layer {layer['layer']}: experts [{unreachable}] received no calibration token: round-to-nearest" \
        in printed
    # the stored codes: RTN for the unreached expert, not for a reached one
    from safetensors.numpy import load_file

    proto = onnx.load(str(art / read_manifest(art)["graph"]["file"]))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    src = load_file(str(hf / "model.safetensors"))
    p = f"model.layers.{layer['layer']}.mlp.experts"
    name = f"{p}.gate_proj.weight"
    hf_gate = np.stack([src[f"{p}.{e}.gate_proj.weight"].T for e in range(8)])  # [E, H, I] as the graph stacks it
    rtn = quantize_stacked(ModuleSpec("int4", group_size=32), hf_gate.astype(np.float32), np.float32)
    codes = init[name].astype(np.int8)
    np.testing.assert_array_equal(codes[unreachable], rtn.codes[unreachable])
    reached = int(np.argmax(layer["tokens_per_expert"]))
    assert (codes[reached] != rtn.codes[reached]).any()


# -- plan and the engine ------------------------------------------------------------------------------


def test_plan_counts_quantized_expert_bytes():
    """Mixtral-8x7B int4 g128: every expert stored as 4 + 16/128 bits per weight; a decoded
    token reads 2 of the 8 experts' bytes."""
    from llmbuild.plan import format_plan, plan_config

    config = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
              "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768}
    base = {"name": "m", "precision": "float16", "engines": [],
            "limits": {"max_batch_size": 1, "max_input_len": 128, "max_seq_len": 1024}}
    fp16 = plan_config(config, base)["moe"]
    q = plan_config(config, {**base, "quantization": {"weights": {"scheme": "int4", "group_size": 128}}})
    per_expert = 3 * (4096 * 14336 // 2 + 4096 // 128 * 14336 * 2)  # gate/up/down: codes + fp16 scales
    assert q["moe"]["expert_weight_bytes"] == 8 * 32 * per_expert
    assert fp16["expert_weight_bytes"] == 8 * 32 * 3 * 4096 * 14336 * 2
    dense = fp16["bytes_read_per_decoded_token"] - 2 * 32 * 3 * 4096 * 14336 * 2  # without the 2 picked experts
    assert dense > 0
    assert "routed experts stored in 23.3 GB" in format_plan(q)
    kept = plan_config(config, {**base, "quantization": {"weights": {"scheme": "int4"}, "overrides": [
        {"match": "*.experts.*", "scheme": "none"}]}})["moe"]
    assert kept["expert_weight_bytes"] == fp16["expert_weight_bytes"]


def test_int4_moe_artifact_builds_a_tensorrt_rtx_engine(tmp_path):
    """fp16 Qwen3-MoE with int4 experts (DequantizeLinear → Gather): TensorRT-RTX parses and
    builds it, and keeps the experts quantized (the engine is smaller than the same model's
    with fp16 experts by more than half the experts' fp16 bytes)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    hf = make_tiny_model("Qwen3MoeForCausalLM", tmp_path / "hf")
    weights = {"scheme": "int4", "group_size": 32}
    art = compile_quantized(hf, tmp_path / "q", weights, experts_only=True, precision="float16",
                            engines=["tensorrt-rtx"])
    ref = compile_quantized(hf, tmp_path / "f", {"scheme": "none"}, precision="float16", engines=["tensorrt-rtx"])
    [engine] = read_manifest(art)["engines"]
    [float_engine] = read_manifest(ref)["engines"]
    assert (art / engine["file"]).stat().st_size == engine["bytes"] > 0
    fp16_experts = read_manifest(art)["quantization"]["experts"]["unquantized_bytes"]
    assert float_engine["bytes"] - engine["bytes"] > fp16_experts / 2, (float_engine["bytes"], engine["bytes"])


@pytest.mark.parametrize("lowered", [True, False], ids=["qmoe", "standard"])
def test_cpp_greedy_ids_equal_python_with_quantized_experts(cpp_build, lowered, tmp_path):
    """The C++ runtime on an int4-expert artifact: the CPU-ready graph (com.microsoft.QMoE)
    and the standard graph (DequantizeLinear → Gather) give Python's greedy ids."""
    from llmbuild.runtime.sampling import SamplingParams
    from tests.test_cpp import TINY_PROMPTS, assert_same_ids, python_model

    art = compile_quantized(make_tiny_model("Qwen3MoeForCausalLM", tmp_path / "hf"), tmp_path / "q",
                            {"scheme": "int4", "group_size": 32})
    with closing(python_model(art, lowered=lowered)) as model:
        results = assert_same_ids(model, art, TINY_PROMPTS, 16, SamplingParams())
    assert all(r["token_ids"] for r in results)
