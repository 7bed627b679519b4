"""Production engine builds through `compile`: engine entries with targets and builder
options, prefill + decode profiles, the manifest's contract against the parsed network,
profile selection, the runtime's compatibility check, and the `tensorrt` backend's code
path (run with the TensorRT-RTX module standing in: both share one API).

Real TensorRT-RTX builds of a tiny random Llama (hidden 64, 2 layers) on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from llmbuild.artifact import read_manifest
from llmbuild.compile import compile_recipe
from llmbuild.engine import build as build_mod
from llmbuild.engine.build import build_engine, describe_network, parse_onnx
from llmbuild.engine.compat import (
    apply_weight_streaming,
    check_engine_compatible,
    compatibility_problems,
)
from llmbuild.engine.profiles import select_profile
from llmbuild.errors import UserError
from llmbuild.graph import io
from tests.tiny import make_tiny_hf

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")

LIMITS = {"max_batch_size": 4, "max_input_len": 16, "max_seq_len": 64, "max_num_tokens": 32}
PREFILL_BATCH = 2  # min(max_batch_size, max_num_tokens // max_input_len)
TARGETS = ["sm75", "sm86", "sm120"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("production")
    model = make_tiny_hf(root / "hf", tie=True, layers=2, num_heads=4, num_kv_heads=2, hidden=64, vocab=256, seed=3)
    recipe = root / "tiny.yaml"
    recipe.write_text(
        f"name: tiny-prod\nmodel: {{source: {model}}}\nprecision: float16\n"
        f"limits: {json.dumps(LIMITS)}\n"
        "engines:\n"
        "  - tensorrt-rtx\n"
        "  - backend: tensorrt-rtx\n"
        f"    compute_capabilities: [{', '.join(t.upper() for t in TARGETS)}]\n"
        "    optimization_level: 2\n"
        "    workspace_limit_mib: 512\n"
        "    weight_streaming: true\n"
        "    weight_streaming_budget_mib: 1\n"
    )
    path = compile_recipe(recipe, out_dir=root / "out", quiet=True, verify=False, cache=root / "cache")
    return path


def test_every_entry_is_built_with_its_targets_and_options(artifact):
    m = read_manifest(artifact)
    portable, targeted = m["engines"]
    assert portable["file"] == "engines/tensorrt-rtx-portable-rank0.engine"
    assert targeted["file"] == "engines/tensorrt-rtx-sm75-sm86-sm120-rank0.engine"
    assert portable["targets"] == {"compute_capabilities": ["sm80", "sm86", "sm89", "sm120"],
                                   "source": "tensorrt-rtx default (portable)", "hardware_compatibility": None}
    assert targeted["targets"] == {"compute_capabilities": TARGETS, "source": "requested",
                                   "hardware_compatibility": None}
    assert portable["builder_options"] == {}
    assert targeted["builder_options"] == {"optimization_level": 2, "workspace_limit_mib": 512,
                                           "weight_streaming": True}
    assert portable["weight_streaming"] == {"enabled": False, "budget_mib": None}
    assert targeted["weight_streaming"] == {"enabled": True, "budget_mib": 1}
    for e in (portable, targeted):
        data = (artifact / e["file"]).read_bytes()
        assert e["sha256"] == hashlib.sha256(data).hexdigest() and e["bytes"] == len(data)
        assert (e["backend"], e["trt_module"], e["trt_version"]) == ("tensorrt-rtx", "tensorrt_rtx", trt.__version__)
        assert m["timings"][e["stage"]]["reused"] is False and len(e["cache"]["key"]) == 64
    assert portable["cache"]["key"] != targeted["cache"]["key"]
    assert m["toolchain"]["tensorrt_rtx"] == trt.__version__
    assert sorted(p.name for p in (artifact / "engines").iterdir()) == [
        "tensorrt-rtx-portable-rank0.engine", "tensorrt-rtx-sm75-sm86-sm120-rank0.engine"]


def test_manifest_records_what_a_rebuild_needs(artifact):
    m = read_manifest(artifact)
    assert m["recipe"]["engines"][1]["compute_capabilities"] == TARGETS  # normalized from SM75...
    assert m["recipe"]["limits"] == LIMITS and m["limits"] == LIMITS
    assert set(m["hashes"]) >= {"recipe", "source", "graph"} and all(len(v) == 64 for v in m["hashes"].values())
    assert Path(m["source"]["path"]).name == "hf" and m["source"]["format"] == "hf-safetensors"
    assert {"llmbuild", "onnx", "onnx_ir", "tensorrt_rtx"} <= set(m["toolchain"])


def test_contract_matches_a_fresh_parse_of_the_artifact_onnx(artifact):
    """The manifest's I/O contract is what TensorRT sees in the artifact's own graph."""
    m = read_manifest(artifact)
    parsed = parse_onnx(trt, artifact / m["graph"]["file"], cache_len=LIMITS["max_seq_len"])
    network = describe_network(parsed.network)
    for e in m["engines"]:
        assert [{k: v for k, v in t.items() if k != "profile_shapes"} for t in e["io"]] == network
        assert e["aliases"] == {present: past for past, present in io.cache_pairs(2)}
        inputs = [t["name"] for t in network if t["mode"] == "input"]
        assert [sorted(p) for p in e["profiles"]] == [sorted(inputs)] * 2


def test_two_profiles_follow_the_limits(artifact):
    b, s, t = LIMITS["max_batch_size"], LIMITS["max_input_len"], LIMITS["max_seq_len"]
    for e in read_manifest(artifact)["engines"]:
        assert e["profile_names"] == ["prefill", "decode"]
        prefill, decode = e["profiles"]
        assert prefill[io.INPUT_IDS] == [[1, 1], [PREFILL_BATCH, s], [PREFILL_BATCH, s]]
        assert prefill[io.LOGITS_INDICES][2] == [PREFILL_BATCH, s]
        assert decode[io.INPUT_IDS] == [[1, 1], [b, 1], [b, 1]]
        assert decode[io.LOGITS_INDICES] == [[1, 1], [b, 1], [b, 1]]
        assert prefill[io.past_key(0)][2] == [PREFILL_BATCH, 2, t, 16]
        assert decode[io.past_value(1)][2] == [b, 2, t, 16]
        # tokens of one prefill pass never exceed max_num_tokens
        assert prefill[io.INPUT_IDS][2][0] * prefill[io.INPUT_IDS][2][1] <= LIMITS["max_num_tokens"]


def test_select_profile_picks_decode_for_one_token_steps(artifact):
    entry = read_manifest(artifact)["engines"][0]
    assert select_profile(entry, 1, 1) == 1
    assert select_profile(entry, 4, 1) == 1  # all sequences decode together
    assert select_profile(entry, 2, 16) == 0
    assert select_profile(entry, 1, 7, num_logits=7) == 0  # every prompt token scored
    assert select_profile(entry, 2, 1, num_logits=1) == 1
    with pytest.raises(UserError) as e:
        select_profile(entry, 3, 16)  # three prompts of 16 > max_num_tokens 32
    assert "3 sequence(s) x 16 token(s)" in str(e.value)
    assert "prefill: batch <= 2, tokens <= 16" in str(e.value) and "decode: batch <= 4, tokens <= 1" in str(e.value)
    with pytest.raises(UserError):
        select_profile(entry, 1, 17)  # longer than max_input_len


def test_a_second_compile_reuses_both_engines(artifact, tmp_path):
    m = read_manifest(artifact)
    recipe = Path(m["source"]["path"]).parent / "tiny.yaml"
    again = compile_recipe(recipe, out_dir=tmp_path, quiet=True, verify=False, cache=artifact.parents[1] / "cache")
    m2 = read_manifest(again)
    assert [m2["timings"][e["stage"]]["reused"] for e in m2["engines"]] == [True, True]
    assert [e["sha256"] for e in m2["engines"]] == [e["sha256"] for e in m["engines"]]
    for e in m2["engines"]:
        assert hashlib.sha256((again / e["file"]).read_bytes()).hexdigest() == e["sha256"]
    assert [e["cache"]["key"] for e in m2["engines"]] == [e["cache"]["key"] for e in m["engines"]]


# -- the runtime's compatibility check ----------------------------------------------------


def test_compatibility_problems_name_version_and_gpu(artifact):
    portable, targeted = read_manifest(artifact)["engines"]
    here = {"trt_module": "tensorrt_rtx", "trt_version": trt.__version__}
    assert compatibility_problems(portable, **here, device_cc="sm89") == []
    assert compatibility_problems(targeted, **here, device_cc="sm75") == []
    assert compatibility_problems(portable, **here, device_cc=None) == []  # no GPU: nothing to compare
    [turing] = compatibility_problems(portable, **here, device_cc="sm75")
    assert "this GPU is sm75 (compute capability 7.5)" in turing
    assert "rebuild with compute_capabilities: [sm75]" in turing
    [ada] = compatibility_problems(targeted, **here, device_cc="sm89")
    assert "the engine targets sm75, sm86, sm120" in ada and "[sm89]" in ada
    [hopper] = compatibility_problems(portable, **here, device_cc="sm90")
    assert "TensorRT-RTX does not run on this GPU: build with backend: tensorrt" in hopper
    [old] = compatibility_problems(portable, trt_module="tensorrt_rtx", trt_version="1.6.0.1", device_cc="sm86")
    assert f"built with tensorrt_rtx {trt.__version__}, but this machine has 1.6.0.1" in old
    [flavour] = compatibility_problems(portable, trt_module="tensorrt", trt_version="10.15.1", device_cc="sm86")
    assert "built with tensorrt_rtx, but this runtime uses tensorrt" in flavour


def test_tensorrt_engines_check_the_build_gpu_and_hardware_compatibility():
    native = {"backend": "tensorrt", "trt_module": "tensorrt", "trt_version": "10.15.1.29",
              "targets": {"compute_capabilities": ["sm90"], "source": "build GPU", "hardware_compatibility": "none"}}
    ampere_plus = {**native, "targets": {**native["targets"], "hardware_compatibility": "ampere+"}}
    here = {"trt_module": "tensorrt", "trt_version": "10.15.1.29"}
    assert compatibility_problems(native, **here, device_cc="sm90") == []
    [problem] = compatibility_problems(native, **here, device_cc="sm80")
    assert "the engine targets sm90 (the build GPU; hardware_compatibility none)" in problem
    assert compatibility_problems(ampere_plus, **here, device_cc="sm86") == []
    assert "Ampere or later" in compatibility_problems(ampere_plus, **here, device_cc="sm75")[0]


def test_check_engine_compatible_refuses_before_tensorrt_loads(artifact):
    m = read_manifest(artifact)
    portable = m["engines"][0]
    path = artifact / portable["file"]
    stale = {**portable, "trt_version": "1.6.0.1"}
    with pytest.raises(UserError) as e:
        check_engine_compatible(trt, stale, path, device_cc="sm86")
    assert "cannot run here" in str(e.value) and "1.6.0.1" in str(e.value) and "llmbuild compile" in str(e.value)
    with pytest.raises(UserError, match="this GPU is sm75"):
        check_engine_compatible(trt, portable, path, device_cc="sm75")


def test_engine_validity_check_of_tensorrt_rtx_is_used(artifact):
    """TensorRT-RTX's `Runtime.get_engine_validity` reads the engine header: on a machine
    without a GPU it reports the engine invalid, with a GPU it accepts a portable engine."""
    portable = read_manifest(artifact)["engines"][0]
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    path = artifact / portable["file"]
    if shutil.which("nvidia-smi") is None:
        with pytest.raises(UserError) as e:
            check_engine_compatible(trt, portable, path, runtime=runtime)
        assert "tensorrt_rtx" in str(e.value) and "reports the engine invalid on this machine" in str(e.value)
    else:  # pragma: no cover - GPU machines
        check_engine_compatible(trt, portable, path, runtime=runtime)


def test_weight_streaming_budget_at_load():
    class Engine:  # the three attributes apply_weight_streaming uses (an ICudaEngine needs a GPU)
        streamable_weights_size = 10 << 20
        weight_streaming_budget_v2 = -1

        def get_weight_streaming_automatic_budget(self):
            return 3 << 20

    entry = {"weight_streaming": {"enabled": True, "budget_mib": 4}}
    engine = Engine()
    assert apply_weight_streaming(engine, entry) == 4 << 20 and engine.weight_streaming_budget_v2 == 4 << 20
    engine = Engine()
    assert apply_weight_streaming(engine, {"weight_streaming": {"enabled": True, "budget_mib": None}}) == 3 << 20
    engine = Engine()
    assert apply_weight_streaming(engine, {"weight_streaming": {"enabled": True, "budget_mib": 64}}) == 10 << 20
    engine = Engine()
    assert apply_weight_streaming(engine, {"weight_streaming": {"enabled": False}}) is None
    assert engine.weight_streaming_budget_v2 == -1


# -- the tensorrt backend's code path --------------------------------------------------------


def test_tensorrt_backend_path_with_the_rtx_module_standing_in(artifact, tmp_path, monkeypatch):
    """`tensorrt` cannot be installed here; its code path (strongly typed network flag,
    hardware compatibility, tiling options) is the shared one, run with tensorrt_rtx."""
    m = read_manifest(artifact)
    monkeypatch.setattr(build_mod, "import_backend", lambda name: trt)
    info = build_engine(
        artifact / m["graph"]["file"], tmp_path / "e.engine", backend="tensorrt", precision="float16",
        limits=LIMITS, num_layers=2,
        options={"hardware_compatibility": "ampere+", "tiling_optimization_level": "fast",
                 "l2_limit_for_tiling_kib": 512, "optimization_level": 1},
    )
    assert info["backend"] == "tensorrt" and info["label"] == "ampere-plus"
    assert info["targets"]["source"] == "build GPU" and info["targets"]["hardware_compatibility"] == "ampere+"
    assert info["builder_options"] == {"optimization_level": 1, "tiling_optimization_level": "fast",
                                       "l2_limit_for_tiling_kib": 512}
    assert len(info["profiles"]) == 2 and (tmp_path / "e.engine").stat().st_size == info["bytes"]
