"""Issue 15 on the surfaces merged after it (#14 serve, #16 stage cache and hub sources):
bad input there ends in a message and a non-zero exit, never a traceback; a damaged
cache is a miss, never a wrong artifact. Tiny random models made in-process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmbuild.errors import UserError
from tests.tiny import compile_tiny, make_tiny_hf

LIMITS = {"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 96}
LLMBUILD = [sys.executable, "-m", "llmbuild.cli"]


def cli(*args, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*LLMBUILD, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("surfaces")
    model = make_tiny_hf(root / "hf", seed=3)
    recipe = root / "tiny.yaml"
    recipe.write_text(f"name: tiny\nmodel: {{source: {model}}}\nprecision: float32\nengines: []\n"
                      f"limits: {json.dumps(LIMITS)}\n")
    return {"root": root, "model": model, "recipe": recipe,
            "artifact": compile_tiny(model, root / "out", limits=LIMITS)}


# -- llmbuild serve: startup errors --------------------------------------------------------
def test_serve_bind_errors_are_messages():
    from llmbuild.serve.server import bind_socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=rf"--host 127.0.0.1 --port {port}: cannot listen there: port {port} is "
                                            r"already in use on 127.0.0.1 \(another server\?\); pass another --port"):
            bind_socket("127.0.0.1", port)
    with pytest.raises(UserError, match=r"192.0.2.1 is not an address of this machine"):
        bind_socket("192.0.2.1", 0)  # TEST-NET-1: never a local address
    with pytest.raises(UserError, match=r"--host no-such-host.invalid --port 0: cannot resolve 'no-such-host.invalid'"):
        bind_socket("no-such-host.invalid", 0)
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0  # --port 0: a free port, reported in the banner
    finally:
        sock.close()


def test_serve_startup_errors_exit_2_before_loading(tiny, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("serve", tiny["artifact"], "--port", port)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"port {port} is already in use on 127.0.0.1" in r.stderr
    assert "llmbuild serve: tiny" not in r.stderr  # refused before the model was loaded
    for args, message in (
        (["--port", "0", "--api-key-env", "LLMBUILD_TEST_UNSET_KEY"],
         "--api-key-env LLMBUILD_TEST_UNSET_KEY: the environment variable LLMBUILD_TEST_UNSET_KEY is not set or empty"),
        (["--port", "70000"], "Invalid value for '--port': 70000 is not in the range 0<=x<=65535"),
        (["--port", "0", "--host", "192.0.2.1"], "192.0.2.1 is not an address of this machine"),
    ):
        r = cli("serve", tiny["artifact"], *args, env={"LLMBUILD_TEST_UNSET_KEY": ""})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert message in r.stderr
    r = cli("serve", tmp_path / "absent", "--port", "0")
    assert r.returncode == 2 and f"artifact {tmp_path / 'absent'} does not exist" in r.stderr


def test_serve_bfloat16_artifact_answers_as_the_runtime(tiny, tmp_path):
    """A bfloat16 artifact runs on the CPU (the lowering promotes it to float32): serve
    answers a greedy completion with the Python runtime's tokens."""
    import httpx

    from llmbuild.runtime import load
    from tests.serve_util import ServerProcess

    art = compile_tiny(tiny["model"], tmp_path / "bf16", precision="bfloat16", limits=LIMITS)
    with load(art, backend="onnxruntime") as model:
        [expected] = model.generate(["hello"], max_new_tokens=6)
    server = ServerProcess(art, tmp_path / "serve.log", "--threads", "1")
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": "hello", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected.text
        # an empty prompt is refused as empty, not as "maximum context length exceeded"
        r = httpx.post(server.url + "/v1/completions", timeout=120, json={"model": "tiny", "prompt": "", "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["message"] == "the prompt is empty (0 tokens); expected at " \
                                                                        "least one token"
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log()


# -- the stage cache -----------------------------------------------------------------------
def test_unusable_cache_directory_is_a_message(tiny, tmp_path):
    (tmp_path / "a-file").write_text("x")
    r = cli("compile", tiny["recipe"], "-o", tmp_path / "out", "--no-verify", "-q",
            "--cache-dir", tmp_path / "a-file" / "cache")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (f"--cache-dir {tmp_path / 'a-file' / 'cache'}: cannot use it as a cache (Not a directory); pass another "
            "--cache-dir, or --no-cache to build without one") in r.stderr
    r = cli("compile", tiny["recipe"], "-o", tmp_path / "out", "--no-verify", "-q",
            env={"LLMBUILD_CACHE_DIR": str(tmp_path / "a-file")})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"the cache directory {tmp_path / 'a-file'} ($LLMBUILD_CACHE_DIR" in r.stderr
    assert "it exists and is not a directory" in r.stderr
    assert not (tmp_path / "out" / "tiny").exists()
    from llmbuild.engine.cache import cache_directory

    with pytest.raises(UserError, match="--cache-dir '': expected a directory"):  # (the CLI's '' is the default)
        cache_directory("")


def test_unusable_out_directory_is_a_message(tiny, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for out, reason in ((tmp_path / "a-file", "it exists and is not a directory"),
                        (tmp_path / "a-file" / "sub", "Not a directory")):
        r = cli("compile", tiny["recipe"], "-o", out, "--no-verify", "-q", "--no-cache")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"--out {out}: cannot write the artifact there ({reason}); pass another -o/--out" in r.stderr


def _edit_record(change):
    def edit(meta: Path):
        record = json.loads(meta.read_text())
        meta.write_text(json.dumps(change(record)))
    return edit


RECORD_DAMAGE = {
    "truncated": lambda meta: meta.write_text(meta.read_text()[:40]),
    "not-utf8": lambda meta: meta.write_bytes(b"\xff\xfe" * 8),
    "a-list": lambda meta: meta.write_text("[1, 2]"),
    "files-a-list": _edit_record(lambda r: {**r, "files": [1]}),
    "files-bad-entry": _edit_record(lambda r: {**r, "files": {"model/model.onnx": 3}}),
    "meta-emptied": _edit_record(lambda r: {**r, "meta": {}}),
    "meta-edited": _edit_record(lambda r: {**r, "meta": {**r["meta"], "graph_hash": "0" * 64}}),
    "path-outside": _edit_record(lambda r: {**r, "files": {"../../../outside": [1, "x"]}}),
}


@pytest.fixture(scope="module")
def warm_cache(tiny, tmp_path_factory):
    """A stage cache filled by one compile of the tiny recipe (no verification)."""
    from llmbuild.compile import compile_recipe

    root = tmp_path_factory.mktemp("warm")
    art = compile_recipe(tiny["recipe"], out_dir=root / "out", quiet=True, verify=False, cache=root / "cache")
    return {"cache": root / "cache", "manifest": json.loads((art / "manifest.json").read_text())}


@pytest.mark.parametrize("stage", ["source", "onnx"])
@pytest.mark.parametrize("damage", list(RECORD_DAMAGE))
def test_damaged_stage_records_are_misses(stage, damage, tiny, warm_cache, tmp_path):
    """An edited, truncated or hostile meta.json of a stage entry is a miss: the stage runs
    again and the artifact is the one an undamaged cache gives (same hashes)."""
    from llmbuild.compile import compile_recipe

    cache = tmp_path / "cache"
    shutil.copytree(warm_cache["cache"], cache)
    [meta] = (cache / "stages" / stage).glob("*/*/meta.json")
    RECORD_DAMAGE[damage](meta)
    art = compile_recipe(tiny["recipe"], out_dir=tmp_path / "out", quiet=True, verify=False, cache=cache)
    m = json.loads((art / "manifest.json").read_text())
    assert {k: m["timings"][k]["reused"] for k in ("source", "onnx", "tokenizer")} == {
        "source": stage != "source", "onnx": stage != "onnx", "tokenizer": stage != "tokenizer"}
    assert m["hashes"] == warm_cache["manifest"]["hashes"]
    assert not (tmp_path / "outside").exists()
    # ... and the rebuilt entry is whole again: the next compile reuses every stage
    again = compile_recipe(tiny["recipe"], out_dir=tmp_path / "again", quiet=True, verify=False, cache=cache)
    timings = json.loads((again / "manifest.json").read_text())["timings"]
    assert all(timings[k]["reused"] for k in ("source", "onnx", "tokenizer"))


def test_damaged_reference_outputs_are_recomputed(tiny, tmp_path):
    """Cached HF outputs (reference/*.npz) that are truncated or of the wrong shape are
    computed again: verification gives the figures of a fresh cache."""
    from llmbuild.compile import compile_recipe

    cache = tmp_path / "cache"
    first = compile_recipe(tiny["recipe"], out_dir=tmp_path / "a", quiet=True, verify=True, cache=cache)
    files = sorted((cache / "reference").rglob("*.npz"))
    assert files
    for i, f in enumerate(files):
        if i % 2:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        else:
            np.savez(f.with_name("x.npz"), value=np.zeros((1, 3), np.float32))
            os.replace(f.with_name("x.npz"), f)
    second = compile_recipe(tiny["recipe"], ["verify.max_abs_logit_diff=0.002"], out_dir=tmp_path / "b", quiet=True,
                            verify=True, cache=cache)
    a, b = (json.loads((p / "manifest.json").read_text())["verification"] for p in (first, second))
    assert b["passed"] and not json.loads((second / "manifest.json").read_text())["timings"]["verify"]["reused"]
    assert b["max_abs_logit_diff"] == a["max_abs_logit_diff"] and b["prompts"] == a["prompts"]


def test_concurrent_compiles_share_one_stage_cache(tiny, tmp_path):
    """Two compile processes, one fresh cache: both succeed with the same graph, and each
    stage is stored once."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([*LLMBUILD, "compile", str(tiny["recipe"]), "-o", str(tmp_path / f"out{i}"),
                               "--no-verify", "-q", "--cache-dir", str(cache)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    manifests = [json.loads((tmp_path / f"out{i}" / "tiny" / "manifest.json").read_text()) for i in range(2)]
    assert manifests[0]["hashes"] == manifests[1]["hashes"]
    for stage in ("source", "onnx", "tokenizer"):
        assert len(list((cache / "stages" / stage).glob("*/*/meta.json"))) == 1


# -- hf: sources ---------------------------------------------------------------------------
def test_hf_pull_request_revisions_resolve_offline(tiny, tmp_path):
    """`hf:ORG/NAME@refs/pr/N` (a pull request's ref) is a revision like a branch."""
    from tests.test_hub_source import lay_out_repo

    hub = tmp_path / "hf_home" / "hub"
    files = {p.name: p for p in tiny["model"].iterdir() if p.is_file()}
    commit = "a" * 40
    lay_out_repo(hub, "llmbuild-test/tiny", commit, files)
    ref = hub / "models--llmbuild-test--tiny" / "refs" / "refs" / "pr" / "1"
    ref.parent.mkdir(parents=True)
    ref.write_text(commit)
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    recipe = tmp_path / "r.yaml"
    for source, ok in (("hf:llmbuild-test/tiny@refs/pr/1", True), ("hf:llmbuild-test/tiny@refs/pr/2", False),
                       ("hf:llmbuild-test/tiny@refs/heads/main", False)):
        recipe.write_text(f"name: t\nmodel: {{source: '{source}'}}\nengines: []\nlimits: {json.dumps(LIMITS)}\n")
        r = cli("validate", recipe, "--json", env=env)
        assert "Traceback" not in r.stderr
        if ok:
            assert r.returncode == 0, r.stderr
            assert commit in Path(json.loads(r.stdout)["source"]).parts
        else:
            assert r.returncode == 2
    assert "(a revision is a branch, tag, commit or refs/pr/N), found 'hf:llmbuild-test/tiny@refs/heads/main'" in r.stderr


def test_hf_file_must_stay_inside_the_repository(tmp_path):
    from llmbuild.recipe import RecipeError, load_recipe
    from llmbuild.recipe.model_source import parse_hub

    assert parse_hub("hf:org/name@v1/sub/m.gguf") == ("org/name", "v1", "sub/m.gguf")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: {source: 'hf:org/name/../../../m.gguf'}\n")
    with pytest.raises(RecipeError, match=r"hf:org/name/../../../m.gguf: the file '../../../m.gguf' must be a path "
                                          r"inside the repository \(no '..', not absolute\)"):
        load_recipe(recipe)


# -- verify / eval when the manifest's source is gone or is another model -------------------
@pytest.fixture(scope="module")
def orphan(tiny, tmp_path_factory):
    """An artifact compiled from a copy of the tiny model; the copy is then removed."""
    root = tmp_path_factory.mktemp("orphan")
    copy = root / "hf"
    shutil.copytree(tiny["model"], copy)
    art = compile_tiny(copy, root / "out", limits=LIMITS)
    shutil.rmtree(copy)
    return {"artifact": art, "source": copy}


def test_verify_and_eval_when_the_source_is_gone(orphan, tiny):
    art = orphan["artifact"]
    r = cli("verify", art)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"the artifact's source '{orphan['source']}' (recorded in its manifest) is not on this machine; pass " \
           "--reference PATH|package:…|hf:…" in r.stderr
    r = cli("eval", art, "--seq-len", "32", "--tokens", "64")
    assert r.returncode == 2 and "pass --reference PATH|package:…|hf:… or --no-reference (perplexity only)" in r.stderr
    r = cli("eval", art, "--no-reference", "--reference", tiny["model"])
    assert r.returncode == 2 and "--no-reference and --reference exclude each other" in r.stderr
    # --no-reference: the candidate's perplexity, the same as with a reference
    alone = cli("eval", art, "--no-reference", "--seq-len", "32", "--tokens", "64", "--json")
    paired = cli("eval", art, "--reference", tiny["model"], "--seq-len", "32", "--tokens", "64", "--json")
    assert alone.returncode == 0 and paired.returncode == 0, alone.stderr + paired.stderr
    a, b = json.loads(alone.stdout), json.loads(paired.stdout)
    assert a["reference"] is None and "kl_divergence" not in a and a["positions"] == b["positions"] == 62
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6) and b["kl_divergence"] < 1e-6


def test_a_reference_that_is_another_model_is_a_message(orphan, tiny, tmp_path):
    from llmbuild.artifact import read_manifest
    from llmbuild.eval import evaluate
    from llmbuild.verify import verify_what_runs
    from llmbuild.verify.reference import source_mismatch

    other = make_tiny_hf(tmp_path / "other", vocab=128, seed=9)
    # verify/eval warn when the reference's fingerprint is not the manifest's hashes.source
    manifest = read_manifest(orphan["artifact"])
    assert source_mismatch(tiny["model"], manifest) is None  # the same weights as the removed copy
    assert source_mismatch(other, manifest).startswith(f"the reference {other} is not the source this artifact was "
                                                        "compiled from (its fingerprint ")
    message = (rf"the reference {other} has a vocabulary of 128 tokens and the artifact .* 256: it is not the model "
               "the artifact was compiled from")
    with pytest.raises(UserError, match=message):
        verify_what_runs(orphan["artifact"], other)
    with pytest.raises(UserError, match=message):
        evaluate(orphan["artifact"], other, seq_len=32, tokens=64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=rf"reference {empty}: expected a Hugging Face checkpoint directory"):
        verify_what_runs(orphan["artifact"], empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(UserError, match=rf"reference {empty}: transformers cannot load it \(ValueError: "):
        verify_what_runs(orphan["artifact"], empty)


# -- gaps of the first audit -----------------------------------------------------------------
def test_case8_window_and_softcap_are_lowered_other_constraints_named():
    """Windows and soft-caps are carried into GroupQueryAttention (local_window_size,
    softcap; #12), so they are no constraint; a head size or partial rotary width the
    kernel cannot take is named."""
    import onnx_ir as ir

    from llmbuild.lowering.cpu import gqa_constraint_problem

    ok = dict(head_dim=64, num_heads=8, kv_heads=2, dtype=ir.DataType.FLOAT16)
    assert gqa_constraint_problem(**ok) is None
    assert gqa_constraint_problem(**ok, window=4096) is None
    assert gqa_constraint_problem(**ok, softcap=50.0) is None
    assert "head_size 24 is not a multiple of 16" in gqa_constraint_problem(**{**ok, "head_dim": 24})
    assert "partial rotary dim 24 of head_size 64" in gqa_constraint_problem(**ok, rotary_dim=24)


class _Logits:
    """Fixed logits per chunk (the accuracy gate's runner interface: logits(ids))."""

    def __init__(self, table: dict[int, np.ndarray]):
        self.table = table

    def logits(self, ids):
        return self.table[int(ids[0])]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_accuracy_gate_counts_non_finite_logits():
    """NaN compares below every threshold: the gate's metrics name the first chunk and
    position with a non-finite logit and count the positions."""
    from llmbuild.eval import evaluate_runners

    rng = np.random.default_rng(0)
    chunks = np.array([[0, 3, 1, 2], [1, 2, 3, 0]])
    good = {i: rng.normal(size=(4, 5)).astype(np.float32) for i in (0, 1)}
    bad = {i: v.copy() for i, v in good.items()}
    bad[1][2, 4] = np.nan
    bad[1][1, 0] = np.inf
    m = evaluate_runners(_Logits(bad), _Logits(good), chunks)
    assert m["candidate_non_finite"] == {"position": 1, "vocab_index": 0, "positions": 2, "chunk": 1}
    assert "reference_non_finite" not in m
    clean = evaluate_runners(_Logits(good), _Logits(good), chunks)
    assert "candidate_non_finite" not in clean and clean["kl_divergence"] == pytest.approx(0, abs=1e-12)
