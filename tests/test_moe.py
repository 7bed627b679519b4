"""Mixture of experts (llmbuild/graph/moe.py, llmbuild/models/moe.py): the routed block reads
only the experts each token picks, the spec's tables and counts, what is refused. The
conformance suite (tests/test_conformance.py) runs the three MoE families through every
other check on their TINY_CONFIGS."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from llmbuild.artifact import read_manifest
from llmbuild.graph.annotations import MOE, nodes_with
from llmbuild.lowering.moe import EXPERT_SHARDS
from llmbuild.runtime import load
from tests.conformance import LIMITS, make_tiny_model
from tests.test_conformance import prefill, trace

PROMPT = [17, 90, 41]  # 3 tokens: top-2 of 8 leaves >= 2 experts unpicked in every sparse layer


def hf_routing(model, ids: list[int]) -> dict[int, set[int]]:
    """Sparse layer -> the experts HF's routers pick for some token of `ids`."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    sparse = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    k = model.config.num_experts_per_tok
    return {layer: set(torch.topk(logits.softmax(-1), k, dim=-1).indices.flatten().tolist())
            for layer, logits in zip(sparse, out.router_logits)}


def poison(model, layer: int, experts) -> None:
    """NaN into every weight of `experts` in `layer` (HF keeps them stacked in memory)."""
    import torch

    block = model.model.layers[layer].mlp
    with torch.no_grad():
        for e in experts:
            block.experts.gate_up_proj[e] = float("nan")
            block.experts.down_proj[e] = float("nan")


def compile_fp32(hf_dir, out):
    from llmbuild.compile import compile_recipe

    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "r.yaml"
    recipe.write_text(json.dumps({"name": "moe", "model": {"source": str(hf_dir)}, "limits": LIMITS,
                                  "precision": "float32", "engines": []}))
    return compile_recipe(recipe, out_dir=out, quiet=True, verify=False)


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"])
def test_unselected_experts_are_never_computed(arch, tmp_path):
    """HF picks experts for PROMPT; every expert no token picks is set to NaN (in HF's model
    and in the checkpoint we build from). Our logits stay finite and equal HF's, on the
    standard graph and the CPU-lowered one. Control: NaN in one *picked* expert does reach
    our logits (so the poison is in the graph's weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    src = make_tiny_model(arch, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    picked = hf_routing(model, PROMPT)
    n = model.config.num_experts
    unpicked = {layer: sorted(set(range(n)) - p) for layer, p in picked.items()}
    assert picked and all(unpicked.values()), unpicked
    for layer, experts in unpicked.items():
        poison(model, layer, experts)
    assert hf_routing(model, PROMPT) == picked
    with torch.no_grad():
        want = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.isfinite(want).all()
    model.save_pretrained(tmp_path / "poisoned")
    (tmp_path / "poisoned" / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (tmp_path / "poisoned" / "tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())
    art = compile_fp32(tmp_path / "poisoned", tmp_path / "out")
    for lowered in (False, True):
        ours = load(art, backend="onnxruntime", threads=2, cpu_lowering=lowered)
        try:
            got = prefill(ours.executor, PROMPT)
        finally:
            ours.close()
        assert np.isfinite(got).all(), f"lowered={lowered}: an unselected (NaN) expert reached the logits"
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    layer = next(iter(picked))
    poison(model, layer, [min(picked[layer])])
    model.save_pretrained(tmp_path / "control")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "control" / f).write_bytes((src / f).read_bytes())
    ours = load(compile_fp32(tmp_path / "control", tmp_path / "out2"), backend="onnxruntime", threads=2)
    try:
        assert np.isnan(prefill(ours.executor, PROMPT)).any()
    finally:
        ours.close()


def test_routed_block_is_annotated_and_gathers_k_experts(tmp_path):
    """Each sparse layer has one llmbuild.moe block whose stacked weights are only read
    through a Gather by the routed indices; dense layers (decoder_sparse_step) have none."""
    art = compile_fp32(make_tiny_model("Qwen3MoeForCausalLM", tmp_path / "hf"), tmp_path / "out")
    m = read_manifest(art)
    assert m["model"]["moe"] == {"experts": 8, "top_k": 2, "moe_intermediate_size": 32,
                                 "shared_expert_intermediate_size": 0, "normalize_top_k": True, "sparse_layers": [1]}
    graph = onnx.load(str(art / m["graph"]["file"]), load_external_data=False).graph
    blocks = nodes_with(graph, MOE)
    assert [a["layer"] for _, a in blocks] == [1]
    [(_, meta)] = blocks
    assert meta["router"] == "model.layers.1.mlp.gate.weight" and meta["top_k"] == 2
    assert len(meta["expert_weights"]["down"]) == 8
    init = {t.name: list(t.dims) for t in graph.initializer}
    stacked = meta["stacked"]
    assert init[stacked["gate"]] == [8, 64, 32] and init[stacked["down"]] == [8, 32, 64]
    readers = [n for n in graph.node if set(n.input) & set(stacked.values())]
    assert [n.op_type for n in readers] == ["Gather"] * 3
    assert all(n.input[1] == meta["indices"] for n in readers)
    topk = [n for n in graph.node if n.op_type == "TopK"]
    assert len(topk) == 1 and meta["indices"] in topk[0].output


def test_cpu_lowering_fuses_each_routed_block_into_one_moe(tmp_path):
    """The CPU graph runs com.microsoft.MoE (ONNX Runtime 1.32's CPU kernel) per sparse layer,
    with no TopK or expert Gather left; its logits equal the standard graph's."""
    from llmbuild.lowering.cpu import lowered_model_bytes

    art = compile_fp32(make_tiny_model("Qwen2MoeForCausalLM", tmp_path / "hf"), tmp_path / "out")
    lowered = onnx.load_from_string(lowered_model_bytes(art / read_manifest(art)["graph"]["file"])).graph
    fused = [n for n in lowered.node if n.op_type == "MoE" and n.domain == "com.microsoft"]
    assert len(fused) == 2  # layers 0 and 2 (layer 1 is in mlp_only_layers)
    assert {a.name: a for a in fused[0].attribute}["k"].i == 1 * EXPERT_SHARDS  # top-1, each expert sliced
    assert not [n for n in lowered.node if n.op_type in ("TopK", "Gather") and "experts" in "".join(n.input)]
    ids = [5, 9, 200, 31, 77, 140, 18]
    got = []
    for cpu_lowering in (False, True):
        model = load(art, backend="onnxruntime", threads=2, cpu_lowering=cpu_lowering)
        try:
            got.append(prefill(model.executor, ids))
        finally:
            model.close()
    np.testing.assert_allclose(got[1], got[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"])
def test_sliced_experts_equal_the_standard_graph(arch, tmp_path):
    """Every expert split in S slices of its width (llmbuild.lowering.moe, repeated logits,
    k·S picked, fc2 · S): ragged prefills, batched decode steps whose tokens pick different
    experts and a chunk give the standard graph's logits for S = 1, 2, 4 (top-2
    renormalised, top-1 not); greedy picks too."""
    from unittest import mock

    import onnx_ir as ir

    from llmbuild.lowering import moe as moe_lowering
    from llmbuild.lowering.cpu import lower_for_cpu
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    art = compile_fp32(make_tiny_model(arch, tmp_path / "hf"), tmp_path / "out")
    standard = art / read_manifest(art)["graph"]["file"]
    n_layers, top_k = read_manifest(art)["model"]["num_layers"], read_manifest(art)["model"]["moe"]["top_k"]

    def run(graph=None):
        ex = OnnxRuntimeExecutor(standard, num_layers=n_layers, cache_len=LIMITS["max_seq_len"], batch_size=2,
                                 threads=2, cpu_lowering=graph is not None, cpu_graph=graph)
        return trace(ex)

    want = run()
    for shards in (1, 2, 4):
        model = ir.load(str(standard))
        with mock.patch.object(moe_lowering, "EXPERT_SHARDS", shards):
            lower_for_cpu(model)
        moes = [n for n in model.graph if n.op_type == "MoE"]
        assert moes and all(n.attributes["k"].as_int() == top_k * shards for n in moes)
        graph = standard.parent / f"model.cpu.s{shards}.onnx"  # beside model.onnx.data
        ir.save(model, str(graph))
        got = run(graph)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"{shards} slices")
            assert (g.argmax(-1) == w.argmax(-1)).all()


def kernel_layout(gate, up, down, shards):
    """numpy: com.microsoft.MoE's fc1 [S·E, 2I/S, H] (rows g0, u0, g1, u1, ...) and fc2
    [S·E, H, I/S] · S from stacked gate, up [E, H, I] and down [E, I, H]; slice s of expert e
    is kernel expert s·E + e (llmbuild.lowering.moe)."""
    e, h, i = gate.shape
    p = i // shards
    fc1 = np.empty((shards * e, 2 * p, h), np.float32)
    fc2 = np.empty((shards * e, h, p), np.float32)
    for s in range(shards):
        for x in range(e):
            cols = slice(s * p, (s + 1) * p)
            fc1[s * e + x, 0::2] = gate[x][:, cols].T
            fc1[s * e + x, 1::2] = up[x][:, cols].T
            fc2[s * e + x] = down[x][cols].T * np.float32(shards)
    return fc1, fc2


def folded_expert_weights(graph_path, moe_inputs):
    """fc1 and fc2 of every com.microsoft.MoE in `graph_path` as ONNX Runtime computes them
    (the nodes above them as a graph of their own, the MoE nodes' x as its inputs), and the op
    types of the nodes it constant-folds to make each (all inputs initializers, transitively)."""
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(graph_path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    moes = [n for n in model.graph.node if n.op_type == "MoE"]
    xs = {n.input[0] for n in moes}
    order, seen, folded = [], set(), {}

    def visit(value):
        if value in seen or value in inits or value in xs:
            return value in inits
        node = producer[value]
        seen.update(node.output)
        const = [visit(i) for i in node.input if i]
        order.append(node)
        folded[value] = all(const) and node.op_type != "Shape"
        return folded[value]

    def folded_ops(value):
        if value in inits or value in xs:
            return []
        node = producer[value]
        own = [node.op_type] if folded[value] else []
        return own + [op for i in node.input if i for op in folded_ops(i)]

    wanted = [n.input[i] for n in moes for i in (2, 4)]
    for v in wanted:
        visit(v)
    outputs = [helper.make_node("Identity", [v], [f"{v}.out"]) for v in wanted]
    sub = helper.make_graph(order + outputs, "experts",
                            [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in sorted(xs)],
                            [helper.make_tensor_value_info(f"{v}.out", onnx.TensorProto.FLOAT, None) for v in wanted],
                            [t for t in model.graph.initializer if any(t.name in n.input for n in order)])
    path = graph_path.parent / "experts.onnx"  # beside the data file its views read
    onnx.save(helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = session.run(None, {x: moe_inputs[x] for x in xs})
    return list(zip(values[0::2], values[1::2])), [(folded_ops(n.input[2]), folded_ops(n.input[4])) for n in moes]


def test_folded_expert_weights_are_the_kernel_layout(tmp_path):
    """The fc1 / fc2 ONNX Runtime folds for each com.microsoft.MoE equal, bit for bit, a numpy
    construction of the kernel's layout from the stacked experts, for S = 1, 2, 4 slices, with
    the weights read from the artifact's data file (views over its bytes) and from memory
    (Reshape / Concat); from the file, session creation folds one Transpose for fc1 and a
    Mul and a Transpose for fc2 (a Transpose for S = 1), nothing else (each folded node writes
    its output twice: session creation time)."""
    from unittest import mock

    import onnx_ir as ir

    from llmbuild.lowering import moe as moe_lowering
    from llmbuild.lowering.cpu import lower_for_cpu

    art = compile_fp32(make_tiny_model("Qwen3MoeForCausalLM", tmp_path / "hf"), tmp_path / "out")
    standard = art / read_manifest(art)["graph"]["file"]
    for shards in (1, 2, 4):
        for in_memory in (False, True):
            model = ir.load(str(standard))
            metas = [meta for _, meta in nodes_with(list(model.graph), MOE)]
            stacked = [[model.graph.initializers[m["stacked"][p]].const_value.numpy() for p in ("gate", "up", "down")]
                       for m in metas]
            if in_memory:
                for value in model.graph.initializers.values():
                    value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
            with mock.patch.object(moe_lowering, "EXPERT_SHARDS", shards):
                lower_for_cpu(model)
            graph = standard.parent / "model.cpu.test.onnx"
            ir.save(model, str(graph))
            x = {m["input"]: np.zeros((1, 1, m["hidden"]), np.float32) for m in metas}
            got, folded = folded_expert_weights(graph, x)
            assert len(got) == len(metas) > 0
            for (fc1, fc2), weights in zip(got, stacked):
                want1, want2 = kernel_layout(*weights, shards)
                assert fc1.shape == want1.shape and fc2.shape == want2.shape
                assert fc1.tobytes() == want1.tobytes() and fc2.tobytes() == want2.tobytes(), (shards, in_memory)
            if not in_memory:
                fc2_ops = ["Transpose", "Mul"] if shards > 1 else ["Transpose"]
                assert folded == [(["Transpose"], fc2_ops)] * len(metas), shards


def test_gpt_oss_is_refused_with_why(tmp_path):
    """An unregistered MoE users ask for is a UserError saying why, and `llmbuild validate`
    exits non-zero with that message (no traceback)."""
    import subprocess
    import sys

    from llmbuild.errors import UserError
    from llmbuild.models import spec_for

    with pytest.raises(UserError, match="sink logits") as err:
        spec_for({"architectures": ["GptOssForCausalLM"]})
    assert "MixtralForCausalLM" in str(err.value)  # and what is supported
    model = tmp_path / "gpt-oss"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GptOssForCausalLM"], "hidden_size": 64,
                                                   "num_hidden_layers": 2, "num_attention_heads": 4,
                                                   "vocab_size": 256}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "g", "model": {"source": str(model)}}))
    run = subprocess.run([sys.executable, "-m", "llmbuild.cli", "validate", str(recipe)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "sink logits" in run.stderr + run.stdout
    assert "Traceback" not in run.stderr


def test_plan_reports_total_and_active_parameters():
    """Mixtral-8x7B's published figures: 46.7 B parameters, 12.9 B active per token."""
    from llmbuild.plan import format_plan, plan_config

    config = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
              "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768}
    recipe = {"name": "m", "precision": "float16", "engines": [],
              "limits": {"max_batch_size": 1, "max_input_len": 128, "max_seq_len": 1024}}
    p = plan_config(config, recipe)
    assert round(p["parameters"] / 1e9, 1) == 46.7
    moe = p["moe"]
    assert round(moe["active_parameters"] / 1e9, 1) == 12.9
    per_expert = 3 * 4096 * 14336
    assert moe["expert_parameters"] == 8 * 32 * per_expert
    # a decoded token reads the active weights but one embedding row, in fp16
    assert moe["bytes_read_per_decoded_token"] == 2 * (moe["active_parameters"] - 31999 * 4096)
    assert "12.88 B active parameters per token" in format_plan(p)
