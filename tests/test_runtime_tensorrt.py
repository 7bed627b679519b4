"""The TensorRT executor's decisions, checked on the CPU against a real (tiny) engine's
manifest entry: device buffers for the whole I/O contract with the KV-cache outputs on
their inputs' buffers, the profile and shapes of each pass, cache addresses per slot
range, and clear errors for passes no profile takes. Running the engine needs a GPU
(the `gpu` test at the end)."""

from __future__ import annotations

import numpy as np
import pytest

from llmbuild.errors import UserError
from llmbuild.graph import io
from llmbuild.runtime.executors.tensorrt import binding_plan, gpu_available, plan_step, slot_bytes
from tests.tiny import compile_tiny, make_tiny_hf

pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")

LIMITS = {"max_batch_size": 4, "max_input_len": 16, "max_seq_len": 64}
KV_HEADS, HEAD_DIM, VOCAB = 2, 16, 256


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-runtime")
    model_dir = make_tiny_hf(root / "hf", num_heads=4, num_kv_heads=KV_HEADS, tie=True, seed=1)
    return compile_tiny(model_dir, root / "out", precision="float16", engines=("tensorrt-rtx",), limits=LIMITS)


@pytest.fixture(scope="module")
def entry(artifact):
    from llmbuild.artifact import read_manifest

    return read_manifest(artifact)["engines"][0]


def test_binding_plan_covers_the_contract_and_aliases_the_cache(entry):
    plan = {b.name: b for b in binding_plan(entry)}
    assert set(plan) == {t["name"] for t in entry["io"]}
    for past, present in io.cache_pairs(2):
        assert plan[past].alias_of is None and plan[present].alias_of == past
        assert plan[past].max_shape == (4, KV_HEADS, 64, HEAD_DIM) and plan[past].dtype == np.float16
    assert plan[io.INPUT_IDS].max_shape == (4, 16)
    assert plan[io.LOGITS].max_shape == (4, 16, VOCAB) and plan[io.LOGITS].dtype == np.float32
    assert slot_bytes(plan[io.past_key(0)]) == KV_HEADS * 64 * HEAD_DIM * 2


def test_decode_pass_over_a_slot_range(entry):
    plan = binding_plan(entry)
    sp = plan_step(entry, plan, batch=3, seq=1, num_logits=1, first_slot=1, slots=4)
    assert entry["profile_names"][sp.profile] == "decode"
    assert sp.shapes[io.INPUT_IDS] == (3, 1) and sp.shapes[io.WRITE_INDICES] == (3,)
    step_bytes = KV_HEADS * 64 * HEAD_DIM * 2
    for past, present in io.cache_pairs(2):
        assert sp.shapes[past] == (3, KV_HEADS, 64, HEAD_DIM)
        assert present not in sp.shapes  # outputs take their shape from the engine
        assert sp.offsets[past] == sp.offsets[present] == (past, step_bytes)
    assert sp.logits_shape == (3, 1, VOCAB)


def test_prefill_pass_of_one_sequence(entry):
    sp = plan_step(entry, binding_plan(entry), batch=1, seq=16, num_logits=1, first_slot=3, slots=4)
    assert entry["profile_names"][sp.profile] == "prefill"
    assert sp.shapes[io.past_value(1)] == (1, KV_HEADS, 64, HEAD_DIM)
    assert sp.offsets[io.present_value(1)] == (io.past_value(1), 3 * KV_HEADS * 64 * HEAD_DIM * 2)


def test_passes_no_profile_takes_are_user_errors(entry):
    plan = binding_plan(entry)
    with pytest.raises(UserError, match="no optimization profile takes 1 sequence.* x 17 token"):
        plan_step(entry, plan, batch=1, seq=17, num_logits=1, first_slot=0, slots=4)
    with pytest.raises(UserError, match="does not fit 4 slots"):
        plan_step(entry, plan, batch=2, seq=1, num_logits=1, first_slot=3, slots=4)
    with pytest.raises(UserError, match="at most 4"):
        plan_step(entry, plan, batch=1, seq=1, num_logits=1, first_slot=0, slots=5)


def test_engine_limits_bound_the_runtime(artifact):
    """On the engine path, more slots or longer passes than the profiles are refused
    at load time (checked before any GPU work)."""
    from llmbuild.artifact import read_manifest
    from llmbuild.runtime.generator import Limits, check_request

    limits = read_manifest(artifact)["limits"]
    lim = Limits(limits["max_batch_size"], limits["max_input_len"], limits["max_seq_len"])
    check_request(list(range(5, 55)), 14, lim)  # longer than one pass: prefilled in chunks
    with pytest.raises(UserError, match="max_seq_len=64"):
        check_request(list(range(5, 55)), 15, lim)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs an NVIDIA GPU and driver to run a TensorRT engine")
def test_engine_generates_what_onnx_runtime_generates(artifact):  # pragma: no cover - GPU only
    from llmbuild.runtime import load

    prompts = [[5, 6, 7], list(range(10, 40)), [9] * 20, [100, 101]]
    cpu = load(artifact, backend="onnxruntime")
    gpu = load(artifact, backend="tensorrt")
    expected = [g.token_ids for g in cpu.generate_ids(prompts, max_new_tokens=12)]
    got = [g.token_ids for g in gpu.generate_ids(prompts, max_new_tokens=12)]
    # fp16 engine vs fp32 CPU compute: the first tokens agree (near-ties may flip later).
    assert [g[:4] for g in got] == [e[:4] for e in expected]
