"""Calibration and the calibrated algorithms on random matrices and a tiny random Llama:
batched statistics equal the per-sample ones, the grid searches evaluated side by side
equal one point at a time, AWQ's clipping never raises a channel's output error, and
act-order GPTQ puts every row back where it belongs."""

from __future__ import annotations

import numpy as np
import pytest

from llmbuild.quantize.algorithms import (AWQ_GRID, _side_by_side, awq_search_clip, awq_search_scales,
                                          gptq_quantize)
from llmbuild.quantize.calibration import ActStats, AlgorithmOptions
from llmbuild.quantize.schemes import SCALE_SEARCH, Int4


def inputs(tokens=2048, k=256, seed=0, outliers=(3, 77, 150, 201, 90)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    x = x @ (np.eye(k) + 0.5 * rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)
    x[:, [o for o in outliers if o < k]] *= 25  # outlier channels, scattered (act-order must move them first)
    return x


def weight(k=256, n=48, seed=1):
    return (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(np.float32)


def column_errors(x, w, deq):
    """Σ over rows of (x·(w − deq))² per output column, in float64 from the rows."""
    d = x.astype(np.float64) @ (w.astype(np.float64) - deq)
    return np.sum(d * d, axis=0)


@pytest.mark.parametrize("scheme", [Int4(32), Int4(64, symmetric=False), Int4(128)], ids=lambda s: s.describe())
def test_side_by_side_quantization_is_each_variant_alone(scheme):
    w = weight(k=200, n=24)  # 200 rows: a short last block for every group size
    rng = np.random.default_rng(2)
    scales = rng.uniform(0.5, 2.0, (200, 3)).astype(np.float32)
    shrink = rng.uniform(0.5, 1.0, (scheme.num_groups(200), 3, 24)).astype(np.float32)
    variants = w[:, None, :] * scales[:, :, None]
    together = _side_by_side(scheme, variants, np.float16, shrink)
    for r in range(3):
        alone = scheme.quantize(variants[:, r], np.float16, shrink=shrink[:, r]).dequantize()
        np.testing.assert_array_equal(together[:, r], alone)


def test_awq_grid_loss_is_the_output_error_at_every_point():
    x, w = inputs(), weight()
    scheme = Int4(64)
    s, info = awq_search_scales(x.T @ x, np.abs(x).mean(0), [w], scheme, np.float32)
    # scored under the plain quantizer (shrink 1: the tight range, no searched factor)
    plain = np.ones((scheme.num_groups(w.shape[0]), w.shape[1]), np.float32)
    deq = scheme.quantize(w * s[:, None], np.float32, shrink=plain).dequantize() / s[:, None]
    assert info["loss"] == pytest.approx(column_errors(x, w, deq).sum(), rel=1e-3)
    alpha0 = scheme.quantize(w, np.float32).dequantize()  # α = 0 with w_mean's normalisation ≈ RTN of a scaled w
    assert info["loss"] <= info["loss_alpha0"] and 0 <= info["alpha"] < 1 and AWQ_GRID * info["alpha"] % 1 == 0
    assert info["loss"] < column_errors(x, w, alpha0).sum()


def test_awq_alpha_from_strided_columns_is_the_alpha_of_all_columns():
    x, w = inputs(k=128, tokens=1024), weight(k=128, n=1024, seed=8)
    scheme = Int4(32)
    h, mean = x.T @ x, np.abs(x).mean(0)
    s_all, all_cols = awq_search_scales(h, mean, [w], scheme, np.float32, columns=None)
    s_some, some = awq_search_scales(h, mean, [w], scheme, np.float32, columns=128)
    assert some["alpha"] == all_cols["alpha"] and some["loss"] < 0.2 * all_cols["loss"]  # 128 of 1024 columns
    np.testing.assert_array_equal(s_all, s_some)


@pytest.mark.parametrize("seed", range(4))
def test_awq_coarse_to_fine_alpha_is_the_full_grids(seed):
    """Every 4th α, then the neighbours of the best: 11 of the 20 points scored, the
    same α, scales and loss as scoring all 20 (on a valley with quantization noise)."""
    x, w = inputs(seed=seed, k=192), weight(k=192, n=96, seed=30 + seed)
    h, mean = x.T @ x, np.abs(x).mean(0)
    scheme = Int4(64)
    s_full, full = awq_search_scales(h, mean, [w], scheme, np.float16, coarse=1)
    s_fast, fast = awq_search_scales(h, mean, [w], scheme, np.float16)
    assert full["points_scored"] == AWQ_GRID and fast["points_scored"] <= 11
    assert fast["alpha"] == full["alpha"] and fast["loss"] == full["loss"]
    assert fast["loss_alpha0"] == full["loss_alpha0"]
    np.testing.assert_array_equal(s_fast, s_full)


def test_awq_coarse_search_refines_around_its_best_coarse_point(monkeypatch):
    """The refinement scores exactly the unscored grid points within 3 of the best coarse
    point, whatever the losses; with a loss whose minimum is off the coarse points, it
    is found."""
    from llmbuild.quantize import algorithms

    x, w = inputs(k=128, tokens=512), weight(k=128, n=16)
    scored = []
    target = 13  # α = 0.65: between the coarse points 12 and 16

    def fake_errors(h, delta):  # a valley at `target`, from each point's own scale
        n = delta.shape[1] // w.shape[1]
        scored.extend(pending.pop(0))
        return np.repeat([abs(p - target) + 1.0 for p in scored[-n:]], w.shape[1]) / w.shape[1]

    pending = []  # the batches in the order they are scored

    def grid_map(fn, parts):
        pending.extend(list(p) for p in parts)
        return [fn(p) for p in list(parts)]

    monkeypatch.setattr(algorithms, "_output_errors", fake_errors)
    monkeypatch.setattr(algorithms, "_grid_map", grid_map)
    _, info = awq_search_scales(x.T @ x, np.abs(x).mean(0), [w], Int4(64), np.float32)
    assert scored[:5] == [0, 4, 8, 12, 16]
    assert sorted(scored[5:]) == [9, 10, 11, 13, 14, 15]
    assert info["alpha"] == target / AWQ_GRID and info["points_scored"] == 11


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_increases_any_channels_output_error(seed, symmetric):
    x, w = inputs(seed=seed, k=192), weight(k=192, seed=10 + seed)
    w[5, :7] = 0.6  # weight outliers: clipping pays for their blocks' other rows
    scheme = Int4(64, symmetric=symmetric)
    shrink = awq_search_clip(x.T @ x, w, scheme, np.float32)
    assert shrink.shape == (3, 48) and shrink.min() >= 0.55 and shrink.max() <= max(SCALE_SEARCH)
    plain = column_errors(x, w, scheme.quantize(w, np.float32).dequantize())
    clipped = column_errors(x, w, scheme.quantize(w, np.float32, shrink=shrink).dequantize())
    assert np.all(clipped <= plain * (1 + 1e-5) + 1e-9)
    assert clipped.sum() < plain.sum()  # and it clips somewhere it pays


def test_act_order_gptq_beats_natural_order_on_scattered_outliers():
    x, w = inputs(k=256), weight(k=256, n=64, seed=7)
    h = x.T.astype(np.float64) @ x
    scheme = Int4(32)
    natural = gptq_quantize(w, h, scheme, np.float32)
    ordered = gptq_quantize(w, h, scheme, np.float32, act_order=True)
    assert ordered.scale.shape == natural.scale.shape == (8, 64) and ordered.block_size == 32
    e_nat, e_act = column_errors(x, w, natural.dequantize()).sum(), column_errors(x, w, ordered.dequantize()).sum()
    e_rtn = column_errors(x, w, scheme.quantize(w, np.float32).dequantize()).sum()
    assert e_act <= e_nat < e_rtn, (e_act, e_nat, e_rtn)


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_rows_land_where_they_belong(symmetric):
    """With a diagonal H nothing is pushed between rows, so GPTQ in any order is round to
    nearest with the static block parameters: codes equal RTN's exactly, however
    scrambled the order diag(H) imposes."""
    k, n = 96, 16
    w = weight(k=k, n=n, seed=3)
    diag = np.random.default_rng(4).permutation(np.arange(1, k + 1)).astype(np.float64)
    scheme = Int4(32, symmetric=symmetric)
    ordered = gptq_quantize(w, np.diag(diag), scheme, np.float32, act_order=True)
    rtn = scheme.quantize(w, np.float32)
    np.testing.assert_array_equal(ordered.data, rtn.data)
    np.testing.assert_array_equal(ordered.scale, rtn.scale)


def test_gptq_damp_is_a_fraction_of_the_mean_diagonal():
    """Scaling H scales its damping with it: the result does not depend on H's units."""
    x, w = inputs(k=128, tokens=512), weight(k=128, n=32)
    h = x.T.astype(np.float64) @ x
    scheme = Int4(32)
    a, b = gptq_quantize(w, h, scheme, np.float32, damp=0.1), gptq_quantize(w, 1e4 * h, scheme, np.float32, damp=0.1)
    assert np.mean(a.data == b.data) > 0.999
    c = gptq_quantize(w, h, scheme, np.float32, damp=0.9)  # heavy damping drifts toward RTN
    rtn = scheme.quantize(w, np.float32)
    assert np.mean(c.data == rtn.data) > np.mean(a.data == rtn.data)


def test_statistics_of_all_samples_at_once_equal_the_per_sample_sums():
    x = inputs(tokens=8 * 64, k=96).reshape(8, 64, 96)
    batched, per_sample = ActStats(96), ActStats(96)
    for c0 in range(0, 8, 4):
        batched.update(x[c0:c0 + 4], True)
    for sample in x:
        per_sample.update(sample[None], True)
    assert batched.amax == per_sample.amax and batched.rows == per_sample.rows == 512
    np.testing.assert_allclose(batched.mean_abs, per_sample.mean_abs, rtol=1e-6)
    np.testing.assert_allclose(batched.xtx, per_sample.xtx, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("scheme", [Int4(32), Int4(64, symmetric=False), Int4(128, scale_bits=8),
                                    Int4(32, symmetric=False, scale_bits=8)], ids=lambda s: s.describe())
@pytest.mark.parametrize("clipped", [False, True])
def test_fake_quantize_is_quantize_then_dequantize_bitwise(scheme, clipped):
    w = weight(k=200, n=24)  # a short last block
    w[5, 3] = 0.9  # an outlier: the scale search and the clip have something to do
    shrink = np.random.default_rng(3).uniform(0.5, 1.0, (scheme.num_groups(200), 24)).astype(np.float32)
    sh = shrink if clipped else None
    fake = scheme.fake_quantize(w, np.float16, shrink=sh)
    assert fake.dtype == np.float32 and fake.shape == w.shape
    np.testing.assert_array_equal(fake, scheme.quantize(w, np.float16, shrink=sh).dequantize())


def test_xtx_stride_is_every_row_wherever_gptq_reads_the_input():
    from llmbuild.quantize.plan import ModuleSpec

    awq, gptq, rtn = ModuleSpec("int4", "awq", 32), ModuleSpec("int4", "gptq", 32), ModuleSpec("int4", "rtn", 32)
    options = AlgorithmOptions(awq_hessian_stride=4)
    assert options.xtx_stride([awq, rtn]) == 4 and options.xtx_stride([awq, gptq]) == 1
    assert options.xtx_stride([rtn]) == 0 and options.xtx_stride([ModuleSpec("none")]) == 0
    assert AlgorithmOptions.from_recipe({"awq": {"hessian_stride": 8}}).awq_hessian_stride == 8
    with pytest.raises(ValueError, match="unresolved"):  # unset: calibrate() resolves it first
        AlgorithmOptions().xtx_stride([awq])
    assert AlgorithmOptions().xtx_stride([gptq]) == 1


def test_auto_hessian_stride_keeps_4096_rows_up_to_every_8th():
    from llmbuild.quantize.calibration import auto_hessian_stride

    assert [auto_hessian_stride(t) for t in (256, 4096, 8191, 8192, 16384, 32768, 65536, 10**6)] == \
        [1, 1, 1, 2, 4, 8, 8, 8]
    assert all(t // auto_hessian_stride(t) >= 4096 for t in (4096, 12288, 32768, 40000))


def test_auto_propagation_is_quantized_only_for_gptq():
    from llmbuild.quantize.plan import ModuleSpec

    awq = {"a": ModuleSpec("int4", "awq", 32), "b": ModuleSpec("int8")}
    gptq = {**awq, "c": ModuleSpec("int4", "gptq", 32)}
    assert AlgorithmOptions().float_propagation(awq) and not AlgorithmOptions().float_propagation(gptq)
    assert not AlgorithmOptions(propagate="quantized").float_propagation(awq)
    assert AlgorithmOptions(propagate="float").float_propagation(gptq)


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    """A tiny random Llama's float32 graph, its lazy weights and 8 calibration sequences."""
    pytest.importorskip("torch")
    from llmbuild.graph.export import save_model
    from llmbuild.models.build import build_model
    from llmbuild.source import open_source
    from tests.tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("calib")
    model_dir = make_tiny_hf(root / "hf", hidden=96, num_heads=6, num_kv_heads=2, layers=2, intermediate=160,
                             vocab=256, tie=False, seed=0)
    source = open_source(model_dir)
    model = build_model(source, "float32", 64)
    path = save_model(model, root / "ref")
    loaders = {n: v.meta["llmbuild.source_loader"] for n, v in model.graph.initializers.items()
               if "llmbuild.source_loader" in v.meta}
    tokens = np.random.default_rng(0).integers(0, 256, (8, 32)).astype(np.int64)
    return path, loaders, tokens


@pytest.mark.parametrize("algorithm", ["awq", "gptq"])
def test_calibration_in_chunks_equals_one_sample_at_a_time(tiny_graph, algorithm):
    """All samples through a layer in one ONNX Runtime call (chunk of 8 sequences) or one
    sequence per call: the same statistics, hence the same quantized weights."""
    from llmbuild.quantize.calibration import calibrate
    from llmbuild.quantize.plan import ModuleSpec

    path, loaders, tokens = tiny_graph
    plan = {w: ModuleSpec("int4", algorithm, 32) for w in loaders if w.endswith("proj.weight")}
    runs = {}
    for label, chunk in (("batched", 8 * 32), ("per_sample", 32)):
        runs[label] = calibrate(path, tokens, plan, loaders, kv_heads=2, head_dim=16, work_dir=path.parent,
                                scale_dtype=np.float32, threads=1, chunk_tokens=chunk)
    a, b = runs["batched"], runs["per_sample"]
    assert a.report["chunk_sequences"] == 8 and b.report["chunk_sequences"] == 1
    assert a.report["awq_hessian_stride"] == 1  # unset: 256 tokens keep every row (auto_hessian_stride)
    assert a.report["propagate"] == ("float" if algorithm == "awq" else "quantized")
    assert set(a.results) == set(plan) == set(b.results)
    for w in plan:
        assert a.activation_amax[w] == pytest.approx(b.activation_amax[w], rel=1e-5)
        assert np.mean(a.results[w].data == b.results[w].data) > 0.995, w
        np.testing.assert_allclose(a.results[w].scale, b.results[w].scale, rtol=1e-4)
    for name in a.floats:  # AWQ's scaled norms / up_proj columns
        np.testing.assert_allclose(a.floats[name], b.floats[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("partial,stride", [(False, 1), (True, 1), (True, 3)])
def test_statistics_in_the_slice_equal_numpy_on_the_activations(tiny_graph, tmp_path, partial, stride):
    """max |x|, Σ|x| and XᵀX computed by the nodes calibration adds to a layer slice
    equal ActStats.update (numpy) on the same activations fetched from the slice; Σ|x|
    also when summed in float32 over runs of rows first (what calibrate does), XᵀX also
    over every 3rd row (AWQ's `hessian_stride`)."""
    from llmbuild.quantize.calibration import (ActStats, GraphSlices, abs_sum_rows, decoder_feeds, ort_session,
                                               statistics_names)

    path, loaders, tokens = tiny_graph
    rows = abs_sum_rows(tokens.shape[1]) if partial else 1
    assert rows == (32 if partial else 1)  # 32-token sequences: runs of 32 rows
    slices = GraphSlices(path, lambda name: name in loaders)
    prefix, _ = slices.slice([slices.layer_inputs[0]], None, path.parent / "stats-prefix.onnx")
    sess = ort_session(prefix, 1)
    h0 = sess.run(None, decoder_feeds(sess, tokens, 2, 16))[0]
    acts = sorted(set(slices.linear_inputs(0).values()))
    assert len(acts) == 4  # q/k/v, o, gate/up, down
    statistics = {a: stride * (i % 2 == 0) for i, a in enumerate(acts)}  # with and without XᵀX
    p, weights = slices.slice(acts, slices.layer_inputs[0], path.parent / f"stats-layer0-{rows}-{stride}.onnx",
                              statistics=statistics, partial_rows=rows)
    sess = ort_session(p, 1)
    feeds = decoder_feeds(sess, tokens, 2, 16)
    feeds[slices.layer_inputs[0]] = h0
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, feeds)))
    for a, with_xtx in statistics.items():
        width = got[a].shape[-1]
        assert slices.input_width[a] == width
        ref, st = ActStats(width), ActStats(width)
        ref.update(got[a], with_xtx, stride)
        out = statistics_names(a, width, with_xtx)
        assert got[out["abs_sum"]].dtype == np.float64 and all(nm in got for nm in out["xtx"].values())
        blocks = {r0: got[nm] for r0, nm in out["xtx"].items()}
        st.add(got[out["amax"]], got[out["abs_sum"]], tokens.size, blocks or None)
        st.mirror()
        assert st.amax == ref.amax and st.rows == ref.rows == tokens.size
        if with_xtx and stride > 1:  # the slice's H is of the strided rows, not of every row
            full = got[a].reshape(-1, width)
            assert not np.allclose(st.xtx, full.T.astype(np.float64) @ full, rtol=1e-3)
        np.testing.assert_allclose(st.abs_sum, ref.abs_sum, rtol=1e-6)
        if with_xtx:
            np.testing.assert_array_equal(st.xtx, st.xtx.T)
            np.testing.assert_allclose(st.xtx, ref.xtx, rtol=1e-4, atol=1e-4 * np.abs(ref.xtx).max())
        else:
            assert st.xtx is None and not blocks


def test_abs_sum_rows_divide_the_sequence():
    from llmbuild.quantize.calibration import ABS_SUM_ROWS, abs_sum_rows

    assert abs_sum_rows(512) == ABS_SUM_ROWS == 64
    assert abs_sum_rows(96) == 32 and abs_sum_rows(40) == 8 and abs_sum_rows(7) == 1
    assert all(s % abs_sum_rows(s) == 0 for s in range(1, 600))


def test_xtx_in_block_rows_of_the_upper_triangle_is_the_whole_product(monkeypatch, tmp_path):
    """XᵀX from the slice's block rows (widths that split into several blocks, one short)
    equals the full product: every entry of the upper triangle is computed, the lower
    one mirrored."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from llmbuild.quantize import calibration
    from llmbuild.quantize.calibration import ActStats, statistics_names, statistics_nodes

    monkeypatch.setattr(calibration, "XTX_BLOCK", 32)
    x = inputs(tokens=300, k=100, outliers=(3, 77))  # blocks 0:32, 32:64, 64:96, 96:100
    assert calibration.xtx_row_blocks(100) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    axis0 = helper.make_tensor("axis0", TensorProto.INT64, [1], [0])
    names = statistics_names("x", 100)
    outs = [helper.make_tensor_value_info(nm, TensorProto.FLOAT, None) for nm in names["xtx"].values()]
    graph = helper.make_graph(statistics_nodes("x", 100, True, "axis0"), "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], outs, [axis0])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    got = ort.InferenceSession(model.SerializeToString()).run(list(names["xtx"].values()), {"x": x})
    for (r0, r1), block in zip(calibration.xtx_row_blocks(100), got):
        assert block.shape == (r1 - r0, 100 - r0)
    st, ref = ActStats(100), ActStats(100)
    for c0 in range(0, 300, 150):  # two chunks, summed in float64
        part = x[c0:c0 + 150]
        out = ort.InferenceSession(model.SerializeToString()).run(list(names["xtx"].values()), {"x": part})
        st.add(0.0, np.zeros(100), 150, dict(zip(names["xtx"], out)))
        ref.update(part, True)
    st.mirror()
    np.testing.assert_array_equal(st.xtx, st.xtx.T)
    np.testing.assert_allclose(st.xtx, ref.xtx, rtol=1e-5, atol=1e-5 * np.abs(ref.xtx).max())


def test_output_error_from_h_equals_the_error_over_the_rows():
    """The searches' objective tr(ΔᵀHΔ) per column (ONNX Runtime, float32, H = XᵀX)
    equals ‖XΔ‖² per column computed from the rows in float64 (numpy), for one Δ and for
    a batch of per-block Δ with their diagonal blocks of H."""
    from llmbuild.quantize.quadratic import column_quadratic_forms

    x = inputs(tokens=1024, k=192)
    rng = np.random.default_rng(5)
    delta = (rng.standard_normal((192, 40)) * 0.01).astype(np.float32)
    h = x.T @ x
    ref = column_errors(x, delta, np.zeros_like(delta))
    np.testing.assert_allclose(column_quadratic_forms(h, delta), ref, rtol=1e-4)
    hb = np.stack([h[i:i + 64, i:i + 64] for i in range(0, 192, 64)])  # [3, 64, 64]
    db = delta.reshape(3, 64, 40)
    ref_blocks = np.stack([column_errors(x[:, i:i + 64], db[b], np.zeros_like(db[b]))
                           for b, i in enumerate(range(0, 192, 64))])
    np.testing.assert_allclose(column_quadratic_forms(hb, db), ref_blocks, rtol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_searches_choose_what_the_numpy_objective_chooses(seed, monkeypatch):
    """AWQ's α and clip ratios with the objective on ONNX Runtime are those chosen with
    the plain numpy einsum of H·Δ (the reference the searches were written against)."""
    from llmbuild.quantize import algorithms

    x, w = inputs(seed=seed, k=256), weight(k=256, n=96, seed=20 + seed)
    w[7, :5] = 0.5
    h, mean = x.T @ x, np.abs(x).mean(0)
    scheme = Int4(64)
    fast_s, fast_info = awq_search_scales(h, mean, [w], scheme, np.float16)
    fast_clip = awq_search_clip(h, w * fast_s[:, None], scheme, np.float16)
    monkeypatch.setattr(algorithms, "column_quadratic_forms",
                        lambda a, d: np.einsum("...ij,...ij->...j", np.matmul(a, d), d))
    ref_s, ref_info = awq_search_scales(h, mean, [w], scheme, np.float16)
    ref_clip = awq_search_clip(h, w * ref_s[:, None], scheme, np.float16)
    assert fast_info["alpha"] == ref_info["alpha"]
    assert fast_info["loss"] == pytest.approx(ref_info["loss"], rel=1e-4)
    np.testing.assert_array_equal(fast_s, ref_s)
    np.testing.assert_array_equal(fast_clip, ref_clip)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_a_shared_inverse_is_gptq_from_h(act_order):
    """The linears of one input share GPTQ's factor of H⁻¹ (one inversion per input):
    each weight's codes and scales are exactly those computed from H alone."""
    from llmbuild.quantize.algorithms import gptq_inverse

    x = inputs(k=128, tokens=512)
    h = x.T.astype(np.float64) @ x
    h[:, 9] = h[9, :] = 0.0  # a dead input
    scheme = Int4(32, symmetric=False)
    inverse = gptq_inverse(h, 0.01, act_order)
    for seed in (1, 2):
        w = weight(k=128, n=24, seed=seed)
        alone = gptq_quantize(w, h, scheme, np.float16, damp=0.01, act_order=act_order)
        shared = gptq_quantize(w, None, scheme, np.float16, inverse=inverse)
        np.testing.assert_array_equal(shared.data, alone.data)
        np.testing.assert_array_equal(shared.scale, alone.scale)
        np.testing.assert_array_equal(shared.offset, alone.offset)


def test_overlapped_calibration_and_xtx_block_rows_give_the_serial_full_product_results(tiny_graph, monkeypatch):
    """AWQ (float propagation) with pass 1 of the next layer overlapping the quantization
    and XᵀX in block rows of its upper triangle quantizes exactly as the serial run with
    one full XᵀX product per input (up to XᵀX's summation order: codes ≥ 99.5 % equal)."""
    from llmbuild.quantize import calibration
    from llmbuild.quantize.plan import ModuleSpec

    path, loaders, tokens = tiny_graph
    plan = {w: ModuleSpec("int4", "awq", 32) for w in loaders if w.endswith("proj.weight")}

    def run(overlap, block):
        monkeypatch.setattr(calibration, "XTX_BLOCK", block)
        return calibration.calibrate(path, tokens, plan, loaders, kv_heads=2, head_dim=16, work_dir=path.parent,
                                     scale_dtype=np.float32, threads=1, overlap=overlap)

    serial, overlapped = run(False, 10_000), run(True, 48)  # widths 96 and 160: 2 and 4 block rows
    assert calibration.xtx_row_blocks(160) == [(0, 48), (48, 96), (96, 144), (144, 160)]
    assert not serial.report["overlap"] and overlapped.report["overlap"]
    assert "cpu_s" in serial.report["layers"][0] and "waited_s" in overlapped.report["layers"][0]
    assert set(serial.results) == set(overlapped.results) == set(plan)
    for a, b in zip(serial.report["layers"], overlapped.report["layers"], strict=True):  # the same α per group
        assert a["layer"] == b["layer"] and a["awq"].keys() == b["awq"].keys() and a["awq"]
        for group, info in a["awq"].items():
            assert info["alpha"] == b["awq"][group]["alpha"]
            assert info["loss"] == pytest.approx(b["awq"][group]["loss"], rel=1e-4)
    for w in plan:
        assert np.mean(serial.results[w].data == overlapped.results[w].data) > 0.995, w
        np.testing.assert_allclose(serial.results[w].scale, overlapped.results[w].scale, rtol=1e-4)
    for name in serial.floats:
        np.testing.assert_allclose(serial.floats[name], overlapped.floats[name], rtol=1e-4, atol=1e-6)
