"""llmbuild's CPU kernels (cpp/kernels, llmbuild/runtime/kernels.py): the custom-op library
built by cpp/build.sh, its `ai.llmbuild::MatMulNBits` against ONNX Runtime's own
`com.microsoft.MatMulNBits` at accuracy level 4 and against float64 products of the same
weights (every bit width and block size the lowering writes, short last blocks, column
counts that leave a partial task, several rows, all-zero activation blocks), which nodes the
executor swaps, and the executor's decode steps on them for tiny quantized Llamas (the same
logits and greedy tokens as on ONNX Runtime's kernels).

The test session runs with LLMBUILD_CPU_KERNELS=0 (tests/conftest.py), so every other test
runs ONNX Runtime's kernels whatever was built before; the tests here point the variable
at the library they built."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from llmbuild.lowering.quantized import pack_matmulnbits
from llmbuild.runtime import kernels
from llmbuild.runtime.executors.base import StepInputs
from tests.conftest import BUILD

LIBRARY = BUILD / kernels.LIBRARY


@pytest.fixture(scope="module")
def library(cpp_build, monkeypatch_module) -> Path:
    assert LIBRARY.is_file(), f"cpp/build.sh did not build {LIBRARY}"
    monkeypatch_module.setenv(kernels.ENV, str(LIBRARY))
    try:
        kernels.library()
    except kernels.KernelsUnavailable as e:
        pytest.skip(f"llmbuild's CPU kernels cannot run here: {e}")
    return LIBRARY


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def matmulnbits_model(domain: str, codes: np.ndarray, scales: np.ndarray, bits: int, block: int,
                      *, zero_points: bool = False, level: int = 4) -> onnx.ModelProto:
    k, n = codes.shape
    b, s = pack_matmulnbits(codes, scales, bits, block)
    inits = [helper.make_tensor("B", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
             helper.make_tensor("S", TensorProto.FLOAT, s.shape, s)]
    inputs = ["x", "B", "S"]
    if zero_points:
        zp = np.full(n * ((-(-k // block) * bits + 7) // 8), 0x88, np.uint8)
        inits.append(helper.make_tensor("Z", TensorProto.UINT8, zp.shape, zp.tobytes(), raw=True))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain=domain, K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])


def run(model: onnx.ModelProto, x: np.ndarray, library: Path | None = None) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if library is not None:
        opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("k,n", [(96, 40), (160, 100), (576, 960), (1536, 33)])
def test_kernel_computes_what_matmulnbits_level_4_does(library, bits, block, k, n):
    """Both quantize activations to int8 per block (max|a|/127, nearest even): ours equals
    ONNX Runtime's to float32 summation order (1e-5 of the output's range, measured ≤ 5e-7),
    and both are as far from the float64 product of the same weights. Rows: 1 (decode), 2, 3,
    6 and 9 (tiles of 4 and the rest as one tile); block 0 of row 1 all zeros (scale 0)."""
    rng = np.random.default_rng(bits * 100000 + block * 1000 + k + n)
    half = 1 << (bits - 1)
    codes = rng.integers(-half, half, (k, n))
    scales = (rng.random((-(-k // block), n)) * 0.02 + 1e-3).astype(np.float32)
    weights = codes * np.repeat(scales, block, axis=0)[:k].astype(np.float64)
    theirs_model = matmulnbits_model("com.microsoft", codes, scales, bits, block)
    ours_model = matmulnbits_model(kernels.DOMAIN, codes, scales, bits, block)
    for m in (1, 2, 3, 6, 9):
        x = (rng.standard_normal((m, k)) * rng.choice([0.1, 1.0, 30.0], (m, 1))).astype(np.float32)
        if m > 1:
            x[1, :block] = 0
        want = x.astype(np.float64) @ weights
        theirs, ours = run(theirs_model, x), run(ours_model, x, library)
        scale = np.abs(want).max()
        np.testing.assert_allclose(ours, theirs, atol=1e-5 * scale, rtol=0)
        err_ours, err_theirs = np.abs(ours - want).max(), np.abs(theirs - want).max()
        assert err_ours <= 1.01 * err_theirs + 1e-6 * scale
        assert err_ours < 0.02 * scale  # int8 activations: about 0.5 % here


def test_only_the_layouts_the_kernel_computes_are_swapped():
    """Zero points, other bit widths or block sizes and accuracy levels other than 4 stay
    ONNX Runtime's; the ai.llmbuild opset is added once."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    variants = {"ok4": (4, 64, False, 4), "ok8": (8, 128, False, 4), "zp": (4, 64, True, 4),
                "bits2": (2, 64, False, 4), "block16": (4, 16, False, 4), "level1": (4, 64, False, 1),
                "int4-g32": (4, 32, False, 4), "int8-g16": (8, 16, False, 4)}
    for name, (bits, block, zp, level) in variants.items():
        m = matmulnbits_model("com.microsoft", rng.integers(-2, 2, (64, 8)),
                              np.ones((-(-64 // block), 8), np.float32), bits, block, zero_points=zp, level=level)
        for t in m.graph.initializer:
            t.name = f"{name}_{t.name}"
            inits.append(t)
        node = m.graph.node[0]
        node.input[:] = ["x"] + [f"{name}_{i}" for i in node.input[1:]]
        node.output[:] = [name]
        nodes.append(node)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(v, TensorProto.FLOAT, [1, 8]) for v in variants], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    assert kernels.swap_matmulnbits(model) == 3
    assert {n.output[0]: n.domain for n in model.graph.node} == {
        "ok4": kernels.DOMAIN, "ok8": kernels.DOMAIN, "zp": "com.microsoft", "bits2": "com.microsoft",
        "block16": "com.microsoft", "level1": "com.microsoft", "int4-g32": kernels.DOMAIN, "int8-g16": "com.microsoft"}
    assert kernels.swap_matmulnbits(model) == 0
    assert [o.domain for o in model.opset_import].count(kernels.DOMAIN) == 1


def test_unavailable_kernels_say_why(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.ENV, "0")
    with pytest.raises(kernels.KernelsUnavailable, match="turned off"):
        kernels.library()
    monkeypatch.setenv(kernels.ENV, str(tmp_path / "nope.so"))
    with pytest.raises(kernels.KernelsUnavailable, match="is not a file"):
        kernels.library()
    (tmp_path / "bad.so").write_text("not a library")
    monkeypatch.setenv(kernels.ENV, str(tmp_path / "bad.so"))
    with pytest.raises(kernels.KernelsUnavailable, match="cannot load"):
        kernels.library()


# -- the executor ------------------------------------------------------------------------------

HIDDEN, INTER, LAYERS, CACHE_LEN = 96, 160, 2, 64
PROMPTS = ([5, 40, 77, 12, 90, 33, 61, 7, 88], [17, 18, 200, 4, 9])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llamas, int4 g64 (short last blocks at 96 and 160 inputs) and int8 per channel;
    float32, and float16 (its float weights Cast to float32: share_casts)."""
    from llmbuild.compile import compile_recipe
    from tests.test_quant_graph import write_recipe
    from tests.tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("cpu_kernels")
    hf = make_tiny_hf(root / "hf", hidden=HIDDEN, num_heads=6, num_kv_heads=2, layers=LAYERS,
                      intermediate=INTER, tie=False, seed=0)
    cases = {"int4-g64": ({"scheme": "int4", "group_size": 64}, "float32"), "int8": ({"scheme": "int8"}, "float32"),
             "int4-g64-fp16": ({"scheme": "int4", "group_size": 64}, "float16")}
    return {name: compile_recipe(write_recipe(root, name, hf, q, precision=p, verify={"enabled": False}),
                                 out_dir=root / "out", quiet=True)
            for name, (q, p) in cases.items()}


def trace(ex) -> list[np.ndarray]:
    """Prefills in slots 0 and 1 (9 and 5 rows: ONNX Runtime's kernels), then decode steps:
    two of both slots together (2 rows) and four of slot 0 alone (1 row): llmbuild's when
    in use."""
    out = []
    for slot, ids in enumerate(PROMPTS):
        n = len(ids)
        out.append(ex.forward(StepInputs(np.array([ids]), np.arange(n)[None], np.zeros(1, np.int64),
                                         np.arange(n)[None]), slot))
    lens = [len(p) for p in PROMPTS]
    for k in range(2):
        pos = np.array(lens) + k
        out.append(ex.forward(StepInputs(np.array([[3 + k], [8 + k]]), pos[:, None], pos, np.zeros((2, 1), np.int64))))
    for k in range(2, 6):
        p = np.array([lens[0] + k])
        out.append(ex.forward(StepInputs(np.array([[11 + k]]), p[:, None], p, np.zeros((1, 1), np.int64)), 0))
    return out


@pytest.mark.parametrize("case", ["int4-g64", "int8", "int4-g64-fp16"])
def test_executor_decodes_on_llmbuild_kernels(case, artifacts, library):
    from llmbuild.artifact import read_manifest
    from llmbuild.lowering.cpu_graph import cpu_graph_file
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    art = artifacts[case]
    m = read_manifest(art)

    def executor(cpu_kernels):
        return OnnxRuntimeExecutor(art / m["graph"]["file"], num_layers=LAYERS, cache_len=CACHE_LEN, batch_size=2,
                                   threads=2, cpu_graph=cpu_graph_file(art, m), cpu_kernels=cpu_kernels)

    ours, theirs = executor(True), executor(False)
    assert ours.kernels.startswith("llmbuild (") and theirs.kernels == "onnxruntime"
    assert ours._decode_session is not ours.session and ours._shared  # weights shared, not copied
    casts = [n for n in ours._shared if np.asarray(ours._shared[n].numpy()).dtype == np.float32
             and n not in {t.name for t in onnx.load(str(cpu_graph_file(art, m)), load_external_data=False).graph.initializer}]
    assert bool(casts) == case.endswith("fp16")  # the float16 weights' float32 copies, made once
    # passes of at most MAX_ROWS rows (batch x tokens) on ours, longer ones on ONNX Runtime's,
    # whichever came first for that slot range
    for tokens, session in ((3, ours._decode_session), (12, ours.session), (1, ours._decode_session)):
        assert ours._binding(0, 1, tokens, 1).session is session
    assert ours._binding(0, 2, 2, 1).session is ours._decode_session and kernels.MAX_ROWS == 4
    assert ours._binding(0, 2, 3, 1).session is ours.session
    for got, want in zip(trace(ours), trace(theirs)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    ours.close()
    theirs.close()


def test_llmbuild_load_generates_the_same_tokens_on_either_kernels(artifacts, library, monkeypatch):
    """The default (cpu_kernels=None) picks llmbuild's kernels when the library is found."""
    from llmbuild.runtime import load

    tokens = {}
    for setting in (str(library), "0"):
        monkeypatch.setenv(kernels.ENV, setting)
        model = load(artifacts["int4-g64"], backend="onnxruntime", threads=2)
        try:
            assert model.executor.kernels.startswith("llmbuild") == (setting != "0")
            tokens[setting] = model.submit(PROMPTS[0], max_new_tokens=12, ignore_eos=True).result().token_ids
        finally:
            model.close()
    assert len(tokens["0"]) == 12 and tokens[str(library)] == tokens["0"]


def test_a_named_library_that_cannot_run_is_a_warning(artifacts, monkeypatch, caplog, tmp_path):
    """LLMBUILD_CPU_KERNELS naming a missing file: ONNX Runtime's kernels, with a warning
    that says why (an unbuilt checkout library is only a debug message)."""
    from llmbuild.runtime import load

    monkeypatch.setenv(kernels.ENV, str(tmp_path / "missing.so"))
    with caplog.at_level("WARNING"):
        model = load(artifacts["int8"], backend="onnxruntime", threads=2)
    try:
        assert model.executor.kernels == "onnxruntime"
        assert "missing.so is not a file" in caplog.text
    finally:
        model.close()


def test_required_kernels_fail_clearly(artifacts, monkeypatch):
    from llmbuild.artifact import read_manifest
    from llmbuild.lowering.cpu_graph import cpu_graph_file
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    monkeypatch.setenv(kernels.ENV, "0")
    art = artifacts["int8"]
    m = read_manifest(art)
    with pytest.raises(kernels.KernelsUnavailable, match="turned off"):
        OnnxRuntimeExecutor(art / m["graph"]["file"], num_layers=LAYERS, cache_len=CACHE_LEN, threads=2,
                            cpu_graph=cpu_graph_file(art, m), cpu_kernels=True)


def test_share_casts_makes_each_float32_copy_once():
    """Cast(float16 initializer) → a float32 initializer of the Cast's output; the float16
    one is dropped unless another node reads it; Casts of inputs or to other types stay."""
    e16 = np.arange(12, dtype=np.float16).reshape(3, 4)
    inits = [helper.make_tensor(n, TensorProto.FLOAT16, e16.shape, e16.tobytes(), raw=True) for n in ("E", "G")]
    ext = helper.make_tensor("W", TensorProto.FLOAT, [1], [0.0])
    ext.ClearField("float_data")
    ext.data_location = TensorProto.EXTERNAL
    ext.external_data.add(key="location", value="model.data")
    nodes = [helper.make_node("Cast", ["E"], ["e32"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["G"], ["g32"], to=TensorProto.FLOAT),
             helper.make_node("Identity", ["G"], ["g16"]),
             helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["E"], ["e_int"], to=TensorProto.INT32)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
                              [helper.make_tensor_value_info(v, TensorProto.UNDEFINED, None)
                               for v in ("e32", "g32", "g16", "x32", "e_int")], inits + [ext])
    model = helper.make_model(graph)
    made = kernels.share_casts(model, {})
    assert set(made) == {"e32", "g32"} and made["e32"].dtype == np.float32
    np.testing.assert_array_equal(made["g32"], e16.astype(np.float32))
    assert [n.op_type for n in model.graph.node] == ["Identity", "Cast", "Cast"]  # x's and the int32 one
    names = {t.name: t for t in model.graph.initializer}
    assert "G" in names and "E" in names  # E: still read by the Cast to int32
    assert names["e32"].data_location == TensorProto.EXTERNAL and list(names["e32"].dims) == [3, 4]


def test_kernels_onnx_runtime_refuses_fall_back(artifacts, library, monkeypatch, caplog):
    """If ONNX Runtime refuses the library (here: a shared object that is no custom-op
    library, as a stale or foreign build would be), the default falls back to ONNX Runtime's
    kernels with a warning and decodes as before; cpu_kernels=True raises instead."""
    import ctypes.util

    from llmbuild.artifact import read_manifest
    from llmbuild.lowering.cpu_graph import cpu_graph_file
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    foreign = ctypes.util.find_library("m")
    assert foreign, "libm not found"
    monkeypatch.setattr(kernels, "library", lambda: Path(foreign))
    art = artifacts["int8"]
    m = read_manifest(art)

    def executor(cpu_kernels):
        return OnnxRuntimeExecutor(art / m["graph"]["file"], num_layers=LAYERS, cache_len=CACHE_LEN, batch_size=2,
                                   threads=2, cpu_graph=cpu_graph_file(art, m), cpu_kernels=cpu_kernels)

    with caplog.at_level("WARNING"):
        ex = executor(None)
    assert ex.kernels == "onnxruntime" and ex._decode_session is ex.session
    assert "ONNX Runtime refused them" in caplog.text
    reference = executor(False)
    for got, want in zip(trace(ex), trace(reference)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="RegisterCustomOps|symbol|libm"):
        executor(True)
