"""GGUF input of the mixture-of-experts families (llama.cpp `qwen2moe`, `qwen3moe`, and `llama`
with experts for Mixtral): tiny HF
models converted by llama.cpp's converter (tests/llama_cpp.py; the session fixture fetches
it), whose stacked `ffn_<proj>_exps` tensors our source serves per expert
(llmbuild.source.split.StackedExpertsSource): tensor for tensor against transformers' own
GGUF loading (which keeps the experts stacked, gate and up fused), and the compiled GGUF's
logits against HF on the original directory. llama.cpp builds every layer sparse, so
these tiny models have no dense layers (its converter refuses `mlp_only_layers` ones)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conformance import TINY_CONFIGS, make_tiny_model

ALL_SPARSE = {"mlp_only_layers": [], "decoder_sparse_step": 1}


@pytest.fixture(scope="module", params=["Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM"])
def converted(request, llama_cpp, tmp_path_factory, monkeypatch_module):
    from tests.llama_cpp import convert

    arch = request.param
    monkeypatch_module.setitem(TINY_CONFIGS, arch, {**TINY_CONFIGS[arch], **ALL_SPARSE})
    root = tmp_path_factory.mktemp(arch)
    hf = make_tiny_model(arch, root / "hf")
    config = json.loads((hf / "config.json").read_text())
    config.setdefault("num_experts", config.get("num_local_experts"))  # transformers 5 renames Qwen3-MoE's
    (hf / "config.json").write_text(json.dumps(config))  # key; the converter reads num_experts
    return arch, hf, convert(llama_cpp, hf, root / "tiny-f32.gguf", "f32")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_experts_equal_transformers_gguf_loading(converted):
    import torch
    from transformers import AutoModelForCausalLM

    from llmbuild.models import spec_for
    from llmbuild.source import open_source

    from transformers import AutoConfig

    arch, hf, path = converted
    if arch == "Qwen3MoeForCausalLM":
        # transformers 5.24's GGUF config mapping does not read expert_feed_forward_length (it
        # would build 768-wide experts): its tensors are loaded under the directory's config
        theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                      config=AutoConfig.from_pretrained(hf)).state_dict()
    else:
        # transformers 5.24 cannot load this converter's qwen2moe files (it adds a unit axis to
        # the already [1, H] shared_expert_gate: [1, 1, H] vs [1, H]) and reads a `llama` file
        # with experts as a dense Llama; an f32 file is lossless, so the reference is the
        # directory the file was converted from (llama.cpp's q/k row permutation undone)
        theirs = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()
    with open_source(path) as source:
        assert source.config["architectures"] == [arch]
        spec = spec_for(source.config)
        d = spec.dims(source.config)
        tiny = TINY_CONFIGS[arch]
        assert (d.experts, d.top_k, d.sparse_layers) == (tiny.get("num_experts") or tiny["num_local_experts"], tiny["num_experts_per_tok"],
                                                         tuple(range(d.layers)))
        checked = 0
        for layer in d.sparse_layers:
            p = spec.layer_prefix(layer)
            gate_up = theirs[f"{p}mlp.experts.gate_up_proj"].numpy()  # [E, 2I, H]: gate rows, then up
            down = theirs[f"{p}mlp.experts.down_proj"].numpy()
            per = spec.expert_weights(d, layer)
            for e in range(d.experts):
                i = d.moe_intermediate
                np.testing.assert_array_equal(source.load(per["gate"][e]), gate_up[e, :i])
                np.testing.assert_array_equal(source.load(per["up"][e]), gate_up[e, i:])
                np.testing.assert_array_equal(source.load(per["down"][e]), down[e])
                checked += 3
            # transformers 5 names every family's router mlp.gate in memory (Mixtral's file: block_sparse_moe.gate)
            np.testing.assert_array_equal(source.load(f"{p}{spec.experts.router}.weight"), theirs[f"{p}mlp.gate.weight"].numpy())
            if d.shared_intermediate:
                for name in (f"{p}mlp.shared_expert_gate.weight", f"{p}mlp.shared_expert.down_proj.weight"):
                    np.testing.assert_array_equal(source.load(name), theirs[name].numpy())
        assert checked == 3 * d.experts * d.layers


def test_compiled_gguf_logits_match_hf_on_the_directory(converted, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from llmbuild.compile import compile_recipe
    from llmbuild.runtime import load
    from tests.conformance import LIMITS
    from tests.test_conformance import prefill

    arch, hf, path = converted
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "g", "model": {"source": str(path)}, "limits": LIMITS,
                                  "precision": "float32", "engines": []}))
    art = compile_recipe(recipe, out_dir=tmp_path, quiet=True, verify=False)
    ids = [5, 40, 77, 12, 90, 33, 61]
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(torch.tensor([ids])).logits[0]
    model = load(art, backend="onnxruntime", threads=2)
    try:
        got = prefill(model.executor, ids)
    finally:
        model.close()
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
