"""Automatic bit allocation (`quantization.target`, llmbuild.quantize.allocate) on a tiny
random Llama whose layer-1 o_proj has outlier input channels: the recipe's mistakes at
their lines; the allocation meets its budget and spends more on the outlier linear; more
budget lowers the summed sensitivity; the proxy ranks like the measured KL; compile
applies the allocation as plain overrides and records it; `plan` bounds the size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmbuild.quantize.allocate import (allocate, bisect_budget, bits_range, candidate_bytes, candidate_specs,
                                        graph_slices, input_moments, proxy_costs, sensitivities, single_linear_kl,
                                        spec_key, spec_override)
from llmbuild.quantize.plan import ModuleSpec, resolve_plan
from llmbuild.recipe import load_recipe
from llmbuild.recipe.problems import RecipeError
from tests.tiny import make_tiny_hf

torch = pytest.importorskip("torch")

HIDDEN, LAYERS, INTER = 96, 4, 160
OUTLIER = "model.layers.1.mlp.up_proj.weight"
HEAD = "name: q\nmodel: {source: ./m}\n"


def _problems(tmp_path, body: str, config: dict | None = None) -> dict[str, str]:
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + body)
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config or {}))
    with pytest.raises(RecipeError) as e:
        load_recipe(path, check_model=config is not None)
    return {p.path: f"{p.line}: {p.message}" for p in e.value.problems}


def test_target_mistakes_are_reported_at_their_lines(tmp_path):
    found = _problems(tmp_path, "quantization:\n  target: {bits_per_weight: 4.5, max_perplexity_increase: 0.1}\n")
    assert found == {"quantization.target": "4: a target needs exactly one of bits_per_weight (e.g. 4.5) or"
                                            " max_perplexity_increase (e.g. 0.05); found both"}
    assert _problems(tmp_path, "quantization:\n  target: {samples: 4}\n")["quantization.target"].endswith(
        "found neither")
    assert _problems(tmp_path, "quantization:\n  calibration: {samples: 4}\n")["quantization"].startswith(
        "4: quantization needs `weights` (e.g. {scheme: int4}) or `target`")
    found = _problems(tmp_path, "quantization:\n  weights: {scheme: int4}\n  target: {bits_per_weight: 5}\n")
    assert found == {"quantization.weights.scheme": "4: target chooses every linear's scheme; it conflicts with"
                                                    " weights.scheme int4: remove one of them"}
    found = _problems(tmp_path, "quantization:\n  overrides: [{match: x, scheme: int8}]\n"
                                "  target: {max_perplexity_increase: 0.1}\n")
    assert found["quantization.overrides"].startswith("4: target chooses every linear's scheme; overrides cannot")
    found = _problems(tmp_path, "quantization:\n  target: {bits_per_weight: 0}\n")
    assert found == {"quantization.target.bits_per_weight": "4: expected a positive number, found 0 (integer)"}
    found = _problems(tmp_path, "quantization:\n  target: {bits_per_weight: 17}\n")
    assert found == {"quantization.target.bits_per_weight": "4: expected a number <= 16.0, found 17 (integer)"}
    found = _problems(tmp_path, "quantization:\n  target: {max_perplexity_increase: '5%'}\n")
    assert found == {"quantization.target.max_perplexity_increase": "4: expected a number, found '5%' (string)"}


def test_unreachable_budget_is_refused_at_validate(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False, "num_hidden_layers": 2,
              "max_position_embeddings": 4096, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
    # float32 scales: the 64-row linears are smallest as int4 g64 (4 + 32/64 bits per weight), the
    # 128-row down_proj as int4 g128 (4.25); the whole model's smallest allocation: 4.455
    found = _problems(tmp_path, "precision: float32\nquantization:\n  target: {bits_per_weight: 4.4}\n", config)
    assert found == {"quantization.target.bits_per_weight":
                     "5: bits_per_weight 4.4 is below the smallest allocation of this model's linears, 4.455 bits"
                     " per weight (every linear at its smallest setting, codes + scales); expected at least 4.455"}
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + "precision: float32\nquantization:\n  target: {bits_per_weight: 4.5}\n")
    assert load_recipe(path).to_dict()["quantization"]["target"]["bits_per_weight"] == 4.5


def test_candidates_are_every_uncalibrated_registry_setting():
    keys = [spec_key(c) for c in candidate_specs()]
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(["int8", "int8-g32", "int8-g64", "int8-g128", "int8-g32-asym", "int8-g64-asym",
                                   "int8-g128-asym", "int4-g32-sym", "int4-g32-asym", "int4-g64-sym", "int4-g64-asym",
                                   "int4-g128-sym", "int4-g128-asym", "none",
                                   # int4's 8-bit scale codes (scale_bits: 8)
                                   *(f"int4-g{g}-{k}-s8" for g in (32, 64, 128) for k in ("sym", "asym"))])
    for c in candidate_specs():  # each key names its setting: an override with its keys resolves to it
        ov = {"match": "x", **spec_override(c)}
        assert resolve_plan({"weights": {"scheme": "none"}, "overrides": [ov]}, ["x.weight"], 1)["x.weight"] == c


def test_greedy_allocation_meets_the_budget_and_beats_every_uniform_setting():
    rng = np.random.default_rng(0)
    cands = candidate_specs()
    shapes = {f"w{i}": (int(rng.choice([64, 96, 576])), int(rng.choice([64, 160]))) for i in range(12)}
    sizes = candidate_bytes(shapes, 2, cands)
    # cost falls with bytes (plus noise), scaled per linear
    costs = {n: {c: float(rng.uniform(0.5, 2) * 2.0 ** (-sizes[n][c] / (shapes[n][0] * shapes[n][1]) * 4)
                          if c.scheme != "none" else 0.0) for c in cands} for n in shapes}
    params = sum(k * n for k, n in shapes.values())
    lo, hi = bits_range(shapes, 2)
    prev = None
    for bits in np.linspace(lo, hi, 9):
        alloc = allocate(costs, sizes, bits * params / 8)
        used = sum(sizes[n][s] for n, s in alloc.items())
        assert used <= bits * params / 8
        total = sum(costs[n][s] for n, s in alloc.items())
        for c in cands:  # any single setting for every linear that fits costs at least as much
            if sum(sizes[n][c] for n in shapes) <= bits * params / 8:
                assert total <= sum(costs[n][c] for n in shapes) + 1e-12
        if prev is not None:
            assert total <= prev + 1e-12
        prev = total
    assert prev == 0.0  # at the top of the range every linear keeps its float weights
    with pytest.raises(ValueError, match="over the budget"):
        allocate(costs, sizes, (lo - 0.01) * params / 8)


def test_bisection_finds_the_cheapest_passing_budget():
    calls = []

    def passes(b):
        calls.append(b)
        return b >= 5.3

    assert 5.3 <= bisect_budget(4.0, 16.0, passes, steps=12, resolution=0.01) <= 5.31
    assert calls[0] == 4.0 and len(calls) <= 13
    assert bisect_budget(4.0, 16.0, lambda b: True) == 4.0


# -- a tiny model with one sensitive linear ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("alloc")
    model_dir = make_tiny_hf(root / "hf", hidden=HIDDEN, num_heads=6, num_kv_heads=2, layers=LAYERS,
                             intermediate=INTER, vocab=256, tie=False, seed=0)
    [f] = model_dir.glob("*.safetensors")
    sd = load_file(f)
    w = sd[OUTLIER].clone()  # [out, in]: one outlier input channel per block of 32
    w[:, ::32] *= 20.0
    sd[OUTLIER] = w
    save_file(sd, f, metadata={"format": "pt"})
    return root, model_dir


def _recipe(root, name, model_dir, target, **verify):
    recipe = {"name": name, "model": {"source": str(model_dir)}, "precision": "float32",
              "limits": {"max_batch_size": 1, "max_input_len": 64, "max_seq_len": 128}, "engines": [],
              "quantization": {"target": target, "calibration": {"seq_len": 64, "seed": 0}},
              "verify": {"eval_tokens": 1024, **verify}}
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture(scope="module")
def measured(tiny):
    """The float32 reference graph of the tiny model, its linears, E[x²] and sensitivities."""
    from llmbuild.graph.builder import SOURCE_LOADER
    from llmbuild.models.build import build_model
    from llmbuild.quantize.graph import linear_weights
    from llmbuild.quantize.stage import reference_graph
    from llmbuild.source import open_source

    root, model_dir = tiny
    source = open_source(model_dir)
    work = root / "work"
    ref = reference_graph(source, work, 128)
    model = build_model(source, "float32", 128)
    lin = linear_weights(model)
    loaders = {n: v.meta[SOURCE_LOADER] for n, v in lin.items()}
    shapes = {n: tuple(int(d) for d in v.shape) for n, v in lin.items()}
    tokens = np.random.default_rng(0).integers(5, 256, size=(4, 64))
    slices = graph_slices(ref)
    cands = candidate_specs()
    weights = lambda n: loaders[n]()  # noqa: E731
    costs, report = sensitivities(slices, tokens, weights, list(lin), cands, np.float32, kv_heads=2,
                                  head_dim=HIDDEN // 6, work_dir=ref.parent)
    moments = input_moments(slices, tokens, list(lin), kv_heads=2, head_dim=HIDDEN // 6, work_dir=ref.parent)
    return {"slices": slices, "loaders": loaders, "shapes": shapes, "tokens": tokens, "costs": costs,
            "cands": cands, "moments": moments, "proxy": proxy_costs(weights, moments, cands, np.float32),
            "report": report}


def test_moments_are_the_mean_squared_linear_inputs(measured, tiny):
    """E[x²] of layer 0's q/k/v input = the mean square of HF's input_layernorm output."""
    from tests.tiny import load_tiny_hf

    _, model_dir = tiny
    hf = load_tiny_hf(model_dir)
    seen = {}

    def keep_input(module, args, out):
        seen["x"] = args[0].detach().numpy()

    hook = hf.model.layers[0].self_attn.q_proj.register_forward_hook(keep_input)
    with torch.no_grad():
        hf(torch.as_tensor(measured["tokens"]))
    hook.remove()
    x = seen["x"].reshape(-1, HIDDEN).astype(np.float64)
    np.testing.assert_allclose(measured["moments"]["model.layers.0.self_attn.q_proj.weight"], (x * x).mean(axis=0),
                               rtol=1e-4)


def test_outlier_linear_gets_more_bits_and_budget_lowers_sensitivity(measured):
    costs, shapes, cands = measured["costs"], measured["shapes"], measured["cands"]
    sizes = candidate_bytes(shapes, 4, cands)
    params = sum(k * n for k, n in shapes.values())
    lo, hi = bits_range(shapes, 4)
    totals = []
    for bits in (lo, 5.5, 6.5, 8.0, 10.0, hi):
        alloc = allocate(costs, sizes, bits * params / 8)
        assert sum(sizes[n][s] for n, s in alloc.items()) <= bits * params / 8
        totals.append(sum(costs[n][s] for n, s in alloc.items()))
    assert all(b <= a for a, b in zip(totals, totals[1:])) and totals[-1] == 0.0 < totals[2] < totals[0]
    alloc = allocate(costs, sizes, 5.5 * params / 8)
    bits_of = {n: 8 * sizes[n][s] / (shapes[n][0] * shapes[n][1]) for n, s in alloc.items()}
    other = OUTLIER.replace("layers.1", "layers.0")  # the same linear of the other layer
    assert spec_key(alloc[OUTLIER]) in ("int8", "none") and spec_key(alloc[other]).startswith("int4"), bits_of
    assert bits_of[OUTLIER] > bits_of[other]
    # its int4 rounding costs more than that of the same linear in any other layer
    g32 = ModuleSpec("int4", group_size=32)
    peers = [n for n in shapes if n != OUTLIER and n.endswith(".mlp.up_proj.weight")]
    assert len(peers) == LAYERS - 1 and costs[OUTLIER][g32] > 2 * max(costs[n][g32] for n in peers)


def test_sensitivities_rank_like_the_kl_of_quantizing_one_linear(measured):
    """Spearman rank correlation with the logits' KL when that linear alone is quantized, over
    every (linear, int scheme) pair: the raw proxy's is poor across roles (q/k/gate/up read
    normalized inputs, v/o/down feed the residual), the gain-scaled costs' is not — also for
    layer 1, whose gains are interpolated between the probed layers 0 and 2."""
    cands = [c for c in measured["cands"] if c.scheme != "none"]
    names = list(measured["shapes"])
    kl = single_linear_kl(measured["slices"], measured["tokens"], lambda n: measured["loaders"][n](), names,
                          {n: cands for n in names}, np.float32)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731

    def rho(costs, subset=names):
        est = [costs[n][c] for n in subset for c in cands]
        return np.corrcoef(rank(est), rank([kl[n][c] for n in subset for c in cands]))[0, 1]

    assert measured["report"]["gain_probes"] == 7 * 3 + 1  # 7 roles x layers 0, 2, 3 + lm_head
    assert rho(measured["proxy"]) < 0.6
    assert rho(measured["costs"]) > 0.9
    assert rho(measured["costs"], [n for n in names if ".layers.1." in n]) > 0.9


def test_compile_applies_and_records_the_allocation(tiny):
    from llmbuild.compile import compile_recipe
    from llmbuild.plan import plan_recipe

    root, model_dir = tiny
    path = _recipe(root, "auto-bits", model_dir, {"bits_per_weight": 5.5, "samples": 4})
    art = compile_recipe(path, out_dir=root / "out", quiet=True, cache=False)
    m = json.loads((art / "manifest.json").read_text())
    q = m["quantization"]
    a = q["allocation"]
    assert a["target"] == {"bits_per_weight": 5.5, "samples": 4, "algorithm": "rtn"}
    assert a["bits_per_weight"] <= 5.5 and a["linear_weight_bytes"] == q["linear_weight_bytes"]
    assert 8 * q["linear_weight_bytes"] / a["linear_parameters"] == pytest.approx(a["bits_per_weight"], abs=1e-4)
    assert a["modules"][OUTLIER[:-len(".weight")]] in ("int8", "none")
    # the allocation is plain overrides: every module's label in the summary follows them
    labels = q["summary"]["modules"]
    base = spec_key(ModuleSpec(**{k: v for k, v in q["weights"].items()}))
    assert len(q["overrides"]) == sum(1 for v in a["modules"].values() if v != base) > 0
    assert {o["match"] for o in q["overrides"]} == {k for k, v in a["modules"].items() if v != base}
    assert labels[OUTLIER[:-len(".weight")]].startswith(("int8", "none"))
    gate = m["verification"]
    assert gate["kind"] == "accuracy" and a["measured"]["kl_divergence"] == gate["kl_divergence"] > 0
    [p] = plan_recipe(path)
    t = p["quantization_target"]
    assert t["linear_parameters"] == a["linear_parameters"]
    assert t["linear_bytes_min"] <= a["linear_weight_bytes"] <= t["linear_bytes_max"]
    assert p["quantization"] == "auto ≤ 5.5 bits per weight"


def test_calibrated_algorithm_quantizes_the_allocated_int4_linears(tiny):
    """target.algorithm gptq: the allocation chosen without int4's 8-bit scale codes (GPTQ
    takes none), its int4 linears quantized by GPTQ on the calibration text, which lowers
    the logits' KL on the held-out text against the same allocation round to nearest;
    int8 stays round-to-nearest."""
    from llmbuild.compile import compile_recipe

    root, model_dir = tiny
    manifests = {}
    path = _recipe(root, "auto-gptq", model_dir, {"bits_per_weight": 5.0, "samples": 4, "algorithm": "gptq"})
    art = compile_recipe(path, out_dir=root / "out", quiet=True, cache=False)
    manifests["gptq"] = json.loads((art / "manifest.json").read_text())
    gptq = manifests["gptq"]["quantization"]
    assert not [c for c in gptq["allocation"]["candidates"] if c.endswith("-s8")]
    # the same allocation, round to nearest: the allocated sections with algorithm rtn
    recipe = json.loads(path.read_text())
    recipe["name"] = "auto-gptq-as-rtn"
    recipe["quantization"] = {"weights": {**gptq["weights"], "algorithm": "rtn"},
                              "overrides": [{**o, "algorithm": "rtn"} for o in gptq["overrides"]],
                              "calibration": recipe["quantization"]["calibration"]}
    (root / "auto-gptq-as-rtn.yaml").write_text(json.dumps(recipe))
    art = compile_recipe(root / "auto-gptq-as-rtn.yaml", out_dir=root / "out", quiet=True, cache=False)
    manifests["rtn"] = json.loads((art / "manifest.json").read_text())
    rtn = manifests["rtn"]["quantization"]
    assert rtn["summary"]["modules"] == {m: v.removesuffix(" gptq") for m, v in gptq["summary"]["modules"].items()}
    labels = gptq["summary"]["modules"]
    int4 = [m for m, k in gptq["allocation"]["modules"].items() if k.startswith("int4")]
    assert int4 and all(labels[m].endswith(" gptq") for m in int4)
    assert all(not v.endswith(" gptq") for m, v in labels.items() if m not in int4)
    assert "calibration" in gptq and "calibration" not in rtn
    kl = {k: manifests[k]["verification"]["kl_divergence"] for k in manifests}
    assert kl["gptq"] < kl["rtn"], kl


def test_perplexity_target_keeps_the_cheapest_passing_trial(tiny):
    from llmbuild.compile import compile_recipe

    root, model_dir = tiny
    path = _recipe(root, "auto-ppl", model_dir, {"max_perplexity_increase": 0.002, "samples": 4})
    art = compile_recipe(path, out_dir=root / "out", quiet=True, cache=False)
    m = json.loads((art / "manifest.json").read_text())
    a = m["quantization"]["allocation"]
    trials = a["search"]["trials"]
    assert trials and all(t["passed"] == (t["perplexity_increase"] <= 0.002) for t in trials)
    passing = [t for t in trials if t["passed"]]
    if passing:  # the kept allocation is the cheapest measured one that passed
        best = min(passing, key=lambda t: t["bits_per_weight"])
        assert a["bits_per_weight"] == best["bits_per_weight"]
        # the fed-weights measurement is the artifact's own (float32 graph, same text)
        assert m["verification"]["perplexity_increase"] == pytest.approx(best["perplexity_increase"], abs=1e-5)
    else:  # none did: the linears stay unquantized
        assert set(a["modules"].values()) == {"none"}
