"""Issue 15: bad inputs end in clear errors, verification cannot be fooled, and what
compile verifies is what runs. One test (or more) per numbered case of the issue,
each checking its message; tiny random models made in-process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmbuild.errors import BuildError, UserError
from llmbuild.recipe import RecipeError, load_recipe
from tests.tiny import compile_tiny, make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 96}


def llmbuild_cli(*args, stdin: bytes | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmbuild.cli", *map(str, args)], capture_output=True, input=stdin,
                          timeout=600, cwd=cwd)


def edit_config(model_dir: Path, **changes) -> Path:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "rope_theta":
            cfg.setdefault("rope_parameters", {})["rope_theta"] = value
        cfg[key] = value
    path.write_text(json.dumps(cfg))
    return model_dir


def recipe_for(tmp: Path, source: Path, extra: str = "", name: str = "t") -> Path:
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(f"name: {name}\nmodel: {{source: {source}}}\nprecision: float32\nengines: []\n"
                      f"limits: {json.dumps(LIMITS)}\n{extra}")
    return recipe


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("hard") / "hf", seed=3)


@pytest.fixture(scope="module")
def tiny_artifact(tiny_dir, tmp_path_factory) -> Path:
    return compile_tiny(tiny_dir, tmp_path_factory.mktemp("hard-out"), limits=LIMITS)


# -- case 8: verification checks the graph the CPU runtime runs ------------------------------
@pytest.fixture(scope="module")
def mistral_head24(tmp_path_factory):
    """A tiny Mistral with head_dim 24 (MHA, tied): GroupQueryAttention's CPU kernel needs
    head_size % 16 == 0, so the CPU lowering must keep the standard Attention."""
    root = tmp_path_factory.mktemp("mistral24")
    model_dir = make_tiny_hf(root / "hf", "MistralForCausalLM", num_heads=4, num_kv_heads=4, hidden=96, tie=True,
                             seed=8)
    return model_dir, root


def test_case8_lowering_falls_back_per_layer_and_compile_verifies_both_graphs(mistral_head24, caplog):
    from llmbuild.runtime import load

    model_dir, root = mistral_head24
    with caplog.at_level(logging.WARNING, logger="llmbuild.cpu_lowering"):
        artifact = compile_tiny(model_dir, root / "out", limits=LIMITS, verify=True)
    manifest = json.loads((artifact / "manifest.json").read_text())
    v = manifest["verification"]
    assert v["passed"] and v["graph"] == "standard" and v["cpu_lowered"]["passed"]
    assert v["cpu_lowered"]["max_abs_logit_diff"] < 1e-3
    warnings = [r.getMessage() for r in caplog.records if "keeps the standard Attention" in r.getMessage()]
    assert warnings and "head_size 24 is not a multiple of 16" in warnings[0]
    # ... and `run` works: the lowered graph (per-layer fallback) equals the standard one.
    prompt = [5, 6, 7, 8, 9]
    with load(artifact, backend="onnxruntime") as lowered, load(artifact, backend="onnxruntime",
                                                                  cpu_lowering=False) as standard:
        assert lowered.executor.lowered
        a = lowered.generate_ids([prompt], max_new_tokens=12)[0].token_ids
        b = standard.generate_ids([prompt], max_new_tokens=12)[0].token_ids
    assert a == b and len(a) > 0


def test_case8_constraint_function_names_each_reason():
    import onnx_ir as ir

    from llmbuild.lowering.cpu import gqa_constraint_problem

    ok = dict(head_dim=64, num_heads=8, kv_heads=2, dtype=ir.DataType.FLOAT)
    assert gqa_constraint_problem(**ok) is None
    assert "head_size 24" in gqa_constraint_problem(**{**ok, "head_dim": 24})
    assert "dtype" in gqa_constraint_problem(**{**ok, "dtype": ir.DataType.BFLOAT16})
    assert gqa_constraint_problem(**ok, softcap=30.0, window=4096) is None  # carried into the operator
    assert "negative softcap" in gqa_constraint_problem(**ok, softcap=-1.0)
    assert "sliding window 0" in gqa_constraint_problem(**ok, window=0)
    assert "not a multiple of 3 KV heads" in gqa_constraint_problem(**{**ok, "kv_heads": 3})


# -- case 2 and 4: config values that compile into NaN or a refused kernel -------------------
@pytest.mark.parametrize("change, message", [
    ({"rope_theta": -10000.0}, "model config rope_theta: expected a finite number > 0, found -10000.0"),
    ({"rms_norm_eps": -1e-5}, "model config rms_norm_eps: expected a finite number > 0, found -1e-05"),
    ({"num_hidden_layers": -2}, "model config num_hidden_layers: expected an integer in [1, 4096], found -2"),
    ({"num_hidden_layers": "2"}, "model config num_hidden_layers: expected an integer in [1, 4096], found '2'"),
    ({"num_key_value_heads": 3}, "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
])
def test_case2_4_bad_config_values_are_recipe_errors(tiny_dir, tmp_path, change, message):
    import shutil

    model_dir = tmp_path / "hf"
    shutil.copytree(tiny_dir, model_dir)
    edit_config(model_dir, **change)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_for(tmp_path, model_dir))
    assert any(p.path == "model.source" and message in p.message for p in info.value.problems), info.value
    # ... and opening the source says the same (a compile that skipped validate).
    from llmbuild.source import open_source

    with pytest.raises(UserError, match="the model config cannot be built"):
        open_source(model_dir)


def test_case2_verification_fails_on_non_finite_logits(tiny_dir, tmp_path):
    """NaN compares false with every threshold: verification must fail, naming where."""
    import shutil

    from safetensors.numpy import load_file, save_file

    model_dir = tmp_path / "hf"
    shutil.copytree(tiny_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    weights["model.norm.weight"][3] = np.nan  # every logit becomes NaN
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BuildError, match=r"non-finite logits \(nan\) from the artifact's graph: first at position 0"):
        compile_tiny(model_dir, tmp_path / "out", limits=LIMITS, verify=True)


def test_case2_first_non_finite():
    from llmbuild.verify.finite import first_non_finite

    x = np.zeros((4, 10), np.float32)
    assert first_non_finite(x) is None
    x[2, 7] = np.inf
    x[3, 1] = np.nan
    assert first_non_finite(x) == (2, 7)


def test_case6_bad_sliding_window_mistral_refused_at_validate(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    cfg = json.loads((ROOT / "tests/data/recipes/tiny-llama/config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=0)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RecipeError, match=r"MistralForCausalLM: sliding_window=0 must be a positive integer"):
        load_recipe(recipe_for(tmp_path, model_dir))


# -- case 3 and 5: YAML bombs, deep nesting, tags -------------------------------------------
TINY_LLAMA = ROOT / "tests/data/recipes/tiny-llama"


def _recipe_error(tmp_path: Path, text: str, *overrides: str, check_build: bool = False) -> RecipeError:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides, check_build=check_build)
    return info.value


def test_case3_alias_bomb_is_refused_at_its_position(tmp_path):
    lines = [f"name: t\nmodel: {{source: {TINY_LLAMA}}}", "a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 10)}]")
    e = _recipe_error(tmp_path, "\n".join(lines) + "\n")
    [p] = e.problems
    assert "recipe expands to more than 20000 values (nested YAML aliases?)" in p.message
    assert p.line >= 3


def test_case3_matrix_size_is_bounded(tmp_path):
    axes = ["limits.max_batch_size", "verify.max_abs_logit_diff", "verify.min_top1_agreement",
            "verify.min_greedy_agreement", "verify.eval_tokens", "verify.max_kl_divergence",
            "verify.max_perplexity_increase", "limits.max_input_len", "verify.enabled", "precision",
            "engines", "limits.max_seq_len"]
    values = {"verify.enabled": "[true, false]", "precision": "[float16, float32]", "engines": "{a: [], b: []}",
              "limits.max_seq_len": "[64, 128]", "limits.max_input_len": "[16, 32]"}
    text = (f"name: t\nmodel: {{source: {TINY_LLAMA}}}\nengines: []\nlimits: {{max_seq_len: 128, max_input_len: 32}}\n"
            "matrix:\n" + "".join(f"  {k}: {values.get(k, '[1, 2]')}\n" for k in axes))
    from llmbuild.recipe.matrix import load_variants

    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_variants(path)
    [p] = info.value.problems
    assert p.path == "matrix" and (p.line, p.column) == (5, 1)
    assert "the matrix has 4096 variants (2 x 2 x 2 x 2 x 2 x 2 x 2 x 2 x 2 x 2 x 2 x 2); expected at most 64" in p.message


def test_case5_deep_nesting_is_a_recipe_error(tmp_path):
    for text in ("name: t\nx: " + "[" * 3000 + "]" * 3000 + "\n",
                 "name: t\nx: " + "".join(f"\n{'  ' * (i + 1)}k{i}:" for i in range(40)) + " 1\n"):
        [p] = _recipe_error(tmp_path, text).problems
        assert "nested more than 32 levels deep" in p.message


def test_case5_yaml_tags_are_recipe_errors_with_positions(tmp_path):
    text = (f"name: t\nmodel: {{source: {TINY_LLAMA}}}\nprecision: !!python/object/apply:os.system [ls]\n"
            "limits: {max_seq_len: !!int zz, max_batch_size: !!float abc}\n")
    problems = _recipe_error(tmp_path, text).problems
    assert [(p.line, p.column) for p in problems] == [(3, 12), (4, 23), (4, 49)]
    assert "YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed in a recipe" in problems[0].message
    assert problems[1].message == "!!int 'zz': expected an integer"
    assert problems[2].message == "!!float 'abc': expected a number"
    # ... and in an override (safe loader): at the override's column
    [p] = [p for p in _recipe_error(tmp_path, f"name: t\nmodel: {{source: {TINY_LLAMA}}}\n",
                                    "limits.max_seq_len=!!float x").problems if p.file == "<command line>"]
    assert (p.file, p.line, p.column) == ("<command line>", 1, 1) and "!!float 'x': expected a number" in p.message


def test_case7_schema_version_true_is_not_1(tiny_artifact, tmp_path):
    import shutil

    art = tmp_path / "a"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["schema_version"] = True
    (art / "manifest.json").write_text(json.dumps(m))
    from llmbuild.artifact import read_manifest

    with pytest.raises(UserError, match=r"manifest schema version True is not supported"):
        read_manifest(art)


# -- case 5: damaged artifacts: one message naming the file ----------------------------------
def _damaged(tiny_artifact: Path, tmp_path: Path, damage) -> Path:
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    damage(art)
    return art


def _truncate(path: Path, keep: int | None = None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _set_manifest(art: Path, change):
    m = json.loads((art / "manifest.json").read_text())
    change(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


ARTIFACT_DAMAGE = {
    "weights-deleted": (lambda a: (a / "model/model.onnx.data").unlink(),
                        r"the weights file model/model.onnx.data is missing"),
    "weights-truncated": (lambda a: _truncate(a / "model/model.onnx.data"),
                          r"the weights file model/model.onnx.data has \d+ bytes, the graph reads up to byte \d+ "
                          r"\(truncated\)"),
    "weights-tampered": (lambda a: _flip_byte(a / "model/model.onnx.data"),
                         r"do not match the sha256 recorded in the manifest"),
    "graph-deleted": (lambda a: (a / "model/model.onnx").unlink(), r"the graph model/model.onnx is missing"),
    "graph-truncated": (lambda a: _truncate(a / "model/model.onnx", 37),
                        r"the graph model/model.onnx is not a readable ONNX model"),
    "cpu-graph-deleted": (lambda a: (a / "model/model.cpu.onnx").unlink(),
                          r"the graph model/model.cpu.onnx is missing"),
    "cpu-graph-tampered": (lambda a: _set_manifest(a, lambda m: m["graph"]["cpu"].update(sha256="0" * 64)),
                           r"model/model.cpu.onnx does not match the sha256 recorded in the manifest \(graph.cpu"),
    "cpu-graph-escape": (lambda a: _set_manifest(a, lambda m: m["graph"]["cpu"].update(file="../x.onnx")),
                         r"the manifest's CPU graph file '../x.onnx' points outside the artifact"),
    "tokenizer-deleted": (lambda a: (a / "tokenizer/tokenizer.json").unlink(), r"tokenizer/tokenizer.json is missing"),
    "tokenizer-garbage": (lambda a: (a / "tokenizer/tokenizer.json").write_text("{garbage"),
                          r"tokenizer.json: not a readable tokenizer"),
    "tokenizer-config-garbage": (lambda a: (a / "tokenizer/tokenizer_config.json").write_bytes(b"\xff\xfe"),
                                 r"tokenizer_config.json: cannot read the tokenizer config"),
    "manifest-binary": (lambda a: (a / "manifest.json").write_bytes(bytes(range(256))),
                        r"manifest.json: cannot read the manifest"),
    "manifest-deep": (lambda a: (a / "manifest.json").write_text("[" * 100000 + "]" * 100000),
                      r"manifest.json: cannot read the manifest|expected a JSON object"),
    "manifest-nested-key": (lambda a: _set_manifest(a, lambda m: m["limits"].pop("max_seq_len")),
                            r"damaged manifest: limits.max_seq_len: missing"),
    "manifest-wrong-type": (lambda a: _set_manifest(a, lambda m: m["model"].update(num_layers="2")),
                            r"damaged manifest: model.num_layers: expected an integer, found str '2'"),
    "manifest-escape": (lambda a: _set_manifest(a, lambda m: m["graph"].update(file="../../etc/passwd")),
                        r"the manifest's graph file '../../etc/passwd' points outside the artifact"),
}


@pytest.mark.parametrize("case", list(ARTIFACT_DAMAGE))
def test_case5_damaged_artifacts_are_one_clear_message(case, tiny_artifact, tmp_path):
    from llmbuild.runtime import load

    damage, message = ARTIFACT_DAMAGE[case]
    art = _damaged(tiny_artifact, tmp_path, damage)
    with pytest.raises(UserError, match=message):
        load(art, backend="onnxruntime").close()


def test_case5_hash_check_can_be_skipped(tiny_artifact, tmp_path, monkeypatch):
    from llmbuild.runtime import load

    art = _damaged(tiny_artifact, tmp_path, lambda a: _flip_byte(a / "model/model.onnx.data"))
    load(art, backend="onnxruntime", check_hashes=False).close()  # sizes fine, hash not read
    monkeypatch.setenv("LLMBUILD_SKIP_HASH_CHECK", "1")
    load(art, backend="onnxruntime").close()


def test_case5_cli_damaged_artifact_exit_2(tiny_artifact, tmp_path):
    art = _damaged(tiny_artifact, tmp_path, lambda a: _truncate(a / "model/model.onnx.data"))
    r = llmbuild_cli("run", art, "--prompt", "hi", "--raw", "--max-new-tokens", "2")
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert b"(truncated); recompile the artifact" in r.stderr


@pytest.mark.parametrize("template, message", [
    (None, "has no chat template; use raw prompts"),
    ("{% for m in messages %}{{ m.content.__class__.__mro__ }}{% endfor %}", "refused by the sandbox"),
    ("{{ raise_exception('no system role') }}", "the chat template failed: TemplateError: no system role"),
    ("{% for %}", "the chat template failed: TemplateSyntaxError"),
    ("{{ messages[5]['content'] }}", "the chat template failed"),
])
def test_case5_chat_templates_fail_with_messages(tiny_artifact, tmp_path, template, message):
    from llmbuild.runtime import load

    art = _damaged(tiny_artifact, tmp_path,
                   lambda a: _set_manifest(a, lambda m: m["tokenizer"].update(chat_template=template)))
    with load(art, backend="onnxruntime") as model:
        with pytest.raises(UserError, match=message):
            model.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)


# -- case 5 and 7: the CLI's runtime options ------------------------------------------------
@pytest.mark.parametrize("option, message", [
    (["--temperature", "-1"], "--temperature: expected a finite number >= 0, got -1.0"),
    (["--top-p", "0"], r"--top-p: expected a finite number in (0, 1], got 0.0"),
    (["--top-p", "2"], r"--top-p: expected a finite number in (0, 1], got 2.0"),
    (["--top-k", "-1"], r"--top-k: expected an integer in [0, 2**31-1], got -1"),
    (["--min-p", "5"], r"--min-p: expected a finite number in [0, 1], got 5.0"),
    (["--repetition-penalty", "0"], "--repetition-penalty: expected a finite number > 0, got 0.0"),
    (["--repetition-penalty", "nan"], "--repetition-penalty: expected a finite number > 0, got nan"),
    (["--presence-penalty", "inf"], "--presence-penalty: expected a finite number, got inf"),
    (["--max-new-tokens", "0"], "--max-new-tokens: expected an integer >= 1, got 0"),
    (["--threads", "-1"], "--threads: expected an integer in [1, 4096], got -1"),
])
def test_case5_cli_sampling_options_out_of_range(tiny_artifact, option, message):
    r = llmbuild_cli("run", tiny_artifact, "--prompt", "hi", *option)
    assert r.returncode == 2 and b"Traceback" not in r.stderr, r.stderr
    assert message.encode() in r.stderr


def test_case5_prompts_not_valid_utf8(tiny_artifact):
    r = subprocess.run([sys.executable, "-m", "llmbuild.cli", "run", str(tiny_artifact), "--prompt", b"caf\xe9"],
                       capture_output=True, timeout=600)
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert b"--prompt: expected valid UTF-8 text, got undecodable bytes at character 3" in r.stderr
    r = llmbuild_cli("chat", tiny_artifact, "--max-new-tokens", "2", stdin=b"caf\xe9\nhello\n")
    assert r.returncode == 0, r.stderr
    assert b"input line: expected valid UTF-8 text" in r.stderr and b"line ignored" in r.stderr
    assert b"Traceback" not in r.stderr


def test_case7_detokenize_outside_the_vocabulary(tiny_artifact):
    r = llmbuild_cli("detokenize", tiny_artifact, "5", "99999")
    assert r.returncode == 2 and b"IDS[1]: expected an integer in [0, 256), got 99999" in r.stderr


def test_case5_eval_seq_len_beyond_max_seq_len(tiny_artifact):
    r = llmbuild_cli("eval", tiny_artifact)  # default --seq-len 512 > max_seq_len 96
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert b"--seq-len 512 is longer than" in r.stderr and b"max_seq_len 96; pass --seq-len 96 or less" in r.stderr


def test_case5_verify_and_eval_on_bfloat16(tiny_dir, tmp_path):
    art = compile_tiny(tiny_dir, tmp_path / "out", precision="bfloat16", limits=LIMITS)
    for args in (["verify", art, "--reference", tiny_dir], ["eval", art, "--seq-len", "32"]):
        r = llmbuild_cli(*args)
        assert r.returncode == 2 and b"Traceback" not in r.stderr, r.stderr
        assert b"a bfloat16 graph cannot run on ONNX Runtime's CPU provider" in r.stderr


# -- case 5 and 7: lying sources --------------------------------------------------------------
def _safetensors_dir(tiny_dir: Path, tmp_path: Path, edit_header) -> Path:
    """A copy of the tiny model whose safetensors header was rewritten by `edit_header`."""
    import shutil
    import struct

    model_dir = tmp_path / "hf"
    shutil.copytree(tiny_dir, model_dir)
    path = model_dir / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    header = edit_header(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return model_dir


def _set_entry(name, key, value):
    def edit(header):
        header[name][key] = value
        return header
    return edit


SAFETENSORS_LIES = {
    "header-list": (lambda h: [1, 2], r"header is a JSON list, expected an object of tensors"),
    "negative-offset": (_set_entry("model.norm.weight", "data_offsets", [-4, 252]),
                        r"'model.norm.weight': data_offsets must be \[begin, end\] with 0 <= begin <= end, found \[-4"),
    "string-offset": (_set_entry("model.norm.weight", "data_offsets", ["0", "256"]),
                      r"data_offsets must be \[begin, end\]"),
    "string-shape": (_set_entry("model.norm.weight", "shape", ["64"]),
                     r"'model.norm.weight': shape must be a list of non-negative integers, found \['64'\]"),
    "entry-not-mapping": (_set_entry("model.norm.weight", "dtype", None), r"unsupported dtype None"),
    "aliased": (lambda h: {**h, "lm_head.weight": {**h["lm_head.weight"],
                                                   "data_offsets": h["model.embed_tokens.weight"]["data_offsets"]}},
                r"tensors '(lm_head|model.embed_tokens).weight' and '(lm_head|model.embed_tokens).weight' occupy the "
                r"same bytes"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_LIES))
def test_case5_7_lying_safetensors_headers(case, tiny_dir, tmp_path):
    from llmbuild.source import open_source

    edit, message = SAFETENSORS_LIES[case]
    model_dir = _safetensors_dir(tiny_dir, tmp_path, edit)
    with pytest.raises(UserError, match=message):
        open_source(model_dir).close()


def _gguf(tmp_path: Path, body: bytes) -> Path:
    import struct

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + body)
    return path


def test_case5_gguf_garbage_and_lying_lengths(tmp_path):
    import struct

    from llmbuild.source import open_source, read_config

    key = b"general.architecture"
    lying_array = struct.pack("<QQ", 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 4, 2**40)
    garbage = struct.pack("<QQ", 1, 0) + b"\x9a\x13" * 32  # fixed bytes where the tensor table should be
    huge_counts = struct.pack("<QQ", 2**62, 2**62)
    for body, message in ((lying_array, r"GGUF array length 1099511627776 at byte \d+ runs past the end of the file"),
                          (garbage, r"GGUF string length \d+ at byte 24 runs past the end of the file"),
                          (huge_counts, r"GGUF tensor count 4611686018427387904 at byte 8 runs past the end")):
        path = _gguf(tmp_path, body)
        with pytest.raises(UserError, match=message):
            read_config(path)
        with pytest.raises(UserError, match=message):
            open_source(path)


# -- case 6: refused at validate, not later ---------------------------------------------------
def test_case6_engine_problems_at_validate(tmp_path):
    text = (f"name: t\nmodel: {{source: {TINY_LLAMA}}}\nprecision: float32\n"
            "limits: {max_seq_len: 128, max_input_len: 64}\n"
            "engines: [tensorrt, {backend: tensorrt-rtx, compute_capabilities: [current]}]\n")
    from llmbuild.engine.compat import current_compute_capability

    problems = {p.path: p for p in _recipe_error(tmp_path, text, check_build=True).problems}
    assert "engines need precision float16 or bfloat16, found float32" in problems["precision"].message
    assert ("engine backend 'tensorrt' needs the Python module 'tensorrt', which is not installed"
            in problems["engines[0]"].message)
    if current_compute_capability() is None:
        assert ("compute capability 'current' means the GPU of the build machine, and this machine has none"
                in problems["engines[1].compute_capabilities"].message)
    # `llmbuild validate` runs them (exit 2 with every problem); `--portable` does not.
    recipe = tmp_path / "r.yaml"
    r = llmbuild_cli("validate", recipe)
    assert r.returncode == 2 and b"engine backend 'tensorrt' needs the Python module" in r.stderr
    assert llmbuild_cli("validate", recipe, "--portable").returncode == 0


@pytest.mark.parametrize("text, path, message", [
    ("name: " + "a" * 300 + "\n", "name", "expected a name of at most 200 characters"),
    ("name: t\nlimits: {max_batch_size: 100000}\n", "limits.max_batch_size", "expected a number <= 4096"),
    ("name: t\nlimits: {max_seq_len: 10000000}\n", "limits.max_seq_len", "expected a number <= 1048576"),
])
def test_case6_limits_and_name_at_validate(tmp_path, text, path, message):
    problems = _recipe_error(tmp_path, text + f"model: {{source: {TINY_LLAMA}}}\n").problems
    assert any(p.path == path and message in p.message for p in problems), problems


def test_case6_short_max_seq_len_verifies(tiny_dir, tmp_path):
    """max_seq_len 64 once failed compile at verification (prompt + 16 tokens too long)."""
    art = compile_tiny(tiny_dir, tmp_path / "out", limits={"max_batch_size": 1, "max_input_len": 16, "max_seq_len": 24},
                       verify=True)
    v = json.loads((art / "manifest.json").read_text())["verification"]
    assert v["passed"] and all(row["tokens"] + row["greedy_tokens"] <= 24 for row in v["prompts"])


def test_case5_7_paths_nul_too_long_and_extends_passwd(tmp_path):
    for source, message in (("a\\0b", "the model source contains a NUL byte"),
                            ("x" * 5000, "cannot use the model source 'xxxxxxxx")):
        [p] = [p for p in _recipe_error(tmp_path, f'name: t\nmodel: {{source: "{source}"}}\n').problems
               if p.path == "model.source"]
        assert message in p.message and len(p.message) < 300
    [p] = _recipe_error(tmp_path, "name: t\nextends: /etc/passwd\n").problems
    assert "expected a mapping of recipe keys, found a string of" in p.message
    assert "root:" not in p.message
    e = _recipe_error(tmp_path, "name: t\nextends: \"a\\0b\"\n")
    assert "expected a recipe file name, found 'a\\x00b' (string)" in e.problems[0].message
