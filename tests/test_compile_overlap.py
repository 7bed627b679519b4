"""compile's overlapped stages (llmbuild.compile): the HF reference loads in a child
process (llmbuild.verify.reference.ReferenceProcess) started right after the source stage,
the engines build while the CPU-ready graph, tokenizer and verification run beside them,
and a no-op recompile imports none of the heavy libraries it does not run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from llmbuild.errors import UserError
from tests.tiny import load_tiny_hf, make_tiny_hf


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    pytest.importorskip("torch")
    return make_tiny_hf(tmp_path_factory.mktemp("overlap") / "hf", tie=True, layers=2, hidden=64, vocab=128, seed=5)


def test_reference_process_gives_the_in_process_logits(tiny_hf):
    from llmbuild.verify.reference import OutOfVocabulary, ReferenceProcess, reference_logits

    ids = [3, 17, 42, 99, 5]
    expected = reference_logits(load_tiny_hf(tiny_hf), ids)
    with ReferenceProcess(tiny_hf, threads=1) as ref:
        got = ref.logits(ids)
        np.testing.assert_allclose(got, expected, atol=1e-5)  # the same model (its thread count may differ)
        with pytest.raises(OutOfVocabulary) as e:  # ids beyond the vocabulary: the same exception as in-process
            ref.logits([1, 128])
        assert e.value.vocab == 128
        ref.kill()
        with pytest.raises(UserError, match="ended unexpectedly"):
            ref.logits(ids)


def test_reference_process_reports_a_source_transformers_cannot_load(tmp_path):
    from llmbuild.verify.reference import ReferenceProcess

    pytest.importorskip("torch")
    (tmp_path / "config.json").write_text("{}")  # no model_type: transformers refuses it
    with ReferenceProcess(tmp_path) as ref, pytest.raises(UserError, match="transformers cannot load it"):
        ref.logits([1, 2])


def test_reference_is_prefetched_only_when_the_cache_lacks_its_outputs(tiny_hf, tmp_path):
    from llmbuild.buildcache import CachedReference, StageStore
    from llmbuild.compile import _ReferenceSupply
    from llmbuild.recipe import load_recipe

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"name: r\nmodel: {{source: {tiny_hf}}}\nprecision: float32\n"
                           "limits: {max_batch_size: 1, max_input_len: 16, max_seq_len: 64}\nengines: []\n")
    recipe = load_recipe(recipe_path)
    rd, store, fingerprint = recipe.to_dict(), StageStore(tmp_path / "cache"), "ab" * 32
    with _ReferenceSupply(recipe, rd, None, store) as supply:
        supply.prefetch(fingerprint)
        assert supply._reference is not None  # nothing cached: the load starts now
    cached = CachedReference.directory(store.dir, fingerprint)
    cached.mkdir(parents=True)
    np.savez(cached / "logits-0.npz", value=np.zeros((1, 128), np.float32))
    with _ReferenceSupply(recipe, rd, None, store) as supply:
        supply.prefetch(fingerprint)
        assert supply._reference is None  # outputs cached: the model loads only at a miss
    with _ReferenceSupply(recipe, rd, False, store) as supply:  # --no-verify
        supply.prefetch("cd" * 32)
        assert supply._reference is None


def test_stage_timings_are_in_pipeline_order():
    from llmbuild.compile import _stage_order

    ended = {"source": 0, "onnx": 1, "engine:tensorrt-rtx:portable": 2, "tokenizer": 3, "verify": 4, "cpu_graph": 5}
    assert list(_stage_order(ended)) == ["source", "onnx", "cpu_graph", "tokenizer", "engine:tensorrt-rtx:portable",
                                         "verify"]


def test_after_import_runs_its_callback_once_the_module_is_imported():
    code = (
        "import sys, json\n"
        "from llmbuild.progress import after_import\n"
        "seen = []\n"
        "after_import('colorsys', lambda m: seen.append(m.__name__))\n"
        "before = list(seen)\n"
        "import colorsys\n"
        "after_import('colorsys', lambda m: seen.append('again'))\n"  # already imported: at once
        "print(json.dumps([before, seen, 'colorsys' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [[], ["colorsys", "again"], True]


def test_installed_version_is_the_imported_modules():
    from llmbuild.engine.backends import import_backend, installed_version

    pytest.importorskip("tensorrt_rtx")
    trt = import_backend("tensorrt-rtx")
    assert installed_version("tensorrt-rtx") == (trt.__name__, trt.__version__)


def test_noop_recompile_imports_no_heavy_library(tiny_hf, tmp_path):
    """Every stage reused: neither torch/transformers (the reference), ONNX Runtime, onnx,
    onnx_ir nor TensorRT is imported (their imports were most of a no-op's seconds)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: {tiny_hf}}}\nprecision: float32\n"
                      "limits: {max_batch_size: 1, max_input_len: 16, max_seq_len: 64}\nengines: []\n"
                      "verify: {prompts: [hello]}\n")
    compile_args = [str(recipe), "-o", str(tmp_path / "out"), "-q", "--cache-dir", str(tmp_path / "cache")]
    subprocess.run([sys.executable, "-m", "llmbuild.cli", "compile", *compile_args], check=True, capture_output=True)
    code = (
        "import sys, json\n"
        "from llmbuild.cli import cli\n"
        f"try:\n    cli.main({['compile', *compile_args]!r}, standalone_mode=False)\n"
        "finally:\n"
        "    heavy = ('torch', 'transformers', 'onnxruntime', 'onnx', 'onnx_ir', 'tensorrt_rtx', 'sympy')\n"
        "    print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
    manifest = json.loads((tmp_path / "out" / "r" / "manifest.json").read_text())
    assert all(t["reused"] for t in manifest["timings"].values()), manifest["timings"]


def test_file_digests_are_memoised_by_stat_and_recomputed_when_it_changes(tmp_path):
    import hashlib
    import os

    from llmbuild.buildcache import file_digests

    f, memo = tmp_path / "weights.bin", tmp_path / "digests.json"  # (a cache directory that exists)
    f.write_bytes(b"a" * 1000)
    first = file_digests([f], memo)[str(f)]
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() and memo.is_file()
    st = os.stat(f)
    with open(f, "r+b") as fh:  # same inode, same size, mtime put back: the stat is unchanged
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_digests([f], memo)[str(f)] == first  # trusted, not read (what make and ninja do)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # mtime moved: read again
    assert file_digests([f], memo)[str(f)] == hashlib.sha256(b"b" + b"a" * 999).hexdigest()
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"c" * 1000)
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    os.replace(replacement, f)  # same size and mtime, another inode: read again
    assert file_digests([f], memo)[str(f)] == hashlib.sha256(b"c" * 1000).hexdigest()
    memo.write_text("not json")  # a damaged memo is ignored
    assert file_digests([f], memo)[str(f)] == hashlib.sha256(b"c" * 1000).hexdigest()
    assert file_digests([f])[str(f)] == hashlib.sha256(b"c" * 1000).hexdigest()  # no memo


def test_code_digest_is_the_same_with_and_without_the_memo(tmp_path):
    from llmbuild import buildcache

    buildcache.code_digest.cache_clear()
    saved = buildcache._digest_memo[0]
    try:
        buildcache._digest_memo[0] = None
        plain = buildcache.code_digest()
        buildcache.code_digest.cache_clear()
        buildcache._digest_memo[0] = tmp_path / "digests.json"
        assert buildcache.code_digest() == plain  # first with the memo: computed and recorded
        buildcache.code_digest.cache_clear()
        assert buildcache.code_digest() == plain  # from the memo
    finally:
        buildcache._digest_memo[0] = saved
        buildcache.code_digest.cache_clear()
