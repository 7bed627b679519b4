"""Incremental compile (llmbuild.buildcache): a no-op recompile reuses every stage and
gives the same manifest apart from timings; changing one input re-runs exactly the
stages whose key it is part of (one test per stage key)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from llmbuild.artifact import read_manifest
from llmbuild.compile import compile_recipe
from tests.tiny import make_tiny_hf

STAGES = ("source", "onnx", "cpu_graph", "tokenizer", "verify")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("incremental")
    model = make_tiny_hf(root / "hf", tie=True, layers=2, hidden=64, vocab=128, seed=7)
    recipe = root / "tiny.yaml"
    recipe.write_text(
        f"name: tiny-inc\nmodel: {{source: {model}}}\nprecision: float32\n"
        "limits: {max_batch_size: 2, max_input_len: 16, max_seq_len: 64}\nengines: []\n"
        "verify: {prompts: [hello there, abc]}\n"
    )
    cache = root / "cache"
    first = compile_recipe(recipe, out_dir=root / "a", quiet=True, verify=True, cache=cache)
    second = compile_recipe(recipe, out_dir=root / "b", quiet=True, verify=True, cache=cache)
    return {"root": root, "model": model, "recipe": recipe, "cache": cache, "first": first, "second": second}


def reused(artifact) -> dict:
    return {name: t["reused"] for name, t in read_manifest(artifact)["timings"].items()}


def reference_files(cache) -> int:
    return len(list((cache / "reference").rglob("*.npz")))


def without_timings(artifact) -> dict:
    m = read_manifest(artifact)
    m.pop("timings")
    return m


def test_first_compile_runs_every_stage(tiny):
    assert reused(tiny["first"]) == dict.fromkeys(STAGES, False)
    verification = read_manifest(tiny["first"])["verification"]
    assert verification["passed"] and verification["graph"] == "standard"
    # verify what runs: the CPU-ready graph that ships, not a lowering made for the check
    assert verification["cpu_lowered"]["graph"] == "cpu_graph" and verification["cpu_lowered"]["passed"]


def test_noop_recompile_reuses_every_stage_and_the_same_manifest(tiny):
    assert reused(tiny["second"]) == dict.fromkeys(STAGES, True)
    assert without_timings(tiny["second"]) == without_timings(tiny["first"])
    a = json.loads((tiny["first"] / "manifest.json").read_text())
    b = json.loads((tiny["second"] / "manifest.json").read_text())
    a.pop("timings"), b.pop("timings")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # byte-identical but for timings
    for f in sorted(p.relative_to(tiny["first"]) for p in tiny["first"].rglob("*") if p.is_file()):
        if f.name != "manifest.json":
            assert (tiny["second"] / f).read_bytes() == (tiny["first"] / f).read_bytes(), f
    # reused files are copies (onnx refuses hard-linked external data) that onnx loads
    import onnx

    model = tiny["second"] / "model" / "model.onnx"
    assert os.stat(model.with_suffix(".onnx.data")).st_nlink == 1
    onnx.checker.check_model(onnx.load(str(model)))


def recompile(tiny, tmp_path, *overrides):
    return compile_recipe(tiny["recipe"], list(overrides), tmp_path, quiet=True, verify=True, cache=tiny["cache"])


def test_name_changes_no_stage(tiny, tmp_path):
    out = recompile(tiny, tmp_path, "name=renamed")
    assert reused(out) == dict.fromkeys(STAGES, True)
    assert read_manifest(out)["name"] == "renamed"


def test_batch_size_changes_no_stage_without_engines(tiny, tmp_path):
    # max_batch_size is an engine (profile) input, not a graph, tokenizer or verify input
    assert reused(recompile(tiny, tmp_path, "limits.max_batch_size=3")) == dict.fromkeys(STAGES, True)


def test_verify_settings_rerun_only_verify(tiny, tmp_path):
    before = reference_files(tiny["cache"])
    out = recompile(tiny, tmp_path, "verify.prompts=[a new prompt]")
    assert reused(out) == {"source": True, "onnx": True, "cpu_graph": True, "tokenizer": True, "verify": False}
    assert read_manifest(out)["verification"]["prompts"][0]["prompt"] == "a new prompt"
    assert reference_files(tiny["cache"]) == before + 1  # its HF logits over prompt + continuation, now cached


def test_max_seq_len_reruns_onnx_and_verify_with_cached_reference_outputs(tiny, tmp_path):
    before = reference_files(tiny["cache"])
    out = recompile(tiny, tmp_path, "limits.max_seq_len=96")
    assert reused(out) == {"source": True, "onnx": False, "cpu_graph": False, "tokenizer": True, "verify": False}
    assert read_manifest(out)["hashes"]["graph"] != read_manifest(tiny["first"])["hashes"]["graph"]
    assert reference_files(tiny["cache"]) == before  # same prompts, same source: HF not run again
    assert read_manifest(out)["verification"]["passed"]


def test_precision_reruns_onnx_and_verify(tiny, tmp_path):
    out = recompile(tiny, tmp_path, "precision=float16")
    assert reused(out) == {"source": True, "onnx": False, "cpu_graph": False, "tokenizer": True, "verify": False}


def test_cpu_graph_off_runs_no_cpu_stage_and_reverifies(tiny, tmp_path):
    """runtime.cpu_graph=false: no CPU-ready graph in the artifact (the runtime lowers at
    load), the verify stage re-runs (it verifies the graph that ships), the rest reused."""
    out = recompile(tiny, tmp_path, "runtime.cpu_graph=false")
    r = reused(out)
    assert "cpu_graph" not in r
    assert r == {"source": True, "onnx": True, "tokenizer": True, "verify": False}
    manifest = read_manifest(out)
    assert "cpu" not in manifest["graph"] and not (out / "model" / "model.cpu.onnx").exists()
    assert manifest["verification"]["cpu_lowered"]["graph"] == "lowered at load"
    assert manifest["hashes"]["graph"] == read_manifest(tiny["first"])["hashes"]["graph"]
    assert manifest["verification"]["passed"]


def test_quantization_reruns_onnx_and_the_cpu_graph(tiny, tmp_path):
    """The quantization section is an ONNX-stage input (calibration and quantized weights
    are made there); the CPU-ready graph follows the graph hash; source and tokenizer are
    reused. (The accuracy gate of a random tiny model is not the point here: off.)"""
    out = recompile(tiny, tmp_path, "quantization={weights: {scheme: int8}}", "verify.enabled=false")
    assert reused(out) == {"source": True, "onnx": False, "cpu_graph": False, "tokenizer": True}
    manifest = read_manifest(out)
    assert manifest["quantization"] and "data" in manifest["graph"]["cpu"]  # packed int8 weights: their own file
    again = recompile(tiny, tmp_path / "again", "quantization={weights: {scheme: int8}}", "verify.enabled=false")
    assert reused(again) == {"source": True, "onnx": True, "cpu_graph": True, "tokenizer": True}
    assert (again / "model" / "model.cpu.onnx.data").read_bytes() == (out / "model" / "model.cpu.onnx.data").read_bytes()


def test_touched_source_rereads_it_and_reuses_the_rest(tiny, tmp_path):
    moved = tmp_path / "hf-copy"
    shutil.copytree(tiny["model"], moved)  # new path and mtimes, same content
    out = recompile(tiny, tmp_path / "o", f"model.source={moved}")
    assert reused(out) == {"source": False, "onnx": True, "cpu_graph": True, "tokenizer": True, "verify": True}
    assert read_manifest(out)["hashes"]["source"] == read_manifest(tiny["first"])["hashes"]["source"]


def test_changed_weights_rerun_every_stage(tiny, tmp_path):
    changed = make_tiny_hf(tmp_path / "hf", tie=True, layers=2, hidden=64, vocab=128, seed=8)
    out = recompile(tiny, tmp_path / "o", f"model.source={changed}")
    assert reused(out) == dict.fromkeys(STAGES, False)


def test_changed_tokenizer_reruns_the_tokenizer(tiny, tmp_path):
    changed = tmp_path / "hf-tok"
    shutil.copytree(tiny["model"], changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (changed / "tokenizer_config.json").write_text(json.dumps(config))
    out = recompile(tiny, tmp_path / "o", f"model.source={changed}")
    r = reused(out)
    assert (r["source"], r["tokenizer"], r["verify"]) == (False, False, False)
    assert read_manifest(out)["tokenizer"]["chat_template"] == config["chat_template"]


def test_no_cache_runs_every_stage(tiny, tmp_path):
    out = compile_recipe(tiny["recipe"], [], tmp_path, quiet=True, verify=True, cache=False)
    assert reused(out) == dict.fromkeys(STAGES, False)
    assert without_timings(out)["hashes"] == without_timings(tiny["first"])["hashes"]


def test_damaged_cache_entry_is_rebuilt(tiny, tmp_path):
    good = (tiny["first"] / "tokenizer" / "tokenizer.json").read_bytes()
    for data in (tiny["cache"] / "stages" / "tokenizer").glob("*/*/files/tokenizer/tokenizer.json"):
        replacement = data.with_name("t.tmp")
        replacement.write_bytes(data.read_bytes().replace(b'"', b"'", 1))  # same size, other bytes
        os.chmod(data.parent, 0o755)
        os.replace(replacement, data)  # a new inode: the artifacts linked to the old one keep it
    out = recompile(tiny, tmp_path)
    assert reused(out)["tokenizer"] is False
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == good


def test_stage_keys_include_llmbuild_code():
    """A stage built by other llmbuild code is not reused: the key carries a digest of the
    package's sources (so a development checkout never reuses a stale graph)."""
    from llmbuild import buildcache

    versions = buildcache.tool_versions("numpy")
    assert versions["llmbuild_code"] == buildcache.code_digest() and len(versions["llmbuild_code"]) == 64
    other = dict(versions, llmbuild_code="0" * 64)
    assert buildcache.stage_key("onnx", tools=versions) != buildcache.stage_key("onnx", tools=other)
