"""ONNX → TensorRT engine: real TensorRT-RTX builds of a tiny random Llama on the CPU.

Deserializing or running an engine needs a GPU: that part is the `gpu`-marked test at
the end, skipped (visibly) on machines without one. Everything the runtimes rely on
without a GPU, the I/O contract read from the parsed network, is checked here.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import onnx
import pytest

from llmbuild.engine.backends import BACKENDS, import_backend
from llmbuild.engine.build import (
    build_engine,
    cache_aliases,
    describe_network,
    parse_onnx,
    profiles_from_limits,
)
from llmbuild.errors import BuildError, UserError
from llmbuild.graph import io
from llmbuild.graph.export import save_model
from llmbuild.models.build import build_model
from llmbuild.source import open_source
from tests.tiny import make_tiny_hf

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 256
LIMITS = {"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 64}
GRAPH_MAX_SEQ_LEN = 128  # rotary tables; the engine's cache length (64) may be shorter


def tiny_onnx(dst: Path, precision: str, *, tie: bool) -> Path:
    model_dir = make_tiny_hf(
        dst / "hf", tie=tie, layers=LAYERS, num_heads=4, num_kv_heads=KV_HEADS, hidden=64, vocab=VOCAB, seed=0
    )
    with open_source(model_dir) as source:
        return save_model(build_model(source, precision, GRAPH_MAX_SEQ_LEN), dst / "onnx")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fp16 tiny model (tied embeddings: the Gemm transB head, as SmolLM2) built once."""
    root = tmp_path_factory.mktemp("engine")
    onnx_path = tiny_onnx(root, "float16", tie=True)
    calls = []
    engine_path = root / "engines" / "tensorrt-rtx-rank0.engine"
    result = build_engine(
        onnx_path,
        engine_path,
        backend="tensorrt-rtx",
        precision="float16",
        limits=LIMITS,
        num_layers=LAYERS,
        progress=lambda phase, done, total: calls.append((phase, done, total)),
    )
    return {"onnx": onnx_path, "engine": engine_path, "result": result, "progress": calls}


def expected_names():
    inputs = [io.INPUT_IDS, io.POSITION_IDS, io.WRITE_INDICES, io.LOGITS_INDICES]
    outputs = [io.LOGITS]
    for i in range(LAYERS):
        inputs += [io.past_key(i), io.past_value(i)]
        outputs += [io.present_key(i), io.present_value(i)]
    return inputs, outputs


# -- the built engine ---------------------------------------------------------------------


def test_engine_file_written_atomically_and_hashed(built):
    result, path = built["result"], built["engine"]
    data = path.read_bytes()
    assert len(data) > 100_000  # weights are embedded: 2 layers of fp16 + embedding
    assert result["file"] == path.name
    assert result["bytes"] == len(data)
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    assert result["backend"] == "tensorrt-rtx"
    assert result["trt_module"] == "tensorrt_rtx"
    assert result["trt_version"] == trt.__version__
    assert result["precision"] == "float16"
    assert result["build_seconds"] > 0


def test_io_contract_is_what_a_fresh_parse_of_the_onnx_gives(built):
    recorded = [{k: v for k, v in t.items() if k != "profile_shapes"} for t in built["result"]["io"]]
    parsed = parse_onnx(trt, built["onnx"], cache_len=LIMITS["max_seq_len"])
    assert recorded == describe_network(parsed.network)


def test_io_names_dtypes_and_shapes_follow_the_graph_contract(built):
    entries = {t["name"]: t for t in built["result"]["io"]}
    inputs, outputs = expected_names()
    assert [t["name"] for t in built["result"]["io"] if t["mode"] == "input"] == inputs
    assert [t["name"] for t in built["result"]["io"] if t["mode"] == "output"] == outputs
    for name in inputs[:4]:
        assert entries[name]["dtype"] == "int64"
    assert entries[io.WRITE_INDICES]["shape"] == [-1]
    assert entries[io.INPUT_IDS]["shape"] == [-1, -1]
    assert entries[io.LOGITS]["dtype"] == "float32"
    assert entries[io.LOGITS]["shape"] == [-1, -1, VOCAB]
    cache_shape = [-1, KV_HEADS, LIMITS["max_seq_len"], HEAD_DIM]  # cache length pinned
    for name in inputs[4:] + outputs[1:]:
        assert entries[name]["dtype"] == "float16"
        assert entries[name]["shape"] == cache_shape


def test_profile_ranges_are_the_limits(built):
    """Profile 0 (prefill) spans every prompt chunk, profile 1 (decode) one token per sequence."""
    b, s, t = LIMITS["max_batch_size"], LIMITS["max_input_len"], LIMITS["max_seq_len"]
    result = built["result"]
    entries = {t_["name"]: t_ for t_ in result["io"]}
    assert result["profile_names"] == ["prefill", "decode"]
    assert len(result["profiles"]) == 2
    for name in (io.INPUT_IDS, io.POSITION_IDS):
        (lo, opt, hi), (dlo, dopt, dhi) = entries[name]["profile_shapes"]
        assert lo == [1, 1] and hi == [b, s]
        assert opt[0] == b and 1 <= opt[1] <= s
        assert (dlo, dopt, dhi) == ([1, 1], [b, 1], [b, 1])
    assert entries[io.LOGITS_INDICES]["profile_shapes"] == [[[1, 1], [b, 1], [b, s]], [[1, 1], [b, 1], [b, 1]]]
    assert entries[io.WRITE_INDICES]["profile_shapes"] == [[[1], [b], [b]]] * 2
    for i in range(LAYERS):
        for name in (io.past_key(i), io.past_value(i)):
            assert entries[name]["profile_shapes"] == [
                [[1, KV_HEADS, t, HEAD_DIM], [b, KV_HEADS, t, HEAD_DIM], [b, KV_HEADS, t, HEAD_DIM]]
            ] * 2
    for t_ in result["io"]:
        assert ("profile_shapes" in t_) == (t_["mode"] == "input")
    for k in range(2):
        assert result["profiles"][k] == {
            name: entries[name]["profile_shapes"][k] for name in entries if entries[name]["mode"] == "input"
        }


def test_aliases_cover_every_cache_pair(built):
    assert built["result"]["aliases"] == {present: past for past, present in io.cache_pairs(LAYERS)}


def test_default_targets_are_the_portable_rtx_set(built):
    assert built["result"]["targets"] == {
        "compute_capabilities": ["sm80", "sm86", "sm89", "sm120"],
        "source": "tensorrt-rtx default (portable)",
        "hardware_compatibility": None,
    }


def test_progress_is_forwarded(built):
    calls = built["progress"]
    assert calls, "no progress reported"
    assert all(isinstance(p, str) and 0 <= done <= total for p, done, total in calls)
    top = [c for c in calls if c[0] == "Building engine"]
    assert top[0][1] == 0 and top[-1][1] == top[-1][2] > 0  # started and finished


def test_bf16_untied_with_explicit_targets(tmp_path):
    onnx_path = tiny_onnx(tmp_path, "bfloat16", tie=False)
    result = build_engine(
        onnx_path, tmp_path / "e.engine", backend="tensorrt-rtx", precision="bfloat16",
        limits={"max_batch_size": 1, "max_input_len": 8, "max_seq_len": 16}, num_layers=LAYERS,
        targets=["sm86", "SM89"],
    )
    assert result["targets"] == {"compute_capabilities": ["sm86", "sm89"], "source": "requested",
                                 "hardware_compatibility": None}
    assert result["label"] == "sm86-sm89"
    dtypes = {t["name"]: t["dtype"] for t in result["io"]}
    assert dtypes[io.LOGITS] == "float32" and dtypes[io.present_value(1)] == "bfloat16"
    assert (tmp_path / "e.engine").stat().st_size == result["bytes"]



def test_an_exception_in_progress_cancels_the_build(built, tmp_path):
    class Stop(Exception):
        pass

    def progress(phase, done, total):
        if done > 0:
            raise Stop(phase)

    with pytest.raises(Stop):
        build_engine(built["onnx"], tmp_path / "e.engine", backend="tensorrt-rtx", precision="float16",
                     limits=LIMITS, num_layers=LAYERS, progress=progress)
    assert list(tmp_path.iterdir()) == []

# -- failures a user or a broken graph can cause -----------------------------------------------


def test_float32_is_rejected_with_the_reason(built, tmp_path):
    with pytest.raises(UserError) as e:
        build_engine(built["onnx"], tmp_path / "e.engine", backend="tensorrt-rtx", precision="float32",
                     limits=LIMITS, num_layers=LAYERS)
    message = str(e.value)
    assert "fused attention" in message and "float16" in message and "engines: []" in message
    assert not (tmp_path / "e.engine").exists()


def test_precision_must_match_the_graph(built, tmp_path):
    with pytest.raises(BuildError, match="bfloat16"):
        build_engine(built["onnx"], tmp_path / "e.engine", backend="tensorrt-rtx", precision="bfloat16",
                     limits=LIMITS, num_layers=LAYERS)


def test_missing_backend_module_names_the_pip_package(built, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now fails
    with pytest.raises(UserError, match=r"pip install tensorrt \(TensorRT >= 10.15"):
        import_backend("tensorrt")
    with pytest.raises(UserError, match="pip install tensorrt"):
        build_engine(built["onnx"], tmp_path / "e.engine", backend="tensorrt", precision="float16",
                     limits=LIMITS, num_layers=LAYERS)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(UserError, match="pip install tensorrt-rtx-cu13"):
        import_backend("tensorrt-rtx")


def test_unknown_backend_and_target(built, tmp_path):
    with pytest.raises(UserError, match="tensorrt-rtx, tensorrt"):
        import_backend("tensorrt-llm")
    assert set(BACKENDS) == {"tensorrt-rtx", "tensorrt"}
    with pytest.raises(UserError, match="sm86"):
        build_engine(built["onnx"], tmp_path / "e.engine", backend="tensorrt-rtx", precision="float16",
                     limits=LIMITS, num_layers=LAYERS, targets=["sm90"])


def test_limits_beyond_the_graph_are_rejected(built, tmp_path):
    with pytest.raises(UserError, match="rotary"):
        build_engine(built["onnx"], tmp_path / "e.engine", backend="tensorrt-rtx", precision="float16",
                     limits={**LIMITS, "max_seq_len": GRAPH_MAX_SEQ_LEN + 1}, num_layers=LAYERS)
    with pytest.raises(UserError, match="max_input_len"):
        profiles_from_limits({**LIMITS, "max_input_len": 65}, num_layers=1, kv_heads=1, head_dim=1)


def test_unreadable_onnx_lists_parser_errors(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model\x00\x01\x02")
    with pytest.raises(BuildError) as e:
        build_engine(bad, tmp_path / "e.engine", backend="tensorrt-rtx", precision="float16",
                     limits=LIMITS, num_layers=LAYERS)
    assert "MODEL_DESERIALIZE_FAILED" in str(e.value) and str(bad) in str(e.value)
    assert not (tmp_path / "e.engine").exists()


def test_unsupported_node_is_named_in_the_error(built, tmp_path):
    model = onnx.load(built["onnx"], load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "RMSNormalization")
    node.op_type = "NoSuchOp"
    shutil.copy(built["onnx"].with_name("model.onnx.data"), tmp_path / "model.onnx.data")
    onnx.save(model, tmp_path / "model.onnx")
    with pytest.raises(BuildError) as e:
        build_engine(tmp_path / "model.onnx", tmp_path / "e.engine", backend="tensorrt-rtx",
                     precision="float16", limits=LIMITS, num_layers=LAYERS)
    assert f"node {node.name!r} (NoSuchOp" in str(e.value)


def test_cache_pairs_must_match_exactly():
    good = [
        {"name": "past_key.0", "mode": "input", "dtype": "float16", "shape": [-1, 2, 64, 16]},
        {"name": "past_value.0", "mode": "input", "dtype": "float16", "shape": [-1, 2, 64, 16]},
        {"name": "present_key.0", "mode": "output", "dtype": "float16", "shape": [-1, 2, 64, 16]},
        {"name": "present_value.0", "mode": "output", "dtype": "float16", "shape": [-1, 2, 64, 16]},
    ]
    assert cache_aliases(good, 1) == {"present_key.0": "past_key.0", "present_value.0": "past_value.0"}
    wrong_dtype = [dict(t, dtype="float32") if t["name"] == "present_value.0" else t for t in good]
    with pytest.raises(BuildError, match="present_value.0 float32"):
        cache_aliases(wrong_dtype, 1)
    wrong_len = [dict(t, shape=[-1, 2, 32, 16]) if t["name"] == "present_key.0" else t for t in good]
    with pytest.raises(BuildError, match="present_key.0"):
        cache_aliases(wrong_len, 1)
    with pytest.raises(BuildError, match="expected num_layers=2"):
        cache_aliases(good, 2)


# -- needs a GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    shutil.which("nvidia-smi") is None, reason="no NVIDIA GPU (nvidia-smi not found): deserializing an engine needs one"
)
def test_engine_deserializes_with_the_recorded_contract(built):
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(built["engine"].read_bytes())
    assert engine is not None
    contract = built["result"]["io"]
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert sorted(names) == sorted(t["name"] for t in contract)
    for t in contract:
        mode = engine.get_tensor_mode(t["name"])
        assert mode == (trt.TensorIOMode.INPUT if t["mode"] == "input" else trt.TensorIOMode.OUTPUT)
        assert list(engine.get_tensor_shape(t["name"])) == t["shape"]
        if t["mode"] == "input":
            shapes = engine.get_tensor_profile_shape(t["name"], 0)
            assert [list(s) for s in shapes] == t["profile_shapes"][0]


def test_build_errors_reach_the_error_recorder_and_the_logger_stays_in_cpp():
    """The builder's errors are kept by make_error_recorder (for BuildError), and the
    process logger is TensorRT's own C++ one (no Python call, hence no GIL, per message)
    unless logging listens at INFO."""
    from llmbuild.engine.build import make_error_recorder, make_logger

    trt = pytest.importorskip("tensorrt_rtx")
    logger = make_logger(trt)
    assert type(logger) is trt.Logger and make_logger(trt) is logger
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    network.add_input("x", trt.float32, (1, 4))  # no output: the build must fail
    recorder = make_error_recorder(trt)
    builder.error_recorder = recorder
    assert builder.build_serialized_network(network, builder.create_builder_config()) is None
    assert any("at least one output" in m for m in recorder.messages)
    del network, builder
