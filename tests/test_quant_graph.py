"""Quantized graphs end to end on a tiny random Llama (GQA, hidden 96: int4 groups of
64 leave a short last block): compiled from recipes, run on ONNX Runtime and checked
against the numpy reference of the stored quantized weights in HF transformers;
parsed and built by TensorRT-RTX; calibrated by layer slices of our own graph; and
the `verify:` accuracy gate failing `compile` with exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from llmbuild.eval.runners import OrtGraphRunner, artifact_graph
from llmbuild.quantize.schemes import Fp8, Int4, Int8, fp8_fake_quant
from tests.tiny import load_tiny_hf, make_tiny_hf

torch = pytest.importorskip("torch")

HIDDEN, LAYERS, INTER = 96, 2, 160
CASES = {
    "int8": {"scheme": "int8"},
    "int8-g64": {"scheme": "int8", "group_size": 64},
    "int4-g32": {"scheme": "int4", "group_size": 32},
    "int4-g64-asym": {"scheme": "int4", "group_size": 64, "symmetric": False},
    "int8-g64-asym": {"scheme": "int8", "group_size": 64, "symmetric": False},
    "int4-g32-s8": {"scheme": "int4", "group_size": 32, "scale_bits": 8},
    "int4-g64-asym-s8": {"scheme": "int4", "group_size": 64, "symmetric": False, "scale_bits": 8},
    "fp8": {"scheme": "fp8"},
    "int4-awq": {"scheme": "int4", "group_size": 32, "algorithm": "awq"},
    "int4-awq-asym-s8": {"scheme": "int4", "group_size": 32, "algorithm": "awq", "symmetric": False, "scale_bits": 8},
    "int4-gptq": {"scheme": "int4", "group_size": 32, "algorithm": "gptq"},
}
OVERRIDES = {"int4-g32": [{"match": "lm_head", "scheme": "none"}, {"layers": [-1], "match": "*.down_proj",
                                                                    "scheme": "int8"}]}
IDS = np.array([5, 40, 77, 12, 90, 33, 61, 7, 88, 21, 54, 66], np.int64)


def write_recipe(dst: Path, name: str, model_dir: Path, weights: dict | None, *, precision="float32",
                 engines=(), overrides=None, verify=None) -> Path:
    recipe = {
        "name": name, "model": {"source": str(model_dir)}, "precision": precision,
        "limits": {"max_batch_size": 1, "max_input_len": 64, "max_seq_len": 128}, "engines": list(engines),
    }
    if weights is not None:
        recipe["quantization"] = {"weights": weights, "overrides": overrides or [],
                                  "calibration": {"samples": 8, "seq_len": 64, "seed": 0}}
    recipe["verify"] = {"eval_tokens": 1024, **(verify or {})}  # 8 chunks of 128 tokens
    path = dst / f"{name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model_dir = make_tiny_hf(root / "hf", hidden=HIDDEN, num_heads=6, num_kv_heads=2, layers=LAYERS,
                             intermediate=INTER, vocab=256, tie=False, seed=0)
    return root, model_dir


@pytest.fixture(scope="module")
def artifacts(tiny):
    from llmbuild.compile import compile_recipe

    root, model_dir = tiny
    out = {}
    for name, weights in CASES.items():
        recipe = write_recipe(root, f"q-{name}", model_dir, weights, overrides=OVERRIDES.get(name))
        out[name] = compile_recipe(recipe, out_dir=root / "out", quiet=True)
    return out


def stored(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _table(init: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    """A weight's scales or offsets in float32: stored as is, or (int4 `scale_bits: 8`) as
    8-bit codes times a float32 step per column (not rounded to a 16-bit graph dtype here)."""
    if name in init:
        return init[name].astype(np.float32)
    if name + "_codes" in init:  # scales: codes 1..255 stored as code - 128
        bias = 128 if name.endswith(".scale") else 0
        return (init[name + "_codes"].astype(np.float32) + bias) * init[name + "_step"][None, :]
    return None


def dequantized_weights(artifact: Path) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, str]]:
    """HF-layout float weights computed in numpy from the artifact's stored codes and
    scales; fp8 input scales; each weight's DequantizeLinear attributes."""
    model = onnx.load(str(artifact_graph(artifact)))
    init = stored(model)
    dq = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init}
    weights, act_scales, forms = {}, {}, {}
    for name, node in dq.items():
        if not name.endswith(".weight"):
            continue
        codes = init[name].astype(np.float32)
        scale = _table(init, name + ".scale")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if "block_size" in attrs:
            b = attrs["block_size"]
            w = codes * np.repeat(scale, b, axis=0)[: codes.shape[0]]
            offset = _table(init, name + ".offset")
            if offset is not None:
                w = w + np.repeat(offset, b, axis=0)[: codes.shape[0]]
        elif attrs.get("axis") == 1:
            w = codes * scale[None, :]
        else:
            w = codes * scale
        weights[name] = w.T  # graph [in, out] -> HF [out, in]
        forms[name] = str(init[name].dtype)
    # fp8: the scale of the Quantize/DequantizeLinear pair in front of each weight's MatMul
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        w_dq = producer.get(n.input[1]) if n.op_type == "MatMul" else None
        x_dq = producer.get(n.input[0]) if w_dq is not None else None
        if x_dq is not None and x_dq.op_type == "DequantizeLinear" and w_dq.input[0] in forms:
            act_scales[w_dq.input[0]] = float(init[x_dq.input[1]])
    for name, t in init.items():  # float weights (norms: AWQ folds its scales into them)
        if name.endswith("norm.weight"):
            weights[name] = t.astype(np.float32)
    return weights, act_scales, forms


def reference_logits(model_dir: Path, weights: dict, act_scales: dict) -> np.ndarray:
    """HF transformers with the numpy-dequantized weights (and fp8 activation fake-quant)."""
    hf = load_tiny_hf(model_dir).float()
    state = hf.state_dict()
    for name, w in weights.items():
        if w.ndim == 2 and w.shape[1] > state[name].shape[1]:  # int4 rows padded to whole blocks
            w = w[:, : state[name].shape[1]]  # (their codes are 0 and their inputs padded with 0)
        assert state[name].shape == w.shape, name
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    hf.load_state_dict(state)
    for name, s in act_scales.items():
        module = hf.get_submodule(name[: -len(".weight")])
        module.register_forward_pre_hook(
            lambda m, args, s=s: (torch.from_numpy(fp8_fake_quant(args[0].numpy(), np.float32(s))),))
    with torch.no_grad():
        return hf(torch.from_numpy(IDS[None])).logits[0].numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_logits_match_numpy_reference(case, tiny, artifacts):
    _, model_dir = tiny
    weights, act_scales, forms = dequantized_weights(artifacts[case])
    ours = OrtGraphRunner(artifact_graph(artifacts[case])).logits(IDS)
    ref = reference_logits(model_dir, weights, act_scales)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    expected = {"int8": "int8", "fp8": "float8_e4m3fn"}.get(CASES[case]["scheme"], "int4")
    linears = [n for n in forms if "layers" in n]
    assert len(linears) >= 7 * LAYERS - 1
    if case == "int4-g32":  # the overrides: lm_head kept, last down_proj int8
        assert "lm_head.weight" not in forms and forms[f"model.layers.{LAYERS - 1}.mlp.down_proj.weight"] == "int8"
        assert forms["model.layers.0.mlp.down_proj.weight"] == "int4"
    else:
        assert {forms[n] for n in forms} == {expected}
    if case == "fp8":
        assert len(act_scales) == len(forms)


@pytest.mark.parametrize("case", ["int8", "int8-g64", "int4-g32", "int4-g64-asym", "int8-g64-asym", "int4-g32-s8",
                                  "int4-g64-asym-s8", "fp8"])
def test_round_to_nearest_codes_equal_the_numpy_reference(case, tiny, artifacts):
    """What compile stored is bit for bit the scheme's numpy quantization of the source."""
    from safetensors.numpy import load_file

    _, model_dir = tiny
    source = load_file(str(model_dir / "model.safetensors"))
    init = stored(onnx.load(str(artifact_graph(artifacts[case]))))
    c = CASES[case]
    scheme = {"int8": Int8(c.get("group_size"), c.get("symmetric", True)), "fp8": Fp8()}.get(c["scheme"]) or Int4(
        c["group_size"], c.get("symmetric", True), c.get("scale_bits"))
    name = "model.layers.1.mlp.up_proj.weight"  # [in 96, out 160]
    qt = scheme.quantize(source[name].T.astype(np.float32), np.float32)
    codes = init[name]
    if codes.shape[0] > 96:  # 96 rows in groups of 64: padded to 128 with zeros
        assert codes.shape == (128, 160) and not codes.astype(np.int8)[96:].any()
        codes = codes[:96]
    if c["scheme"] == "fp8":
        np.testing.assert_array_equal(codes.view(np.uint8), qt.data.view(np.uint8))
    else:
        np.testing.assert_array_equal(codes.astype(np.int8), qt.data)
    if c.get("scale_bits"):  # 8-bit codes [G, out] + a float32 step per column, no float table stored
        assert name + ".scale" not in init and init[name + ".scale_codes"].dtype == np.int8
        np.testing.assert_array_equal(init[name + ".scale_codes"], qt.scale_codes)
        np.testing.assert_array_equal(init[name + ".scale_step"], qt.scale_step)
        assert qt.scale_codes.min() >= 1 - 128  # codes 1..255 (stored - 128): every scale > 0
    else:
        np.testing.assert_allclose(init[name + ".scale"], qt.scale, rtol=1e-7)
    np.testing.assert_array_equal(_table(init, name + ".scale"), qt.scale)
    if c.get("group_size") == 64:
        assert qt.scale.shape == (2, 160)  # 96 rows in groups of 64: one short block
    assert (qt.offset is not None) == (_table(init, name + ".offset") is not None) == (not c.get("symmetric", True))
    if qt.offset is not None:
        np.testing.assert_array_equal(_table(init, name + ".offset"), qt.offset)
        if c.get("scale_bits"):
            assert init[name + ".offset_codes"].dtype == np.int8


def test_manifest_records_quantization_and_accuracy(artifacts):
    m = json.loads((artifacts["int4-gptq"] / "manifest.json").read_text())
    q = m["quantization"]
    assert q["weights"]["algorithm"] == "gptq"
    assert q["summary"]["groups"][0]["setting"] == "int4 g32 sym gptq"
    assert q["summary"]["modules"]["model.layers.0.self_attn.q_proj"] == "int4 g32 sym gptq"
    # float32 graph: 4-bit codes + one 32-bit scale per 32 weights (96 and 160 rows: whole blocks)
    assert q["summary"]["groups"][0]["bits_per_weight"] == q["summary"]["bits_per_weight"] == 5.0
    c = q["calibration"]
    assert (c["samples"], c["seq_len"], c["tokens"]) == (8, 64, 512)
    assert c["hidden_state_bytes"] == 8 * 64 * HIDDEN * 4 and c["peak_rss_bytes"] > c["hidden_state_bytes"]
    assert [r["layer"] for r in c["layers"]] == [*range(LAYERS), "head"]  # head: the untied lm_head
    assert len(c["layers"][0]["gptq"]) == 7 and c["layers"][-1]["gptq"] == ["lm_head"]
    v = m["verification"]
    assert v["kind"] == "accuracy" and v["passed"] and v["positions"] == 8 * 127
    assert 0 < v["kl_divergence"] < 0.01 and v["top1_agreement"] > 0.8  # near-flat random-model distributions
    assert not (artifacts["int4-gptq"] / ".quantize-work").exists()
    # bytes in the graph: half a byte per int4 code + one float32 scale per 32 rows and column
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, 32), (HIDDEN, 32), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
              (INTER, HIDDEN)] * LAYERS + [(HIDDEN, 256)]
    assert q["linear_weight_bytes"] == sum((k * n + 1) // 2 + -(-k // 32) * n * 4 for k, n in shapes)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    return root, make_tiny_hf(root / "hf", hidden=HIDDEN, num_heads=6, num_kv_heads=2, layers=LAYERS,
                              intermediate=INTER, vocab=256, tie=True, seed=1)


def test_tied_lm_head_quantized_by_an_override_gets_its_own_weight(tied):
    """`{match: lm_head, scheme: int8}` on a tied model: the lm_head becomes a MatMul on
    an int8 copy of E^T, the embedding lookup keeps the float table; logits equal HF
    with the dequantized lm_head (and the float embedding)."""
    from llmbuild.compile import compile_recipe

    root, model_dir = tied
    art = compile_recipe(write_recipe(root, "tied-int8-head", model_dir, {"scheme": "int4", "group_size": 32},
                                      overrides=[{"match": "lm_head", "scheme": "int8"}]),
                         out_dir=root / "out", quiet=True)
    model = onnx.load(str(artifact_graph(art)))
    init = stored(model)
    assert init["lm_head.weight"].dtype == np.int8 and init["lm_head.weight"].shape == (HIDDEN, 256)
    assert init["model.embed_tokens.weight"].dtype == np.float32
    assert "Gemm" not in [n.op_type for n in model.graph.node]
    weights, _, forms = dequantized_weights(art)
    assert forms["lm_head.weight"] == "int8" and forms["model.layers.0.mlp.up_proj.weight"] == "int4"
    head = weights.pop("lm_head.weight")
    hf = load_tiny_hf(model_dir).float()
    state = hf.state_dict()
    for name, w in weights.items():
        state[name] = torch.from_numpy(np.ascontiguousarray(w[:, : state[name].shape[1]] if w.ndim == 2 else w))
    hf.load_state_dict(state)
    hf.lm_head.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(head)))  # unties it
    with torch.no_grad():
        ref = hf(torch.from_numpy(IDS[None])).logits[0].numpy()
    np.testing.assert_allclose(OrtGraphRunner(artifact_graph(art)).logits(IDS), ref, atol=2e-4, rtol=1e-4)
    q = json.loads((art / "manifest.json").read_text())["quantization"]
    assert q["summary"]["modules"]["lm_head"] == "int8 per-channel"
    assert "unmatched_overrides" not in q["summary"]


def test_tied_lm_head_stays_tied_unless_named_and_refuses_calibration(tied):
    from llmbuild.cli import cli
    from llmbuild.compile import compile_recipe

    root, model_dir = tied
    art = compile_recipe(write_recipe(root, "tied-plain", model_dir, {"scheme": "int8"},
                                      overrides=[{"match": "lm_head", "scheme": "none"}]),
                         out_dir=root / "out", quiet=True)
    model = onnx.load(str(artifact_graph(art)))
    assert "lm_head.weight" not in stored(model) and "Gemm" in [n.op_type for n in model.graph.node]
    assert json.loads((art / "manifest.json").read_text())["quantization"]["summary"]["unmatched_overrides"] == [0]
    recipe = write_recipe(root, "tied-awq-head", model_dir, {"scheme": "int4", "group_size": 32, "algorithm": "awq"},
                          overrides=[{"match": "lm_*", "group_size": 64}])
    result = CliRunner().invoke(cli, ["compile", str(recipe), "-o", str(root / "bad"), "-q"])
    assert result.exit_code == 2, result.output
    assert "quantization.overrides[0]" in result.output and "round-to-nearest only" in result.output
    assert "int4 g64 sym awq" in result.output


def test_awq_and_gptq_beat_round_to_nearest(tiny):
    """Same group size (32), same calibration: KL to the float model on held-out text."""
    from llmbuild.compile import compile_recipe

    root, model_dir = tiny
    rtn = compile_recipe(write_recipe(root, "q-rtn32", model_dir, {"scheme": "int4", "group_size": 32}),
                         out_dir=root / "out", quiet=True)
    kl = {}
    for name, path in (("rtn", rtn), ("awq", root / "out" / "q-int4-awq"), ("gptq", root / "out" / "q-int4-gptq")):
        kl[name] = json.loads((path / "manifest.json").read_text())["verification"]["kl_divergence"]
    assert kl["awq"] < kl["rtn"] * 0.9 and kl["gptq"] < kl["rtn"] * 0.9, kl


def test_calibration_slices_match_transformers_hidden_states(tiny, tmp_path):
    """Layer by layer on ONNX Runtime == HF's hidden states (the calibration's inputs)."""
    from llmbuild.graph.export import save_model
    from llmbuild.models.build import build_model
    from llmbuild.quantize.calibration import GraphSlices, decoder_feeds, ort_session
    from llmbuild.source import open_source

    _, model_dir = tiny
    with open_source(model_dir) as source:
        model = build_model(source, "float32", 64)
        path = save_model(model, tmp_path / "ref")
        loaders = {n: v.meta["llmbuild.source_loader"] for n, v in model.graph.initializers.items()
                   if "llmbuild.source_loader" in v.meta}
        slices = GraphSlices(path, lambda n: n in loaders)
        tokens = IDS[None, :8]
        prefix, _ = slices.slice([slices.layer_inputs[0]], None, tmp_path / "ref" / "p.onnx")
        s = ort_session(prefix, 1)
        h = s.run(None, decoder_feeds(s, tokens, 2, 16))[0]
        with torch.no_grad():
            hf = load_tiny_hf(model_dir).float()(torch.from_numpy(tokens), output_hidden_states=True)
        for layer in range(LAYERS - 1):
            p, weights = slices.slice([slices.layer_inputs[layer + 1]], slices.layer_inputs[layer],
                                      tmp_path / "ref" / f"l{layer}.onnx", lambda v: f"layers.{layer}." in v)
            assert len(weights) == 9  # 7 linears + 2 norms are inputs, fed from numpy
            s = ort_session(p, 1)
            feeds = decoder_feeds(s, tokens, 2, 16) | {slices.layer_inputs[layer]: h}
            feeds |= {w: np.asarray(loaders[w](), np.float32) for w in weights}
            h = s.run(None, feeds)[0]
            np.testing.assert_allclose(h, hf.hidden_states[layer + 1].numpy(), atol=1e-5)


def test_failing_gate_fails_compile_with_exit_1_and_a_report(tiny):
    from llmbuild.cli import cli

    root, model_dir = tiny
    recipe = write_recipe(root, "q-gate", model_dir, {"scheme": "int4", "group_size": 64},
                          verify={"max_kl_divergence": 1e-9, "min_top1_agreement": 0.5})
    result = CliRunner().invoke(cli, ["compile", str(recipe), "-o", str(root / "gate"), "-q"])
    assert result.exit_code == 1, result.output
    assert "misses its verify: thresholds" in result.output
    assert "KL divergence" in result.output and "> max_kl_divergence 1e-09" in result.output
    report = json.loads((root / "gate" / "q-gate.accuracy.json").read_text())
    assert report["passed"] is False and report["kl_divergence"] > 1e-9 and report["top1_agreement"] >= 0.5
    assert len(report["failures"]) == 1
    assert not (root / "gate" / "q-gate").exists()  # no artifact that looks complete



@pytest.mark.parametrize("case", ["int8", "int8-g64", "int4-g32", "int4-g64-asym", "int8-g64-asym", "int4-g64-asym-s8",
                                  "fp8"])
def test_tensorrt_rtx_parses_and_builds(case, tiny):
    """fp16 graph of every form (int8 per channel; int4 blocks, padded to whole blocks,
    with the zero-point term; fp8 weights + activations; AWQ and GPTQ store the same
    int4 form) → a TensorRT-RTX engine, whose parsed network keeps the quantized weights
    (DEQUANTIZE layers)."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    from llmbuild.compile import compile_recipe
    from llmbuild.engine.build import parse_onnx

    root, model_dir = tiny
    recipe = write_recipe(root, f"trt-{case}", model_dir, CASES[case], precision="float16",
                          engines=["tensorrt-rtx"], verify={"enabled": False}, overrides=OVERRIDES.get(case))
    art = compile_recipe(recipe, out_dir=root / "trt", quiet=True)
    m = json.loads((art / "manifest.json").read_text())
    assert len(m["engines"]) == 1 and (art / m["engines"][0]["file"]).stat().st_size > 10_000
    parsed = parse_onnx(trt, artifact_graph(art), cache_len=128)
    net = parsed.network
    dq = [net.get_layer(i) for i in range(net.num_layers) if net.get_layer(i).type == trt.LayerType.DEQUANTIZE]
    expected = 7 * LAYERS + 1  # every linear + lm_head
    if case == "int4-g32":  # lm_head kept in float16 by the override
        expected -= 1
    if case == "fp8":  # + one activation Q/DQ per distinct input: qkv, o, gate/up, down; lm_head
        expected += 4 * LAYERS + 1
    if case.endswith("-s8"):  # + the int8 scale and offset codes' own DequantizeLinear per linear
        expected *= 3
    assert len(dq) == expected
    inputs = {str(layer.get_input(0).dtype) for layer in dq}
    want = {"int8": {"DataType.INT8"}, "int8-g64": {"DataType.INT8"}, "int4-g32": {"DataType.INT4", "DataType.INT8"},
            "int4-g64-asym": {"DataType.INT4"}, "int8-g64-asym": {"DataType.INT8"}, "fp8": {"DataType.FP8"},
            "int4-g64-asym-s8": {"DataType.INT4"}}[case]
    assert want <= inputs
    # the fp16 artifact also runs on ONNX Runtime, close to the float32 numpy reference
    _, model_dir = tiny
    ours = OrtGraphRunner(artifact_graph(art)).logits(IDS)
    assert np.isfinite(ours).all()
    ref = reference_logits(model_dir, *dequantized_weights(art)[:2])
    np.testing.assert_allclose(ours, ref, atol=0.05)
    # and the CPU runtime's lowered graph of this float16 artifact (MatMulNBits at level 4,
    # promoted to float32; asymmetric int4 with float zero points) gives the same logits
    from llmbuild.runtime import load
    from llmbuild.runtime.executors.base import StepInputs

    pos = np.arange(len(IDS), dtype=np.int64)[None]
    step = StepInputs(IDS[None], pos, np.zeros(1, np.int64), pos)
    with load(art, backend="onnxruntime", threads=2, cpu_lowering=True) as lowered:
        assert lowered.executor.lowered
        got = lowered.executor.forward(step, 0)[0]
    np.testing.assert_allclose(got, ours, atol=0.05)


@pytest.mark.parametrize("case", ["int8", "int8-g64", "int4-g64-asym", "int8-g64-asym", "int4-gptq", "int4-g32-s8",
                                  "int4-g64-asym-s8"])
def test_cpu_lowering_to_matmulnbits(case, artifacts, tmp_path):
    """DequantizeLinear → MatMul as com.microsoft.MatMulNBits (int8 per channel packed in
    blocks of 128; int8 blocks as stored; asymmetric int4's and int8's offset term kept
    after a MatMulNBits without zero points, or, on request, int4's folded into float zero
    points): exact at accuracy level 1, close at level 4 (int8 activations). At level 4
    int8 blocks get the activation residual (add_activation_residuals): float32-level, far
    inside level 4's bound."""
    import onnx_ir as ir

    from llmbuild.lowering.quantized import (add_activation_residuals, fold_decoded_tables, fuse_sibling_matmulnbits,
                                             lower_quantized_matmuls)

    path = artifact_graph(artifacts[case])
    standard = OrtGraphRunner(path).logits(IDS)
    asym4 = case.startswith("int4-g64-asym")
    passes = [(1, 1e-5, False), (4, 0.05, False)] + ([(1, 1e-5, True)] if asym4 else [])
    for level, atol, float_zero_points in passes:
        blocks8 = case.startswith("int8-g64") and level == 4  # int8 blocks with the residual
        model = ir.load(path)
        asym = asym4 and float_zero_points  # the offset term folded into float zero points
        # scale_bits 8: each linear's scale table (+ offset table) decoded from its codes;
        # asymmetric: + one block indicator per distinct input (q/k/v, o, gate/up, down; lm_head)
        tables = (7 * LAYERS + 1) * (2 if asym4 else 1) if case.endswith("-s8") else 0
        indicators = 4 * LAYERS + 1 if "asym" in case else 0
        assert fold_decoded_tables(model) == tables + indicators
        assert not [v for v in model.graph.initializers if v.endswith("_codes")]
        n = lower_quantized_matmuls(model, int4_accuracy_level=level, int8_accuracy_level=level,
                                    int8_block_accuracy_level=level, int4_float_zero_points=float_zero_points)
        assert n == 7 * LAYERS + 1
        if level == 4:  # q/k/v and gate/up: one MatMulNBits each
            assert fuse_sibling_matmulnbits(model) == 3 * LAYERS
            n -= 3 * LAYERS
        assert add_activation_residuals(model) == (n if blocks8 else 0)
        if blocks8:
            atol = 1e-4  # tighter than level 4's 0.05: float32-level (test_activation_residual_is_what_makes_it_exact)
        ops = [node.op_type for node in model.graph]
        # int8 blocks: one If per linear, level 4 + the residual in one branch, level 1 in the other
        assert ops.count("MatMulNBits") == (0 if blocks8 else n) and ops.count("If") == (n if blocks8 else 0)
        assert "DequantizeLinear" not in ops
        nbits = [node for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type == "MatMulNBits"]
        assert len(nbits) == (2 * n if blocks8 else n)
        with_zero_points = [node for node in nbits if len(node.inputs) > 3 and node.inputs[3] is not None]
        assert len(with_zero_points) == (n if asym else 0)
        levels = sorted(node.attributes["accuracy_level"].value for node in nbits)
        assert levels == ([1] * n + [4] * n if blocks8 else [level] * n)
        assert {node.attributes["bits"].value for node in nbits} == {4 if case.startswith("int4") else 8}
        offsets = [v for v in model.graph.initializers if v.endswith(".offset")]
        products = [node for node in model.graph if node.name.endswith(".offset_product")]
        if asym:  # no float offset product is left
            assert not offsets and not products
            assert not [v for v in model.graph.initializers if v.endswith(".block_indicator")]
            assert not [node for node in model.graph if node.name.endswith(".block_sums")]
        elif "asym" in case:  # every linear keeps its offset product, added to MatMulNBits' output;
            # fused siblings (level 4: q/k/v, gate/up) share one product and Add, before their Split
            terms = 4 * LAYERS + 1 if level == 4 else 7 * LAYERS + 1
            assert len(offsets) == len(products) == terms
            adds = [node for node in model.graph if node.name.endswith(".offset_add")]
            assert len(adds) == terms
            assert all(a.inputs[0].producer().op_type in ("MatMulNBits", "Split", "If") for a in adds)
        name = f"l{level}{'-zp' if float_zero_points else ''}"
        ir.save(model, tmp_path / f"{name}.onnx", external_data=f"{name}.onnx.data")
        np.testing.assert_allclose(OrtGraphRunner(tmp_path / f"{name}.onnx").logits(IDS), standard, atol=atol)


def test_awq_folds_every_scale_group_the_spec_declares(tiny):
    """AWQ finds its fold targets from the graph's scale-group annotations: every layer
    folds q/k/v into input_layernorm, gate/up into post_attention_layernorm and down_proj's
    scale into up_proj (no group silently skipped)."""
    root, _ = tiny
    path = root / "out" / "q-int4-awq"
    if not path.is_dir():
        pytest.skip("needs the int4-awq artifact of test_quantized_artifact (runs earlier in this module)")
    layers = json.loads((path / "manifest.json").read_text())["quantization"]["calibration"]["layers"]
    decoder = [r for r in layers if r["layer"] != "head"]  # the untied lm_head step: no scale group
    assert [r["layer"] for r in decoder] == list(range(LAYERS))
    for report in decoder:
        folded = {key: v["folded_into"] for key, v in report["awq"].items()}
        i = report["layer"]
        assert folded == {
            f"model.layers.{i}.self_attn.q_proj+2": f"model.layers.{i}.input_layernorm",
            f"model.layers.{i}.mlp.gate_proj+1": f"model.layers.{i}.post_attention_layernorm",
            f"model.layers.{i}.mlp.down_proj+0": f"model.layers.{i}.mlp.up_proj",
        }, report["awq"]
