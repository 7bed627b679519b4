"""The command line as users run builds (#16): `inspect` in words (targets, labelled
profiles, the CPU-ready graph), `run --json` with usage/finish reason/timings,
`run --system`, `llmbuild cache {ls,du,prune}` over a private cache, and compile/verify
output without third-party progress bars or ONNX Runtime's log lines."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from llmbuild.artifact import read_manifest
from llmbuild.compile import compile_recipe
from tests.conftest import ROOT
from tests.tiny import compile_tiny, make_tiny_gguf, make_tiny_hf, tokenizer_vocab_size


def llmbuild(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llmbuild.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_builds")
    hf = make_tiny_hf(root / "hf", seed=5)
    return {"root": root, "hf": hf, "artifact": compile_tiny(hf, root / "out")}


# -- inspect ---------------------------------------------------------------------------------

def test_inspect_names_the_cpu_graph_and_reused_stages(tiny):
    r = llmbuild("inspect", tiny["artifact"])
    assert r.returncode == 0, r.stderr
    assert "cpu graph model/model.cpu.onnx" in r.stdout
    assert "timing    cpu_graph" in r.stdout
    assert "{" not in r.stdout and "['" not in r.stdout and "None" not in r.stdout  # no Python reprs


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx not installed")
def test_inspect_engine_targets_and_labelled_profiles(tiny):
    art = compile_tiny(tiny["hf"], tiny["root"] / "engine", name="tiny-engine", precision="float16",
                       engines=("tensorrt-rtx",), limits={"max_batch_size": 2, "max_input_len": 16, "max_seq_len": 32})
    r = llmbuild("inspect", art)
    assert r.returncode == 0, r.stderr
    assert "targets: sm80, sm86, sm89, sm120 (tensorrt-rtx default (portable))" in r.stdout
    (ids_line,) = [line for line in r.stdout.splitlines() if line.strip().startswith("input  input_ids")]
    # two profiles (prefill, decode), each with its min/opt/max shapes [batch, seq]
    assert "prefill min [1, 1] opt [" in ids_line and "max [2, 16]" in ids_line
    assert "decode min [1, 1] opt [" in ids_line and "max [2, 1]" in ids_line
    assert "{'" not in r.stdout and "['" not in r.stdout and "[[" not in r.stdout
    assert json.loads(llmbuild("inspect", art, "--json").stdout) == read_manifest(art)


# -- run --json, run --system ----------------------------------------------------------------

def test_run_json_reports_usage_finish_reason_and_timings(tiny):
    import llmbuild as lb

    with lb.load(tiny["artifact"]) as model:
        (expected,) = model.generate(["abc"], max_new_tokens=7)
    r = llmbuild("run", tiny["artifact"], "--prompt", "abc", "--raw", "--max-new-tokens", 7, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == expected.text
    assert out["finish_reason"] == expected.finish_reason
    assert out["usage"] == {"prompt_tokens": len(expected.prompt_token_ids),
                            "completion_tokens": len(expected.token_ids),
                            "total_tokens": len(expected.prompt_token_ids) + len(expected.token_ids)}
    t = out["timings"]
    assert 0 < t["time_to_first_token_s"] <= t["total_s"]
    assert t["tokens_per_s"] == pytest.approx(len(expected.token_ids) / t["total_s"])
    assert t["decode_tokens_per_s"] > 0


def test_run_system_message_goes_through_the_chat_template(tiny):
    import llmbuild as lb

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "abc"}]
    with lb.load(tiny["artifact"]) as model:
        expected = model.chat(messages, max_new_tokens=6)
        plain = model.chat(messages[1:], max_new_tokens=6)
        prompt_ids = model.tokenizer.encode_chat(messages)
    r = llmbuild("run", tiny["artifact"], "--prompt", "abc", "--system", "be brief", "--max-new-tokens", 6, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == expected.text and out["system"] == "be brief"
    assert out["usage"]["prompt_tokens"] == len(prompt_ids) > len(plain.prompt_token_ids)
    streamed = llmbuild("run", tiny["artifact"], "--prompt", "abc", "--system", "be brief", "--max-new-tokens", 6)
    assert streamed.returncode == 0 and streamed.stdout == expected.text + "\n"
    raw = llmbuild("run", tiny["artifact"], "--prompt", "abc", "--system", "x", "--raw")
    assert raw.returncode == 2 and "Traceback" not in raw.stderr
    assert "--system needs the chat template; it cannot be combined with --raw" in raw.stderr


# -- cache ls / du / prune -------------------------------------------------------------------

@pytest.fixture()
def cached(tiny, tmp_path):
    """A private cache filled by one compile (stages source, onnx, cpu_graph, tokenizer)."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"name: tiny-cache\nmodel: {{source: {tiny['hf']}}}\nprecision: float32\n"
                      "limits: {max_batch_size: 2, max_input_len: 16, max_seq_len: 32}\nengines: []\n")
    cache = tmp_path / "cache"
    compile_recipe(recipe, out_dir=tmp_path / "a", quiet=True, verify=False, cache=cache)
    return {"recipe": recipe, "cache": cache, "tmp": tmp_path}


def stage_reuse(artifact) -> dict:
    return {k: v["reused"] for k, v in read_manifest(artifact)["timings"].items()}


def test_cache_ls_and_du_list_every_entry(cached):
    ls = json.loads(llmbuild("cache", "ls", "--cache-dir", cached["cache"], "--json").stdout)
    kinds = sorted(e["name"] for e in ls["entries"])
    assert kinds == ["cpu_graph", "onnx", "source", "tokenizer"]
    on_disk = {e["name"]: sum(f.stat().st_size for f in __import__("pathlib").Path(e["path"]).rglob("*")
                              if f.is_file()) for e in ls["entries"]}
    assert {e["name"]: e["bytes"] for e in ls["entries"]} == on_disk
    du = json.loads(llmbuild("cache", "du", "--cache-dir", cached["cache"], "--json").stdout)
    assert du["bytes"] == sum(on_disk.values()) > 0
    assert du["kinds"]["stage:onnx"] == {"entries": 1, "bytes": on_disk["onnx"]}
    text = llmbuild("cache", "ls", "--cache-dir", cached["cache"])
    assert text.returncode == 0 and "4 entries" in text.stdout


def test_cache_prune_by_age_dry_run_then_for_real(cached):
    entries = json.loads(llmbuild("cache", "ls", "--cache-dir", cached["cache"], "--json").stdout)["entries"]
    old = [e for e in entries if e["name"] in ("onnx", "cpu_graph")]
    week_ago = time.time() - 8 * 86400
    for e in old:
        os.utime(e["path"], (week_ago, week_ago))
    dry = json.loads(llmbuild("cache", "prune", "--cache-dir", cached["cache"], "--older-than", "7d", "--dry-run",
                              "--json").stdout)
    assert sorted(e["name"] for e in dry["removed"]) == ["cpu_graph", "onnx"] and dry["dry_run"]
    assert all(os.path.isdir(e["path"]) for e in old)  # nothing removed
    real = json.loads(llmbuild("cache", "prune", "--cache-dir", cached["cache"], "--older-than", "7d",
                               "--json").stdout)
    assert sorted(e["name"] for e in real["removed"]) == ["cpu_graph", "onnx"]
    assert real["bytes_freed"] == sum(e["bytes"] for e in old)
    assert not any(os.path.exists(e["path"]) for e in old)
    again = compile_recipe(cached["recipe"], out_dir=cached["tmp"] / "b", quiet=True, verify=False,
                           cache=cached["cache"])
    assert stage_reuse(again) == {"source": True, "onnx": False, "cpu_graph": False, "tokenizer": True}


def test_cache_prune_by_size_keeps_the_most_recent(cached):
    entries = json.loads(llmbuild("cache", "ls", "--cache-dir", cached["cache"], "--json").stdout)["entries"]
    for i, e in enumerate(entries):  # distinct last uses: source newest
        t = time.time() - (100 if e["name"] != "source" else 0) - i
        os.utime(e["path"], (t, t))
    source = next(e for e in entries if e["name"] == "source")
    r = json.loads(llmbuild("cache", "prune", "--cache-dir", cached["cache"], "--max-size", f"{source['bytes']}B",
                            "--json").stdout)
    assert sorted(e["name"] for e in r["removed"]) == ["cpu_graph", "onnx", "tokenizer"]
    assert r["bytes_left"] == source["bytes"]
    left = json.loads(llmbuild("cache", "ls", "--cache-dir", cached["cache"], "--json").stdout)["entries"]
    assert [e["name"] for e in left] == ["source"]


@pytest.mark.parametrize("args, message", [
    ((), "give --older-than AGE and/or --max-size SIZE"),
    (("--older-than", "ten days"), "--older-than: cannot read 'ten days'; expected a number and a unit"),
    (("--max-size", "5 parsecs"), "--max-size: cannot read '5 parsecs'"),
])
def test_cache_prune_refuses_unclear_limits(tmp_path, args, message):
    r = llmbuild("cache", "prune", "--cache-dir", tmp_path, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr


# -- third-party output silenced -------------------------------------------------------------

def test_compile_and_verify_show_no_third_party_progress_or_logs(tmp_path):
    pytest.importorskip("transformers")
    hf = make_tiny_hf(tmp_path / "hf", vocab=tokenizer_vocab_size("llama"), seed=3)
    gguf = make_tiny_gguf(hf, tmp_path / "tiny.gguf", tokenizer="llama")
    recipe = tmp_path / "g.yaml"
    recipe.write_text(f"name: tiny-gguf\nmodel: {{source: {gguf}}}\nprecision: float32\n"
                      "limits: {max_batch_size: 1, max_input_len: 16, max_seq_len: 32}\nengines: []\n"
                      "verify: {prompts: [hello]}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "TRANSFORMERS_", "HF_HUB_DISABLE"))}
    env["LLMBUILD_CACHE_DIR"] = str(tmp_path / "cache")
    r = llmbuild("compile", recipe, "-o", tmp_path / "out", "--verify", env=env)
    assert r.returncode == 0, r.stderr
    v = llmbuild("verify", tmp_path / "out" / "tiny-gguf", "--prompt", "hello", env=env)
    assert v.returncode == 0, v.stdout + v.stderr
    for output in (r.stderr + r.stdout, v.stderr + v.stdout):
        assert "Converting and de-quantizing GGUF tensors" not in output
        assert "it/s]" not in output  # no tqdm bar at all
        assert "[W:onnxruntime" not in output and "[E:onnxruntime" not in output
    assert "verify" in r.stderr and "onnx" in r.stderr  # our own progress stays
    quiet = llmbuild("compile", recipe, "-o", tmp_path / "out2", "--verify", "--quiet", env=env)
    assert quiet.returncode == 0 and quiet.stderr == ""
