"""Tensor parallelism: per-rank graphs checked numerically on the CPU, per-rank engines.

The N rank graphs run together on ONNX Runtime (`llmbuild.parallel.simulate`: each
all-reduce point is a Sum over the ranks) and must give the logits of the unsharded
graph (tp = 1) and of HF transformers. Engines with the ALL_REDUCE layers are really
built with TensorRT-RTX; running them needs N GPUs (the `gpu` test at the end).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from llmbuild.artifact import read_manifest
from llmbuild.errors import UserError
from llmbuild.parallel.hints import ShardPlan, tp_problems
from llmbuild.runtime.executors.base import StepInputs
from tests.tiny import load_tiny_hf, make_tiny_hf

LIMITS = {"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 128}
PROMPTS = [[1, 40, 71, 72, 83, 14, 90, 33, 7], [1, 55, 56, 9]]


def compile_tp(model_dir: Path, out: Path, name: str, tp: int | None, *, precision: str = "float32",
               engines: tuple[str, ...] = ()) -> Path:
    from llmbuild.compile import compile_recipe

    out.mkdir(parents=True, exist_ok=True)
    recipe = out / f"{name}.yaml"
    parallel = "" if tp is None else f"parallel: {{tp: {tp}}}\n"
    recipe.write_text(f"name: {name}\nmodel:\n  source: {model_dir}\nprecision: {precision}\n"
                      f"limits: {json.dumps(LIMITS)}\nengines: {json.dumps(list(engines))}\n{parallel}")
    return compile_recipe(recipe, out_dir=out, quiet=True, verify=False)


def run_steps(executor) -> list[np.ndarray]:
    """Batched prefill of two right-padded prompts, then three decode steps."""
    executor.reset(2)
    s = max(map(len, PROMPTS))
    ids = np.zeros((2, s), np.int64)
    for b, p in enumerate(PROMPTS):
        ids[b, : len(p)] = p
    pos = np.tile(np.arange(s), (2, 1))
    lengths = np.array([len(p) for p in PROMPTS])
    out = [executor.forward(StepInputs(ids, pos, np.zeros(2, np.int64), np.arange(s)[None].repeat(2, 0)))]
    nxt = out[0][np.arange(2), lengths - 1].argmax(-1)
    for _ in range(3):
        step = StepInputs(nxt[:, None], lengths[:, None], lengths.copy(), np.zeros((2, 1), np.int64))
        out.append(executor.forward(step))
        nxt, lengths = out[-1][:, 0].argmax(-1), lengths + 1
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny Llama (4 heads, 2 KV heads, MLP 128) compiled at tp = 1, 2 and 4 (fp32)."""
    root = tmp_path_factory.mktemp("parallel")
    model_dir = make_tiny_hf(root / "hf", num_heads=4, num_kv_heads=2, intermediate=128, seed=3)
    arts = {tp: compile_tp(model_dir, root / "out", f"tp{tp}", tp) for tp in (1, 2, 4)}
    return {"dir": model_dir, "root": root, **arts}


def _executor(artifact: Path):
    import llmbuild

    return llmbuild.load(artifact, backend="onnxruntime").executor


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_logits_equal_tp1(tiny, tp):
    ref = run_steps(_executor(tiny[1]))
    sim = _executor(tiny[tp])
    assert sim.name == "onnxruntime-tp" and sim.tp == tp
    got = run_steps(sim)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    assert np.abs(ref[0]).max() > 0.1  # the logits are not trivially small


def test_tensor_parallel_logits_equal_hf(tiny):
    import torch

    hf = load_tiny_hf(tiny["dir"])
    sim = _executor(tiny[4])
    for prompt in PROMPTS:
        sim.reset(1)
        n = len(prompt)
        ar = np.arange(n)[None]
        ours = sim.forward(StepInputs(np.array([prompt]), ar, np.zeros(1, np.int64), ar))[0]
        with torch.no_grad():
            theirs = hf(torch.tensor([prompt])).logits[0].numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_kv_heads_fewer_than_tp_are_replicated(tiny):
    m = read_manifest(tiny[4])["parallel"]
    assert m["per_rank"] == {"num_attention_heads": 1, "num_key_value_heads": 1, "intermediate_size": 32,
                             "head_dim": 16}
    assert m["notes"] and "num_key_value_heads=2 < tp=4" in m["notes"][0]
    # ranks 0,1 hold KV head 0 and ranks 2,3 KV head 1: equal k_proj rows in pairs
    import onnx.numpy_helper as nh

    def k_proj(rank):
        model = onnx.load(str(tiny[4] / f"rank{rank}/model.onnx"))
        init = {t.name: t for t in model.graph.initializer}
        return nh.to_array(init["model.layers.0.self_attn.k_proj.weight"], base_dir=str(tiny[4] / f"rank{rank}"))

    ks = [k_proj(r) for r in range(4)]
    assert ks[0].shape == (64, 16)
    np.testing.assert_array_equal(ks[0], ks[1])
    np.testing.assert_array_equal(ks[2], ks[3])
    assert not np.array_equal(ks[0], ks[2])


def test_manifest_records_ranks_files_and_collective_plan(tiny):
    m = read_manifest(tiny[2])
    par = m["parallel"]
    assert par["tp"] == 2 and [r["graph"] for r in par["ranks"]] == ["rank0/model.onnx", "rank1/model.onnx"]
    assert m["graph"]["ranks"] == ["rank0/model.onnx", "rank1/model.onnx"]
    assert [c["name"] for c in par["collectives"]] == [f"allreduce.{k}" for k in range(4)]
    assert [c["weight"].rsplit(".", 1)[0] for c in par["collectives"]] == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    for r in range(2):
        model = onnx.load(str(tiny[2] / f"rank{r}/model.onnx"), load_external_data=False)
        markers = [n for n in model.graph.node if n.op_type == "Identity" and n.name.startswith("allreduce.")]
        assert [n.name for n in markers] == [c["name"] for c in par["collectives"]]
        # the marker follows the MatMul of the row-parallel weight named in the plan
        producers = {o: n for n in model.graph.node for o in n.output}
        for marker, c in zip(markers, par["collectives"]):
            matmul = producers[marker.input[0]]
            assert matmul.op_type == "MatMul" and matmul.input[1] == c["weight"]
    assert not (tiny[2] / "model").exists()


def test_weight_bytes_per_rank_are_a_share_plus_replicated(tiny):
    one = tiny[1] / "model" / "model.onnx.data"
    for tp in (2, 4):
        par = read_manifest(tiny[tp])["parallel"]
        wb = par["weight_bytes"]
        # attention/MLP matrices: 2 layers x (q,k,v,o 64x64-ish + 3 MLP 64x128) in fp32
        assert wb["sharded"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) * 4
        assert wb["replicated"] == (2 * 256 * 64 + 5 * 64) * 4  # embed, lm_head, 5 norms
        kv = 2 * 2 * 64 * 32 * 4  # k/v weights of both layers
        # at tp=4 each rank holds 1 of the 2 KV heads (1/2 of k/v, not 1/4)
        extra = 0 if tp == 2 else kv // 2 - kv // 4
        assert wb["per_rank"] == [wb["sharded"] // tp + wb["replicated"] + extra] * tp
        # the rank files: the tp = 1 file minus what the rank does not hold
        for r in par["ranks"]:
            size = (tiny[tp] / r["weights"]).stat().st_size
            assert size == r["weights_file_bytes"] == one.stat().st_size - wb["sharded"] + wb["per_rank"][0] - wb[
                "replicated"]


def test_plan_shows_the_weight_bytes_per_rank_of_the_artifact(tiny):
    from llmbuild.plan import plan_config
    from llmbuild.source import read_config

    config = read_config(tiny["dir"])
    for tp in (1, 2, 4):
        m = read_manifest(tiny[tp])
        planned = plan_config(config, m["recipe"])["weight_bytes_per_rank"]
        if tp == 1:
            assert planned == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) * 4 + (2 * 256 * 64 + 5 * 64) * 4
        else:
            assert planned == m["parallel"]["weight_bytes"]["per_rank"][0]


def test_rank_config_is_read_by_the_spec_as_the_rank_graph_needs():
    """A rank's config (ShardPlan.rank_config) gives, through the architecture spec, the
    rank's head, KV-head and MLP counts with head_dim unchanged."""
    from llmbuild.models import spec_for
    from llmbuild.parallel.hints import ShardPlan

    for config, tp, want in (
        ({"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "intermediate_size": 1536}, 3,
         (3, 1, 64, 512)),
        ({"num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 96, "head_dim": 32}, 2, (2, 2, 32, 48)),
        ({"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 64}, 4,
         (2, 1, 8, 16)),
    ):
        full = dict(config, num_hidden_layers=1, vocab_size=8, architectures=["LlamaForCausalLM"])
        spec = spec_for(full)
        d = spec.dims(ShardPlan.for_config(full, tp).rank_config(full))
        assert (d.heads, d.kv_heads, d.head_dim, d.intermediate) == want


def test_slot_ranges_match_tp1(tiny):
    """A prefill of slot 1 alone (the scheduler's prefill pass) leaves slot 0 untouched."""
    ref, sim = _executor(tiny[1]), _executor(tiny[2])
    for ex in (ref, sim):
        ex.reset(2)
    ids = np.array([PROMPTS[0]])
    ar = np.arange(ids.shape[1])[None]
    step = StepInputs(ids, ar, np.zeros(1, np.int64), ar)
    a, b = sim.forward(step, 1), ref.forward(step, 1)
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    assert all(not buf[0].any() and buf[1].any() for buf in sim.cache_arrays())


def test_tp1_output_is_unchanged_by_the_parallel_section(tiny):
    explicit = compile_tp(tiny["dir"], tiny["root"] / "explicit", "tp1", 1)
    for f in ("model.onnx", "model.onnx.data"):
        assert (explicit / "model" / f).read_bytes() == (tiny[1] / "model" / f).read_bytes()
    assert "parallel" not in read_manifest(tiny[1])


def test_shard_plan_slices_reassemble_the_weight(tiny):
    from llmbuild.parallel.sharder import RankSource
    from llmbuild.source import open_source

    with open_source(tiny["dir"]) as source:
        plan = ShardPlan.for_config(source.config, 2)
        for name, dim in [("model.layers.1.self_attn.q_proj.weight", 0), ("model.layers.1.self_attn.o_proj.weight", 1),
                          ("model.layers.0.mlp.down_proj.weight", 1), ("model.layers.0.mlp.up_proj.weight", 0)]:
            parts = [RankSource(source, plan, r).load(name) for r in range(2)]
            np.testing.assert_array_equal(np.concatenate(parts, axis=dim), source.load(name))
            assert RankSource(source, plan, 1).info(name).shape == parts[1].shape
        norm = "model.layers.0.input_layernorm.weight"
        np.testing.assert_array_equal(RankSource(source, plan, 1).load(norm), source.load(norm))


def test_tp_that_does_not_divide_is_rejected_naming_the_numbers(tiny, tmp_path):
    from llmbuild.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel:\n  source: {tiny['dir']}\nparallel:\n  tp: 3\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    text = str(e.value)
    assert "r.yaml:5:7: parallel.tp: tp=3 does not divide num_attention_heads=4" in text
    assert "tp=3 neither divides num_key_value_heads=2 nor is a multiple of it" in text
    assert "tp values that fit this model: 1, 2, 4" in text
    # heads 6 / KV heads 2 / MLP 96: tp=3 splits the heads, not the KV heads (3 is no multiple of 2)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 48, "intermediate_size": 96,
              "num_hidden_layers": 1, "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 64}
    problems, _ = tp_problems(config, 3)
    assert problems == ["tp=3 neither divides num_key_value_heads=2 nor is a multiple of it (KV heads would be "
                        "replicated); tp values that fit this model: 1, 2, 6"]
    assert tp_problems(dict(config, intermediate_size=99), 2)[0] == [
        "tp=2 does not divide intermediate_size=99; tp values that fit this model: 1"]
    with pytest.raises(UserError, match="parallel.tp=4 cannot shard"):
        ShardPlan.for_config(dict(config, intermediate_size=99), 4).check()


def compile_quantized_tp(model_dir: Path, out: Path, name: str, tp: int, weights: dict, verify=False) -> Path:
    from llmbuild.compile import compile_recipe

    out.mkdir(parents=True, exist_ok=True)
    recipe = out / f"{name}.yaml"
    recipe.write_text(json.dumps({
        "name": name, "model": {"source": str(model_dir)}, "precision": "float32", "limits": LIMITS,
        "engines": [], "parallel": {"tp": tp},
        "quantization": {"weights": weights, "calibration": {"samples": 4, "seq_len": 64}},
        "verify": {"eval_tokens": 512}}))
    return compile_recipe(recipe, out_dir=out, quiet=True, verify=verify)


@pytest.mark.parametrize("weights", [{"scheme": "int4", "group_size": 32}, {"scheme": "int8"},
                                     {"scheme": "int4", "group_size": 32, "algorithm": "awq"}],
                         ids=["int4-g32", "int8", "int4-awq"])
def test_quantized_tensor_parallel_equals_quantized_tp1(tiny, weights):
    """Quantization composes with tensor parallelism: rank r holds its slice (whole groups)
    of the tp = 1 codes and scales, so simulated tp = 2 gives the quantized tp = 1 logits."""
    root = tiny["root"] / "quantized"
    label = "-".join(str(v) for v in weights.values())
    one = compile_quantized_tp(tiny["dir"], root, f"q1-{label}", 1, weights, verify=True)
    two = compile_quantized_tp(tiny["dir"], root, f"q2-{label}", 2, weights, verify=True)
    m, m1 = read_manifest(two), read_manifest(one)
    assert m["parallel"]["tp"] == 2 and m["quantization"]["summary"] == m1["quantization"]["summary"]
    # the accuracy gate ran on all ranks together (rank 0 alone computes partial sums)
    assert m["verification"]["kind"] == "accuracy" and m["verification"]["passed"]
    for key in ("perplexity", "kl_divergence", "top1_agreement"):
        assert m["verification"][key] == pytest.approx(m1["verification"][key], rel=1e-3, abs=1e-5), key
    for r in m["parallel"]["ranks"]:
        ops = {n.op_type for n in onnx.load(str(two / r["graph"]), load_external_data=False).graph.node}
        assert "DequantizeLinear" in ops
    import llmbuild

    # tp = 1's standard graph (the CPU lowering's int8-activation MatMulNBits would differ)
    ref = run_steps(llmbuild.load(one, backend="onnxruntime", cpu_lowering=False).executor)
    sim = run_steps(_executor(two))
    for a, b in zip(sim, ref):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)


def test_tp_int4_groups_that_straddle_a_rank_are_refused(tiny, tmp_path):
    """o_proj's input rows split 32 + 32 at tp = 2: int4 groups of 64 would straddle ranks."""
    with pytest.raises(UserError, match=r"o_proj.weight: tensor-parallel rank 0 holds input rows 0\.\.32 of 64, "
                                        r"which do not start and end on whole int4 groups of 64"):
        compile_quantized_tp(tiny["dir"], tmp_path, "straddle", 2, {"scheme": "int4", "group_size": 64})


@pytest.fixture(scope="module")
def tp2_engines(tiny):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    return compile_tp(tiny["dir"], tiny["root"] / "engines", "tp2e", 2, precision="float16",
                      engines=("tensorrt-rtx",))


def test_per_rank_engines_carry_the_collective_plan(tp2_engines):
    m = read_manifest(tp2_engines)
    plan = [c["name"] for c in m["parallel"]["collectives"]]
    engines = m["engines"]
    assert [e["rank"] for e in engines] == [0, 1]
    assert [Path(e["file"]).name.rsplit("-", 1)[1] for e in engines] == ["rank0.engine", "rank1.engine"]
    for e in engines:
        assert e["num_ranks"] == 2
        assert [c["name"] for c in e["collectives"]] == plan
        assert all(c["type"] == "DIST_COLLECTIVE" and c["num_ranks"] == 2 and c["consumers"] == 1
                   for c in e["collectives"])
        blob = (tp2_engines / e["file"]).read_bytes()
        assert all(name.encode() in blob for name in plan)  # the layers are in the serialized engine
        # the rank engine's KV cache has the rank's KV heads (2 / 2 = 1)
        cache = next(t for t in e["io"] if t["name"] == "past_key.0")
        assert cache["shape"][1] == 1
        assert not any(t["name"].startswith("allreduce") for t in e["io"])


def test_collective_layers_replace_the_markers_in_the_network(tp2_engines):
    import tensorrt_rtx as trt

    from llmbuild.engine.build import parse_onnx
    from llmbuild.engine.collectives import collectives_for

    path = tp2_engines / "rank1" / "model.onnx"
    parsed = parse_onnx(trt, path, cache_len=LIMITS["max_seq_len"])
    entry = collectives_for(parsed, path)
    net = parsed.network
    layers = [net.get_layer(i) for i in range(net.num_layers)]
    dist = [layer for layer in layers if layer.type == trt.LayerType.DIST_COLLECTIVE]
    assert [d.name for d in dist] == [c["name"] for c in entry["collectives"]] == [f"allreduce.{k}" for k in range(4)]
    assert entry["rank"] == 1 and entry["num_ranks"] == 2
    for d in dist:
        assert d.num_ranks == 2
        out = d.get_output(0).name
        users = [layer for layer in layers for j in range(layer.num_inputs)
                 if layer.get_input(j) is not None and layer.get_input(j).name == out]
        assert [u.type for u in users] == [trt.LayerType.ELEMENTWISE]  # the residual Add
    markers = {f"allreduce.{k}.unreduced" for k in range(4)}
    assert not any(layer.get_input(j) is not None and layer.get_input(j).name in markers
                   for layer in layers for j in range(layer.num_inputs))


def test_smollm2_tp3_greedy_equals_tp1(smollm2_artifact, tmp_path_factory):
    """9 heads / 3 KV heads / MLP 1536 over 3 ranks: 3 query heads, 1 KV head, 512 MLP each."""
    import llmbuild
    from llmbuild.compile import compile_recipe
    from tests.conftest import ROOT

    out = tmp_path_factory.mktemp("smollm2-tp3")
    tp3 = compile_recipe(ROOT / "recipes" / "smollm2-135m-instruct.yaml",
                         ["~engines", "name=smollm2-tp3", "parallel.tp=3", "limits.max_input_len=128", "limits.max_seq_len=256"], out,
                         quiet=True, verify=False)
    par = read_manifest(tp3)["parallel"]
    assert par["per_rank"] == {"num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 512,
                               "head_dim": 64}
    assert len(par["collectives"]) == 60
    prompt = "What is the capital of France?"
    texts = []
    for artifact in (smollm2_artifact, tp3):
        model = llmbuild.load(artifact, backend="onnxruntime")
        g = model.generate(prompt, max_new_tokens=24, chat=True)[0]
        model.close()
        texts.append((g.token_ids, g.text))
    assert texts[1][0] == texts[0][0]
    assert "Paris" in texts[1][1]


@pytest.mark.gpu
def test_tp2_engines_generate_on_two_gpus(tp2_engines):  # pragma: no cover - needs 2 GPUs
    from llmbuild.runtime.executors.tensor_parallel import gpu_count

    if gpu_count() < 2:
        pytest.skip("needs 2 NVIDIA GPUs (tensor parallel engines run one rank per GPU with NCCL)")
    import llmbuild

    gpu = llmbuild.load(tp2_engines, backend="tensorrt")
    cpu = llmbuild.load(tp2_engines, backend="onnxruntime")
    a = run_steps(gpu.executor)
    b = run_steps(cpu.executor)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=0.05)
    gpu.close()
