"""End to end on the embedded default model, SmolLM2-135M-Instruct (GGUF Q4_1):
greedy text equals HF transformers loading the same file; the fp16 graph builds into
a TensorRT-RTX engine whose recorded I/O contract is the parsed network's."""

from __future__ import annotations

import json

import pytest

from llmbuild.artifact import read_manifest
from llmbuild.runtime import load
from llmbuild.verify.reference import reference_greedy
from tests.conftest import ROOT

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the ocean.",
    "Give me three tips for learning a new programming language.",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_artifact):
    model = load(smollm2_artifact, backend="onnxruntime")
    yield model
    model.close()


def test_capital_of_france(smollm2):
    (g,) = smollm2.generate("What is the capital of France?", chat=True, max_new_tokens=48)
    assert g.text == "The capital of France is Paris."
    assert g.finish_reason == "eos"


def test_greedy_48_tokens_identical_to_hf(smollm2_fp32_artifact, smollm2_reference):
    """Same precision as the reference (float32): token-identical continuations.
    (The float16 artifact is held to verification thresholds instead: fp16 rounding can
    flip a near-tie late in a long continuation.)"""
    model = load(smollm2_fp32_artifact, backend="onnxruntime")
    compared = 0
    for prompt in CHAT_PROMPTS:
        ids = model.encode(prompt, chat=True)
        ours = model.generate_ids([ids], max_new_tokens=48)[0].token_ids
        theirs = reference_greedy(smollm2_reference, ids, 48, model.eos_token_ids)
        assert ours == theirs, f"{prompt!r}:\n ours   {model.tokenizer.decode(ours)!r}\n theirs {model.tokenizer.decode(theirs)!r}"
        compared += len(ours)
    assert compared >= 48 * 2  # the continuations are long, not just an immediate EOS


def test_fp16_artifact_passes_verification(smollm2_artifact, smollm2_reference, smollm2_path):
    from llmbuild.verify import verify_artifact

    report = verify_artifact(smollm2_artifact, smollm2_path, reference_model=smollm2_reference, max_new_tokens=16)
    assert report["passed"], report["failures"]
    assert 0 < report["max_abs_logit_diff"] < 0.5
    assert report["top1_agreement"] >= 0.95


def test_batched_chat_prompts_equal_one_by_one(smollm2):
    ids = [smollm2.encode(p, chat=True) for p in CHAT_PROMPTS]
    alone = [smollm2.generate_ids([i], max_new_tokens=24)[0].token_ids for i in ids]
    together = [g.token_ids for g in smollm2.generate_ids(ids, max_new_tokens=24)]
    assert together == alone


def test_tokenizer_matches_hf(smollm2):
    from transformers import AutoTokenizer

    from tests.conftest import smollm2_gguf

    path = smollm2_gguf()
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["Hello, world!", "  spaces\tand\nnewlines ", "naïve café — ünïcödé 😀"]:
        assert smollm2.tokenizer.encode(text) == hf.encode(text)
    messages = [{"role": "user", "content": "Hi there"}]
    assert smollm2.tokenizer.encode_chat(messages) == hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.fixture(scope="module")
def smollm2_engine_artifact(tmp_path_factory):
    from llmbuild.compile import compile_recipe

    out = tmp_path_factory.mktemp("smollm2-engine")
    return compile_recipe(ROOT / "recipes" / "smollm2-135m-instruct.yaml", [], out, quiet=True, verify=False)


def test_engine_contract_matches_parsed_network(smollm2_engine_artifact):
    from llmbuild.engine.backends import import_backend
    from llmbuild.engine.build import describe_network, parse_onnx

    m = read_manifest(smollm2_engine_artifact)
    (engine,) = m["engines"]
    path = smollm2_engine_artifact / engine["file"]
    assert path.stat().st_size == engine["bytes"] > 100e6  # fp16 weights alone are ~270 MB
    from llmbuild.artifact import file_sha256

    assert file_sha256(path) == engine["sha256"]
    parsed = parse_onnx(import_backend("tensorrt-rtx"), smollm2_engine_artifact / m["graph"]["file"],
                        cache_len=m["limits"]["max_seq_len"])
    described = describe_network(parsed.network)
    assert [{k: t[k] for k in ("name", "mode", "dtype", "shape")} for t in engine["io"]] == described
    assert len(engine["aliases"]) == 2 * 30
    past = next(t for t in engine["io"] if t["name"] == "past_key.0")
    assert past["dtype"] == "float16" and past["shape"] == [-1, 3, 2048, 64]
    assert past["profile_shapes"][0][2] == [4, 3, 2048, 64]
    json.dumps(m)  # the whole manifest is JSON


def test_engine_runs_on_gpu(smollm2_engine_artifact):
    from llmbuild.runtime.executors.tensorrt import gpu_available

    if not gpu_available():
        pytest.skip("running a TensorRT engine needs an NVIDIA GPU (nvidia-smi not found)")
    model = load(smollm2_engine_artifact, backend="tensorrt")
    (g,) = model.generate("What is the capital of France?", chat=True, max_new_tokens=48)
    assert "Paris" in g.text
