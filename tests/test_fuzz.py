"""Property-based tests (hypothesis) of the recipe loader and the manifest reader: a
generated input ends in a success or a UserError-class error, never another
exception. (The request validator's properties are in tests/test_requests.py.)

Reproducible: examples are derandomized (a fixed seed), and the hostile inputs found
so far are replayed every run (tests/hypothesis/recipes/, explicit @examples). Example
counts are bounded so the file runs in well under a minute on two cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmbuild.errors import UserError
from llmbuild.recipe import load_recipe
from llmbuild.recipe.matrix import load_variants

HERE = Path(__file__).parent
CORPUS = sorted((HERE / "hypothesis" / "recipes").glob("*.yaml"))
TINY_LLAMA = HERE / "data" / "recipes" / "tiny-llama"
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- the recipe loader ------------------------------------------------------------------------
KEYS = ["name", "model", "precision", "limits", "engines", "verify", "quantization", "parallel", "matrix", "extends",
        "max_seq_len", "max_batch_size", "max_input_len", "source", "backend", "compute_capabilities", "scheme",
        "tp", "enabled", "prompts"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.text(max_size=12),
    st.sampled_from(["float16", "float32", "bfloat16", "tensorrt-rtx", "tensorrt", "int4", "int8", "current",
                     "sm86", str(TINY_LLAMA), "t", "x.yaml", "/etc/passwd", "a\x00b"]),
)
TREES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
                     max_leaves=25)
TAGS = ["", "!!str ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!python/object:os.system ", "!!binary ",
        "!!timestamp ", "!custom ", "!!set "]


def _to_yaml(tree, tags: list[int]) -> str:
    """A flow-style YAML text of `tree`, some scalars with tags."""
    counter = iter(tags * 50)

    def emit(node) -> str:
        if isinstance(node, dict):
            return "{" + ", ".join(f"{json.dumps(k)}: {emit(v)}" for k, v in node.items()) + "}"
        if isinstance(node, list):
            return "[" + ", ".join(emit(v) for v in node) + "]"
        tag = TAGS[next(counter, 0) % len(TAGS)]
        text = json.dumps(node) if not isinstance(node, float) or node == node and abs(node) != float("inf") else (
            ".nan" if node != node else (".inf" if node > 0 else "-.inf"))
        return tag + text

    return emit(tree) + "\n"


def _expect_user_error_or_success(path: Path, overrides=()) -> None:
    try:
        load_variants(path, overrides)
    except UserError:
        pass


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_recipe_corpus(path):
    with pytest.raises(UserError):
        load_variants(path)


@settings(FUZZ, max_examples=150)
@given(tree=st.dictionaries(st.sampled_from(KEYS), TREES, max_size=8), tags=st.lists(st.integers(0, 40), max_size=6))
@example(tree={"name": "t", "model": {"source": str(TINY_LLAMA)}, "limits": {"max_seq_len": 128, "max_input_len": 64},
               "engines": []}, tags=[])
@example(tree={"name": "t", "matrix": {"precision": ["float16", "float32"], "limits.max_seq_len": [64, 128]},
               "model": {"source": str(TINY_LLAMA)}}, tags=[])
@example(tree={"name": "t", "extends": "/etc/passwd"}, tags=[])
def test_property_recipe_loader(tree, tags, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(_to_yaml(tree, tags))
    _expect_user_error_or_success(path)


@settings(FUZZ, max_examples=150)
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{},&*!|>'\"#\n \t01.~%@`?")), max_size=120))
@example(text="a: &a [*a]\n")
@example(text="- &x a\n- *x\n" * 5)
def test_property_recipe_loader_raw_text(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text("name: t\n" + text)
    _expect_user_error_or_success(path)


@settings(FUZZ, max_examples=100)
@given(overrides=st.lists(st.text(alphabet=st.sampled_from(list("abelimtsqxn_.=~[]{}!&*:0129 -")), max_size=30),
                          max_size=4))
@example(overrides=["limits.max_seq_len=!!float x", "name=!!python/name:os.system", "~"])
def test_property_overrides(overrides, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(f"name: t\nmodel: {{source: {TINY_LLAMA}}}\nlimits: {{max_seq_len: 128, max_input_len: 64}}\n")
    try:
        load_recipe(path, overrides)
    except UserError:
        pass


# -- the manifest reader ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory) -> Path:
    from tests.tiny import compile_tiny, make_tiny_hf

    root = tmp_path_factory.mktemp("fuzz-artifact")
    return compile_tiny(make_tiny_hf(root / "hf", seed=2), root / "out",
                        limits={"max_batch_size": 1, "max_input_len": 16, "max_seq_len": 32})


def _mutate(manifest: dict, path: list, value, delete: bool) -> dict:
    m = json.loads(json.dumps(manifest))
    node = m
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return m
    last = path[-1]
    if isinstance(node, dict):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    return m


MANIFEST_PATHS = st.sampled_from([
    ["schema_version"], ["name"], ["model"], ["model", "num_layers"], ["model", "vocab_size"], ["model", "precision"],
    ["limits"], ["limits", "max_seq_len"], ["limits", "max_batch_size"], ["limits", "max_input_len"], ["graph"],
    ["graph", "file"], ["graph", "weights"], ["tokenizer"], ["tokenizer", "dir"], ["tokenizer", "eos_token_ids"],
    ["tokenizer", "chat_template"], ["engines"], ["hashes", "graph"], ["parallel"],
])
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40),
              st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False), st.text(max_size=10),
              st.sampled_from(["../../etc/passwd", "model/model.onnx", "/", "tokenizer"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)


@settings(FUZZ, max_examples=120)
@given(edits=st.lists(st.tuples(MANIFEST_PATHS, JSON_VALUES, st.booleans()), min_size=1, max_size=3))
@example(edits=[(["schema_version"], True, False)])
@example(edits=[(["graph", "file"], "../../etc/passwd", False)])
@example(edits=[(["limits"], None, True)])
def test_property_manifest_reader(edits, tiny_artifact, tmp_path_factory):
    """A manifest with keys deleted or replaced by any JSON value: read_manifest and the
    artifact checks end in success or a UserError."""
    from llmbuild.artifact import read_manifest
    from llmbuild.artifact.integrity import check_artifact_files
    from llmbuild.runtime.tokenizer import Tokenizer

    art = tmp_path_factory.mktemp("fuzz-manifest") / "a"
    shutil.copytree(tiny_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    for path, value, delete in edits:
        manifest = _mutate(manifest, path, value, delete)
    (art / "manifest.json").write_text(json.dumps(manifest))
    try:
        m = read_manifest(art)
        check_artifact_files(art, m, hashes=False)
        tok = Tokenizer(art / (m["tokenizer"].get("dir") or "tokenizer"), m["tokenizer"])
        tok.encode("hello")
    except UserError:
        pass


@settings(FUZZ, max_examples=60)
@given(data=st.binary(max_size=200))
@example(data=b"[" * 50000)
@example(data=b"\xff\xfe{}")
def test_property_manifest_bytes(data, tiny_artifact, tmp_path_factory):
    from llmbuild.artifact import read_manifest

    art = tmp_path_factory.mktemp("fuzz-bytes")
    (art / "manifest.json").write_bytes(data)
    with pytest.raises(UserError):
        read_manifest(art)
