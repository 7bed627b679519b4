"""The artifact's CPU-ready graph (llmbuild/lowering/cpu_graph.py): written at compile,
loaded as is by the Python runtime, and numerically the graph the runtime would lower at
load (float and quantized: packed once, at compile); its files are covered by the
artifact's integrity checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llmbuild.compile import compile_recipe
from llmbuild.errors import UserError
from llmbuild.runtime import load
from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor
from tests.tiny import make_tiny_hf

PROMPTS = [[5, 40, 41, 42, 7], [3, 10, 20]]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu_graph")
    hf = make_tiny_hf(root / "hf", tie=True, layers=2, hidden=64, vocab=128, seed=11)
    out = {}
    for label, extra in (("float16", ""), ("int4", "quantization: {weights: {scheme: int4, group_size: 32}}\n")):
        recipe = root / f"{label}.yaml"
        recipe.write_text(f"name: t-{label}\nmodel: {{source: {hf}}}\nprecision: float16\n"
                          "limits: {max_batch_size: 2, max_input_len: 16, max_seq_len: 48}\nengines: []\n" + extra)
        out[label] = compile_recipe(recipe, out_dir=root / "out", quiet=True, verify=False, cache=False)
    return out


def greedy_logits(executor, prompt: list[int], steps: int = 6) -> np.ndarray:
    """Logits of a prefill and `steps` greedy decode steps through the executor."""
    from llmbuild.runtime.executors.base import StepInputs

    executor.reset(1)
    ids, rows = list(prompt), []
    pos = 0
    for i in range(steps + 1):
        new = ids if i == 0 else ids[-1:]
        n = len(new)
        step = StepInputs(
            input_ids=np.array([new], np.int64), position_ids=np.arange(pos, pos + n, dtype=np.int64)[None],
            write_indices=np.array([pos], np.int64), logits_indices=np.array([[n - 1]], np.int64))
        logits = executor.forward(step)[0, -1]
        rows.append(logits)
        pos += n
        ids.append(int(logits.argmax()))
    return np.stack(rows)


@pytest.mark.parametrize("label", ["float16", "int4"])
def test_the_shipped_graph_equals_lowering_at_load(artifacts, label):
    art = artifacts[label]
    manifest = json.loads((art / "manifest.json").read_text())
    entry = manifest["graph"]["cpu"]
    assert entry["file"] == "model/model.cpu.onnx"
    assert ("data" in entry) == (label == "int4")  # packed int4 weights: their own file; float: shared
    model = load(art, backend="onnxruntime", threads=1)
    assert model.executor.graph_source == "cpu_graph"
    at_load = OnnxRuntimeExecutor(art / "model" / "model.onnx", num_layers=2, cache_len=48, threads=1,
                                  cpu_lowering=True)
    assert at_load.graph_source == "lowered at load"
    for prompt in PROMPTS:
        np.testing.assert_array_equal(greedy_logits(model.executor, prompt), greedy_logits(at_load, prompt))
    model.close()
    at_load.close()


def test_standard_graph_still_selectable(artifacts):
    model = load(artifacts["float16"], backend="onnxruntime", threads=1, cpu_lowering=False)
    assert model.executor.graph_source == "standard" and not model.executor.lowered
    model.close()


def test_damaged_packed_weights_are_one_clear_message(artifacts, tmp_path):
    art = tmp_path / "damaged"
    shutil.copytree(artifacts["int4"], art)
    data = art / "model" / "model.cpu.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"model/model.cpu.onnx.data does not match the sha256 recorded in the "
                                        r"manifest \(graph.cpu"):
        load(art, backend="onnxruntime")
    data.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(UserError, match=r"the weights file model/model.cpu.onnx.data has \d+ bytes, the graph "
                                        r"model/model.cpu.onnx reads up to byte \d+ \(truncated\)"):
        load(art, backend="onnxruntime")
