"""Artifacts are written atomically: an interrupted compile leaves nothing that looks
complete, and a rerun succeeds. Manifests are checked when read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmbuild.artifact import read_manifest
from llmbuild.errors import UserError
from tests.tiny import compile_tiny, make_tiny_hf


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("hf") / "m", layers=4, hidden=128, intermediate=256, vocab=256)


def _start_compile(recipe: Path, out: Path) -> subprocess.Popen:
    # LLMBUILD_TEST_STAGE_DELAY makes each stage linger so the signal lands mid-compile.
    env = dict(os.environ, LLMBUILD_TEST_STAGE_DELAY="1.5")
    return subprocess.Popen(
        [sys.executable, "-m", "llmbuild.cli", "compile", str(recipe), "-o", str(out), "--no-verify", "-q"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as a terminal delivers it: a suite run in the background (`make test &`,
        # nohup) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_stage_dir(out: Path, timeout: float = 60) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        partial = [p for p in out.glob(".tiny.partial-*") if (p / "model").exists()]
        if partial:
            return partial[0]
        time.sleep(0.05)
    raise AssertionError("compile never reached the ONNX stage")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_compile_leaves_no_complete_artifact(tiny_dir, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"name: tiny\nmodel:\n  source: {tiny_dir}\nprecision: float32\nengines: []\n"
                      "limits: {max_batch_size: 2, max_input_len: 32, max_seq_len: 64}\n")
    proc = _start_compile(recipe, out)
    _wait_for_stage_dir(out)
    assert proc.poll() is None, "compile ended before the signal was sent"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr
    assert "Traceback" not in stderr
    assert not (out / "tiny").exists()
    with pytest.raises(UserError, match="not a complete llmbuild artifact|does not exist"):
        read_manifest(out / "tiny")
    if sig != signal.SIGKILL:  # cleanup ran: nothing left behind
        assert list(out.iterdir()) == []
    # A rerun succeeds (and removes a killed run's leftovers).
    art = compile_tiny(tiny_dir, out, name="tiny", limits={"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 64})
    assert read_manifest(art)["name"] == "tiny"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tiny")) == []


def test_recompile_replaces_artifact(tiny_dir, tmp_path):
    art = compile_tiny(tiny_dir, tmp_path, name="tiny")
    first = read_manifest(art)["hashes"]
    art = compile_tiny(tiny_dir, tmp_path, name="tiny", precision="float16")
    m = read_manifest(art)
    assert m["model"]["precision"] == "float16" and m["hashes"]["graph"] != first["graph"]
    assert m["hashes"]["source"] == first["source"]


def test_manifest_checks(tiny_dir, tmp_path):
    art = compile_tiny(tiny_dir, tmp_path, name="tiny")
    m = json.loads((art / "manifest.json").read_text())
    assert m["graph"]["opset"] == 24
    names = [i["name"] for i in m["graph"]["inputs"]]
    assert names[:4] == ["input_ids", "position_ids", "write_indices", "logits_indices"]
    assert (art / m["graph"]["file"]).is_file() and (art / m["graph"]["weights"]).stat().st_size > 0
    assert (art / "tokenizer" / "tokenizer.json").is_file()
    assert set(m["timings"]) >= {"source", "onnx", "tokenizer"}
    m["schema_version"] = 99
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="schema version 99 is not supported"):
        read_manifest(art)
    with pytest.raises(UserError, match="does not exist"):
        read_manifest(tmp_path / "nope")


def test_typed_manifest_writes_the_documented_layout(tiny_dir, tmp_path):
    """compile builds a typed Manifest; its JSON keeps the artifact format's keys and order,
    optional sections only when present, and the engines' TensorRT versions in the toolchain."""
    from llmbuild.artifact.manifest import Hashes, Manifest, Tokenizer

    art = compile_tiny(tiny_dir, tmp_path, name="tiny")
    written = json.loads((art / "manifest.json").read_text())
    assert list(written) == ["schema_version", "name", "recipe", "hashes", "source", "toolchain", "model", "limits",
                             "graph", "tokenizer", "engines", "verification", "timings"]
    assert list(written["tokenizer"]) == ["dir", "bos_token_id", "eos_token_ids", "add_bos_token", "chat_template"]
    m = Manifest(name="x", recipe={}, hashes=Hashes("r", "s", "g"), source={}, toolchain={"llmbuild": "0"}, model={},
                 limits={}, graph={}, tokenizer=Tokenizer("tokenizer", None, [2], False, None), variant="v",
                 quantization={"scheme": "int8"})
    m.record_engines([{"trt_module": "tensorrt_rtx", "trt_version": "1.7"}])
    keys = list(m.to_json())
    assert keys.index("variant") == keys.index("source") + 1 and "parallel" not in keys
    assert keys.index("quantization") == keys.index("graph") + 1
    assert m.to_json()["toolchain"] == {"llmbuild": "0", "tensorrt_rtx": "1.7"}
