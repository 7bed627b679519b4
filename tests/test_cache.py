"""The content-addressed engine cache: key coverage, hit/miss through `compile`, damaged
entries, the lock (threads and two real `llmbuild compile` processes), and byte-identical
ONNX across builds. Real TensorRT-RTX builds of a tiny random Llama."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmbuild.artifact import read_manifest
from llmbuild.compile import compile_recipe
from llmbuild.engine.cache import EngineCache, default_cache_dir, engine_key
from tests.tiny import make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]

KEY_INPUTS = dict(
    recipe={"name": "a", "model": {"source": "m"}, "precision": "float16",
            "limits": {"max_batch_size": 2, "max_input_len": 16, "max_seq_len": 64, "max_num_tokens": None},
            "engines": [{"backend": "tensorrt-rtx"}], "parallel": {"tp": 1}, "verify": {"enabled": True},
            "matrix": {}},
    source="f" * 64,
    graph="g" * 64,
    toolchain={"llmbuild": "0.1.0", "onnx": "1.23.2", "onnx_ir": "1.1.0", "python": "3.12.3"},
    engine={"backend": "tensorrt-rtx", "compute_capabilities": None, "weight_streaming": False},
    trt_module="tensorrt_rtx",
    trt_version="1.7.1.116",
    rank=0,
)


def with_change(path: str, value):
    """KEY_INPUTS with one nested value replaced (path like 'recipe.limits.max_seq_len')."""
    inputs = json.loads(json.dumps(KEY_INPUTS))
    *parents, last = path.split(".")
    node = inputs
    for p in parents:
        node = node[p]
    node[last] = value
    return inputs


@pytest.mark.parametrize("path, value", [
    ("recipe.precision", "bfloat16"),
    ("recipe.limits.max_seq_len", 128),
    ("recipe.limits.max_num_tokens", 32),
    ("recipe.parallel.tp", 2),
    ("source", "e" * 64),
    ("graph", "h" * 64),
    ("toolchain.llmbuild", "0.2.0"),
    ("toolchain.onnx", "1.24.0"),
    ("toolchain.onnx_ir", "1.2.0"),
    ("engine.compute_capabilities", ["sm86"]),
    ("engine.weight_streaming", True),
    ("engine.backend", "tensorrt"),
    ("trt_module", "tensorrt"),
    ("trt_version", "1.7.2.1"),
    ("rank", 1),
])
def test_each_key_input_flips_the_key(path, value):
    assert engine_key(**with_change(path, value)) != engine_key(**KEY_INPUTS)


@pytest.mark.parametrize("path, value", [
    ("recipe.name", "renamed"),  # a renamed or re-verified recipe builds the same engine
    ("recipe.model.source", "/elsewhere/m"),  # the weights' content is `source` (their fingerprint)
    ("recipe.verify.enabled", False),
    ("recipe.runtime", {"cpu_graph": False}),  # what the artifact ships for ONNX Runtime
    ("recipe.engines", [{"backend": "tensorrt-rtx"}, {"backend": "tensorrt"}]),  # each engine has its own key
    ("recipe.matrix", {"precision": ["float16"]}),
    ("toolchain.python", "3.13.0"),
])
def test_what_does_not_decide_an_engine_keeps_the_key(path, value):
    assert engine_key(**with_change(path, value)) == engine_key(**KEY_INPUTS)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMBUILD_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLMBUILD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "llmbuild"


# -- the cache object ----------------------------------------------------------------------


def fake_build(payload: bytes, calls: list, delay: float = 0.0):
    """A build function that writes `payload` as the engine (the cache is engine-agnostic)."""

    def build(path: Path) -> dict:
        calls.append(threading.get_ident())
        time.sleep(delay)
        path.write_bytes(payload)
        return {"file": path.name, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}

    return build


def test_miss_then_hit_and_damaged_entries_rebuild(tmp_path):
    cache, calls, key = EngineCache(tmp_path / "cache"), [], "ab" * 32
    info, hit = cache.get_or_build(key, tmp_path / "a" / "e.engine", fake_build(b"engine-1", calls))
    assert (hit, len(calls), (tmp_path / "a" / "e.engine").read_bytes()) == (False, 1, b"engine-1")
    info2, hit = cache.get_or_build(key, tmp_path / "b" / "e.engine", fake_build(b"other", calls))
    assert (hit, len(calls), (tmp_path / "b" / "e.engine").read_bytes()) == (True, 1, b"engine-1")
    assert info2["sha256"] == info["sha256"] and info2["cache_key"] == key
    stored = cache.entry_dir(key) / "engine"
    assert stored.read_bytes() == b"engine-1" and sorted(p.name for p in stored.parent.iterdir()) == ["engine",
                                                                                                     "entry.json"]
    stored.write_bytes(b"engine-X")  # damaged on disk: a miss, rebuilt and replaced
    _, hit = cache.get_or_build(key, tmp_path / "c" / "e.engine", fake_build(b"engine-2", calls))
    assert (hit, len(calls), stored.read_bytes()) == (False, 2, b"engine-2")
    (cache.entry_dir(key) / "entry.json").write_text("{not json")
    _, hit = cache.get_or_build(key, tmp_path / "d" / "e.engine", fake_build(b"engine-3", calls))
    assert (hit, len(calls)) == (False, 3)
    assert not list(cache.entry_dir(key).parent.glob(".*.tmp"))  # no temporary leftovers


def test_lock_makes_concurrent_builds_of_one_key_build_once(tmp_path):
    cache, calls, key = EngineCache(tmp_path / "cache"), [], "cd" * 32
    results = {}

    def worker(i):
        results[i] = cache.get_or_build(key, tmp_path / f"w{i}" / "e.engine", fake_build(b"slow", calls, 0.5))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(hit for _, hit in results.values()) == [False, True, True]
    assert all((tmp_path / f"w{i}" / "e.engine").read_bytes() == b"slow" for i in range(3))


def test_a_held_lock_blocks_a_build_until_released(tmp_path):
    cache, calls, key = EngineCache(tmp_path / "cache", lock_timeout=0.3), [], "ef" * 32
    from filelock import Timeout

    with cache.lock(key):
        with pytest.raises(Timeout):
            cache.get_or_build(key, tmp_path / "e.engine", fake_build(b"x", calls))
    assert calls == []
    cache.get_or_build(key, tmp_path / "e.engine", fake_build(b"x", calls))
    assert len(calls) == 1


# -- through compile (real TensorRT-RTX engines) ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    root = tmp_path_factory.mktemp("cache")
    model = make_tiny_hf(root / "hf", tie=False, layers=2, hidden=64, vocab=128, seed=5)
    recipe = root / "tiny.yaml"
    recipe.write_text(
        f"name: tiny-cache\nmodel: {{source: {model}}}\nprecision: float16\n"
        "limits: {max_batch_size: 2, max_input_len: 16, max_seq_len: 64}\nengines: [tensorrt-rtx]\n"
    )
    cache = root / "engine-cache"
    first = compile_recipe(recipe, out_dir=root / "a", quiet=True, verify=False, cache=cache)
    second = compile_recipe(recipe, out_dir=root / "b", quiet=True, verify=False, cache=cache)
    return {"root": root, "model": model, "recipe": recipe, "cache": cache, "first": first, "second": second}


def engine_info(artifact: Path) -> dict:
    """The engine's manifest entry, with `hit`: whether compile reused it (in the timings)."""
    m = read_manifest(artifact)
    [info] = m["engines"]
    return {**info, "hit": m["timings"][info["stage"]]["reused"]}


def test_second_compile_of_an_unchanged_recipe_reuses_the_engine(tiny):
    a, b = engine_info(tiny["first"]), engine_info(tiny["second"])
    assert (a["hit"], b["hit"]) == (False, True)
    assert a["cache"]["key"] == b["cache"]["key"] and a["sha256"] == b["sha256"]
    assert (tiny["second"] / b["file"]).read_bytes() == (tiny["first"] / a["file"]).read_bytes()
    # a hit is a hard link to the cached engine (read-only), not a pass over its bytes
    cached = next((tiny["cache"] / "engines").glob(f"*/{b['cache']['key']}/engine"))
    assert os.stat(tiny["second"] / b["file"]).st_ino == os.stat(cached).st_ino
    assert os.stat(cached).st_mode & 0o777 == 0o444
    timing = read_manifest(tiny["second"])["timings"]["engine:tensorrt-rtx:portable"]
    assert timing["seconds"] < read_manifest(tiny["first"])["timings"]["engine:tensorrt-rtx:portable"]["seconds"]


def test_onnx_is_byte_identical_across_builds(tiny):
    for name in ("model.onnx", "model.onnx.data"):
        assert (tiny["first"] / "model" / name).read_bytes() == (tiny["second"] / "model" / name).read_bytes()
    assert read_manifest(tiny["first"])["hashes"] == read_manifest(tiny["second"])["hashes"]


def test_moved_model_with_same_content_still_hits(tiny):
    moved = tiny["root"] / "elsewhere" / "copy"
    shutil.copytree(tiny["model"], moved)
    os.utime(moved / "model.safetensors", (1, 1))  # mtimes are not part of the key
    out = compile_recipe(tiny["recipe"], [f"model.source={moved}"], tiny["root"] / "c", quiet=True, verify=False,
                         cache=tiny["cache"])
    assert engine_info(out)["hit"] is True


@pytest.mark.parametrize("overrides", [
    ["limits.max_seq_len=32"],
    ["precision=bfloat16"],
    ["engines=[{backend: tensorrt-rtx, compute_capabilities: [sm89]}]"],
])
def test_a_changed_key_input_rebuilds(tiny, tmp_path, overrides):
    out = compile_recipe(tiny["recipe"], overrides, tmp_path, quiet=True, verify=False, cache=tiny["cache"])
    assert engine_info(out)["hit"] is False
    assert engine_info(out)["cache"]["key"] != engine_info(tiny["first"])["cache"]["key"]


def test_changed_weights_rebuild(tiny, tmp_path):
    changed = make_tiny_hf(tmp_path / "hf", tie=False, layers=2, hidden=64, vocab=128, seed=6)  # same shapes
    out = compile_recipe(tiny["recipe"], [f"model.source={changed}"], tmp_path / "o", quiet=True, verify=False,
                         cache=tiny["cache"])
    info = engine_info(out)
    assert info["hit"] is False and info["sha256"] != engine_info(tiny["first"])["sha256"]


def test_two_compile_processes_share_one_cache(tiny, tmp_path):
    """Two `llmbuild compile` processes, same recipe, same (empty) cache: one builds, the
    other waits on the lock or comes later, and reuses it; the cache holds one valid entry."""
    cache = tmp_path / "shared-cache"
    procs = [
        subprocess.Popen([sys.executable, "-m", "llmbuild.cli", "compile", str(tiny["recipe"]), "-o",
                          str(tmp_path / f"out{i}"), "--no-verify", "--json", "--cache-dir", str(cache)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    summaries = [json.loads(out) for out, _ in outs]
    cached = sorted(s["artifacts"][0]["engines"][0]["cached"] for s in summaries)
    assert cached == [False, True]
    shas = {s["artifacts"][0]["engines"][0]["sha256"] for s in summaries}
    assert len(shas) == 1
    [entry] = list((cache / "engines").glob("*/*"))
    assert hashlib.sha256((entry / "engine").read_bytes()).hexdigest() in shas
    assert json.loads((entry / "entry.json").read_text())["sha256"] in shas
