"""The Python runtime on tiny random models: the CPU lowering and the standard graph
against HF transformers, the in-place KV cache, continuous batching (staggered requests
equal each request alone), chunked prefill, sampling (reproducible seeds, statistics of
top-k/top-p/min-p, penalties, logprobs), stop conditions, streaming, threads, limits."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from llmbuild.errors import UserError
from llmbuild.graph import io
from llmbuild.runtime import load
from llmbuild.runtime.executors.base import StepInputs
from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor
from llmbuild.runtime.generator import IncrementalDetokenizer, Request, TextTracker
from llmbuild.runtime.sampling import SamplingParams, SplitMix64, apply_penalties, candidate_probabilities, sample
from llmbuild.runtime.scheduler import Scheduler, Sequence
from tests.tiny import EOS, compile_tiny, make_tiny_hf

LIMITS = {"max_batch_size": 4, "max_input_len": 16, "max_seq_len": 96}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(artifact, HF reference) of a tiny GQA Llama (fp32), compiled once."""
    root = tmp_path_factory.mktemp("runtime")
    model_dir = make_tiny_hf(root / "hf", num_heads=4, num_kv_heads=2, seed=21)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return compile_tiny(model_dir, root / "out", limits=LIMITS), ref


@pytest.fixture(scope="module")
def model(tiny):
    m = load(tiny[0], backend="onnxruntime")
    yield m
    m.close()


def hf_logits(ref, ids) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor([list(ids)])).logits[0].numpy()


def executor(artifact, *, lowering: bool, slots: int = 2, cache_len: int = 96, **kw) -> OnnxRuntimeExecutor:
    return OnnxRuntimeExecutor(artifact / "model" / "model.onnx", num_layers=2, cache_len=cache_len,
                               batch_size=slots, cpu_lowering=lowering, **kw)


def prompts(n: int, seed: int = 0, lo: int = 2, hi: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 256, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


# -- the graphs: lowered and standard, against HF ---------------------------------------------


@pytest.mark.parametrize("variant", ["gqa-untied", "mha-tied-fp16"])
def test_cpu_lowering_and_standard_graph_match_hf(variant, tmp_path):
    kwargs = {"gqa-untied": dict(num_heads=4, num_kv_heads=2, seed=3),
              "mha-tied-fp16": dict(num_heads=4, num_kv_heads=4, tie=True, seed=4)}[variant]
    precision = "float16" if variant.endswith("fp16") else "float32"
    model_dir = make_tiny_hf(tmp_path / "hf", **kwargs)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    art = compile_tiny(model_dir, tmp_path / "out", precision=precision, limits=LIMITS)
    a, b = prompts(2, seed=5, lo=20, hi=30)
    expect_a, expect_b = hf_logits(ref, a), hf_logits(ref, b)
    tol = {"float32": 1e-4, "float16": 2e-2}[precision]
    for lowering in (True, False):
        ex = executor(art, lowering=lowering)
        assert ex.lowered is lowering
        if lowering:  # 16-bit graphs are promoted: the CPU computes and caches in float32
            assert ex.cache_dtype == np.float32
        # Two sequences of different lengths as two ragged prefills in slots 0 and 1 ...
        for slot, ids in enumerate((a[:12], b[:7])):
            n = len(ids)
            out = ex.forward(StepInputs(np.array([ids]), np.arange(n)[None], np.zeros(1, np.int64),
                                        np.arange(n)[None]), slot)
            np.testing.assert_allclose(out[0], (expect_a if slot == 0 else expect_b)[:n], atol=tol, rtol=0)
        # ... then decode both together, each at its own write index, and a 3-token chunk.
        for k in range(4):
            pos = np.array([12 + k, 7 + k])
            ids = np.array([[a[12 + k]], [b[7 + k]]])
            out = ex.forward(StepInputs(ids, pos[:, None], pos, np.zeros((2, 1), np.int64)))
            np.testing.assert_allclose(out[0, 0], expect_a[12 + k], atol=tol, rtol=0)
            np.testing.assert_allclose(out[1, 0], expect_b[7 + k], atol=tol, rtol=0)
        out = ex.forward(StepInputs(np.array([b[11:14]]), np.arange(11, 14)[None], np.array([11]),
                                    np.arange(3)[None]), 1)
        np.testing.assert_allclose(out[0], expect_b[11:14], atol=tol, rtol=0)
        ex.close()


# -- the KV cache: in place, per slot range ---------------------------------------------------------


@pytest.mark.parametrize("lowering", [True, False])
def test_cache_is_updated_in_place_and_only_in_the_slot_range(tiny, lowering):
    art, _ = tiny
    ex = executor(art, lowering=lowering, slots=3)
    buffers = ex.cache_arrays()
    addresses = [b.ctypes.data for b in buffers]
    rng = np.random.default_rng(0)
    for buf in buffers:  # recognisable contents everywhere
        buf[...] = rng.standard_normal(buf.shape).astype(buf.dtype)
    before = [b.copy() for b in buffers]
    ids = [7, 8, 9, 10, 11]
    ex.forward(StepInputs(np.array([ids]), np.arange(3, 8)[None], np.array([3]), np.array([[4]])), 1)
    for buf, old, addr in zip(buffers, before, addresses):
        assert buf.ctypes.data == addr  # the same memory: bound, never reallocated
        changed = np.argwhere((buf != old).any(axis=(1, 3)))  # (slot, row) pairs that changed
        assert changed.size and set(changed[:, 0]) == {1}, "only slot 1 may change"
        assert set(changed[:, 1]) == set(range(3, 8)), "only the 5 written rows may change"


def test_decode_steps_on_bound_inputs_match_fresh_executors_and_profile(tiny, tmp_path):
    """Decode steps write into input arrays bound once: each step's logits equal those
    of an executor that saw the same tokens in one prefill (so no stale input is read),
    with the pool threads sleeping; the profiler records the lowered graph's kernels."""
    import json

    art, _ = tiny
    ids = [5, 9, 33, 70, 2, 41, 8]
    ex = executor(art, lowering=True, slots=2, spinning=False, profile=str(tmp_path / "trace"))
    ex.forward(StepInputs(np.array([ids[:3]]), np.arange(3)[None], np.array([0]), np.array([[2]])), 1)
    for n in range(3, len(ids)):
        p = np.array([n])
        got = ex.forward(StepInputs(np.array([[ids[n]]]), p[:, None], p, np.zeros((1, 1), np.int64)), 1)
        fresh = executor(art, lowering=True, slots=2)
        want = fresh.forward(StepInputs(np.array([ids[: n + 1]]), np.arange(n + 1)[None], np.array([0]),
                                        np.array([[n]])), 1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    events = json.loads(open(ex.end_profiling()).read())
    ops = {e["args"].get("op_name") for e in events if e.get("cat") == "Node"}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops


def test_no_whole_cache_copy_on_the_standard_graph(tiny, capfd):
    """ONNX Runtime's TensorScatter warns whenever it copies the cache ("in-place
    optimization not activated"); with past and present bound to one buffer it never does."""
    art, _ = tiny
    ex = executor(art, lowering=False, slots=2, log_severity=2)
    capfd.readouterr()
    for pos in range(3):
        ex.forward(StepInputs(np.array([[5], [6]]), np.full((2, 1), pos), np.full(2, pos), np.zeros((2, 1), np.int64)))
    assert "copying past_cache" not in capfd.readouterr().err
    # The control: the same session fed plain arrays (past and present apart) does copy.
    feeds = {io.INPUT_IDS: np.array([[5]]), io.POSITION_IDS: np.array([[0]]), io.WRITE_INDICES: np.zeros(1, np.int64),
             io.LOGITS_INDICES: np.zeros((1, 1), np.int64)}
    for past, _ in io.cache_pairs(2):
        feeds[past] = np.zeros((1, ex.kv_heads, 96, ex.head_dim), ex.cache_dtype)
    ex.session.run(None, feeds)
    assert "copying past_cache" in capfd.readouterr().err


# -- continuous batching ---------------------------------------------------------------------------


def run_scheduler(model, schedule: dict[int, list[Request]], *, slot_ranges: bool = True, max_num_tokens: int = 16):
    """Drive a Scheduler by hand: schedule[k] = requests submitted before step k."""
    results = {}
    sched = Scheduler(model.executor, num_slots=4, max_num_tokens=max_num_tokens, eos_token_ids=[EOS],
                      decode=model.tokenizer.decode)
    sched.slot_ranges = slot_ranges
    step = 0
    while step <= max(schedule) or sched.has_work():
        for req in schedule.get(step, []):
            key = len(results)
            results[key] = None
            sched.add(Sequence(request=req, submitted=float(step),
                               done=lambda g, key=key: results.__setitem__(key, g)))
        sched.step()
        step += 1
        assert step < 1000
    return [results[k] for k in range(len(results))], sched.stats


def test_staggered_requests_equal_each_alone(model, tiny):
    """Six requests of different lengths arrive while others run; 4 slots, so two wait for
    a slot that a finished sequence frees. Each greedy output equals the request alone,
    which equals HF's greedy continuation."""
    _, ref = tiny
    ps = prompts(6, seed=1, lo=2, hi=40)  # some longer than max_num_tokens=16: chunked
    lengths = [30, 5, 17, 40, 9, 22]
    reqs = [Request(tuple(p), n) for p, n in zip(ps, lengths)]
    alone = [run_scheduler(model, {0: [r]})[0][0].token_ids for r in reqs]
    staggered, stats = run_scheduler(model, {0: reqs[:2], 3: reqs[2:4], 4: [reqs[4]], 9: [reqs[5]]})
    assert [g.token_ids for g in staggered] == alone
    assert stats.prefill_passes > len(reqs)  # long prompts took several chunks
    assert stats.decode_rows > stats.decode_tokens or stats.padded_tokens == 0
    for p, toks in zip(ps[:3], alone[:3]):  # and they are HF's greedy tokens
        seq = list(p)
        for t in toks[:6]:
            assert int(hf_logits(ref, seq)[-1].argmax()) == t
            seq.append(t)


def test_one_pass_over_all_slots_with_padding_gives_the_same_tokens(model):
    """Executors without slot ranges (tensor-parallel ones) run prefill and decode rows
    together, right-padded; the tokens are the same and the padding is counted."""
    ps = prompts(5, seed=2, lo=2, hi=30)
    reqs = [Request(tuple(p), 12) for p in ps]
    ranged, s1 = run_scheduler(model, {0: reqs[:3], 2: reqs[3:]})
    padded, s2 = run_scheduler(model, {0: reqs[:3], 2: reqs[3:]}, slot_ranges=False)
    assert [g.token_ids for g in padded] == [g.token_ids for g in ranged]
    assert s1.padded_tokens < s2.padded_tokens and 0 < s2.padding_fraction < 1


def test_chunked_prefill_equals_one_pass(model):
    (p,) = prompts(1, seed=3, lo=45, hi=46)
    whole, _ = run_scheduler(model, {0: [Request(tuple(p), 10)]}, max_num_tokens=64)
    chunked, stats = run_scheduler(model, {0: [Request(tuple(p), 10)]}, max_num_tokens=4)
    assert chunked[0].token_ids == whole[0].token_ids
    assert stats.prefill_passes == -(-45 // 4)


def test_seeded_sampling_is_the_same_alone_batched_and_staggered(model):
    ps = prompts(4, seed=4)
    params = [SamplingParams(temperature=1.2, top_k=40, top_p=0.95, min_p=0.01, seed=s) for s in (1, 2, 3, 1)]
    reqs = [Request(tuple(p), 20, sp) for p, sp in zip(ps, params)]
    alone = [run_scheduler(model, {0: [r]})[0][0].token_ids for r in reqs]
    together = [g.token_ids for g in model.generate_ids(ps, max_new_tokens=20, params=params)]
    staggered = [g.token_ids for g in run_scheduler(model, {0: [reqs[2]], 2: [reqs[0], reqs[3]], 5: [reqs[1]]})[0]]
    assert together == alone
    assert [staggered[1], staggered[3], staggered[0], staggered[2]] == alone
    other_seed = model.generate_ids([ps[0]], max_new_tokens=20, params=SamplingParams(temperature=1.2, seed=77))
    assert other_seed[0].token_ids != alone[0]


# -- sampling -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_logits(model):
    ex = model.executor
    ids = [5, 40, 41, 42, 17]
    out = ex.forward(StepInputs(np.array([ids]), np.arange(5)[None], np.zeros(1, np.int64), np.array([[4]])))
    model.engine.scheduler.ensure_cache()
    return out[0, 0] * 8.0  # sharper than a random model's nearly flat distribution


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=1.5, top_k=20, top_p=0.9, min_p=0.05),
])
def test_sampled_tokens_follow_the_truncated_distribution(tiny_logits, params):
    ids, p = candidate_probabilities(tiny_logits, params)
    x = tiny_logits.astype(np.float64) / params.temperature
    full = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    if params.top_k:
        assert len(ids) <= params.top_k and set(ids) == set(np.argsort(-tiny_logits, kind="stable")[: len(ids)])
    if params.top_p < 1:
        assert p.sum() == pytest.approx(1.0) and full[ids[:-1]].sum() < params.top_p * (1 + 1e-9)
    if params.min_p:
        assert (p >= params.min_p * p[0] - 1e-12).all()
    rng = SplitMix64(42)
    n = 6000
    draws = np.array([sample(tiny_logits, params, rng) for _ in range(n)])
    assert set(draws) <= set(ids.tolist())  # never outside the kept candidates
    freq = np.array([(draws == t).mean() for t in ids])
    # Each frequency within 5 binomial standard deviations of its probability.
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-3).all()


def test_top_k_matches_a_full_stable_sort_with_ties():
    logits = np.array([1, 3, 3, 2, 3, 0, 3], np.float32)
    ids, _ = candidate_probabilities(logits, SamplingParams(temperature=1.0, top_k=3))
    assert ids.tolist() == [1, 2, 4]


def test_engine_top_k_never_leaves_the_top_k(model):
    """Through the whole engine: every sampled token is among the top 3 of the model's
    own distribution at that step (logprobs report it)."""
    params = [SamplingParams(temperature=2.0, top_k=3, seed=s) for s in range(6)]
    gens = model.generate_ids(prompts(6, seed=6), max_new_tokens=16, params=params, logprobs=3)
    steps = 0
    for g in gens:
        for lp in g.logprobs:
            assert lp.token_id in [t for t, _ in lp.top]
            steps += 1
    assert steps >= 6 * 8


def test_penalties():
    logits = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, p, prompt_ids=[0], output_ids=[1, 3, 3])
    np.testing.assert_allclose(out, [1.0, -2.0 - 0.75, 0.5, 1.5 - 1.0])
    assert apply_penalties(logits, SamplingParams(), [0], [1]) is logits  # defaults: untouched


def test_penalties_steer_greedy_decoding_away_from_seen_tokens(model):
    p = [5, 6, 7, 8] * 5
    plain = model.generate_ids([p], max_new_tokens=40)[0].token_ids
    assert len(set(plain)) < len(plain)  # the random model repeats itself
    rep = model.generate_ids([p], max_new_tokens=40, params=SamplingParams(repetition_penalty=1e4))[0].token_ids
    assert not set(rep) & set(p) and len(set(rep)) == len(rep)
    pres = model.generate_ids([p], max_new_tokens=40, params=SamplingParams(presence_penalty=1e3))[0].token_ids
    assert len(set(pres)) == len(pres)


def test_logprobs_are_the_models_log_softmax(model, tiny):
    _, ref = tiny
    (p,) = prompts(1, seed=8)
    (g,) = model.generate_ids([p], max_new_tokens=5, logprobs=2)
    seq = list(p)
    for lp in g.logprobs:
        x = torch.log_softmax(torch.tensor(hf_logits(ref, seq)[-1], dtype=torch.float64), -1).numpy()
        assert lp.logprob == pytest.approx(x[lp.token_id], abs=1e-4)
        assert [t for t, _ in lp.top] == np.argsort(-x, kind="stable")[:2].tolist()
        seq.append(lp.token_id)


# -- stopping, text, API ----------------------------------------------------------------------------


def test_finish_reasons_eos_and_length(model):
    gens = model.generate_ids(prompts(8, seed=9), max_new_tokens=40,
                              params=SamplingParams(temperature=3.0, seed=3))
    reasons = {g.finish_reason for g in gens}
    assert reasons <= {"eos", "length"}
    for g in gens:
        assert EOS not in g.token_ids
        assert (len(g.token_ids) == 40) == (g.finish_reason == "length")


def test_stop_strings_cut_the_text_and_never_reach_the_stream(model):
    (p,) = prompts(1, seed=10)
    (full,) = model.generate_ids([p], max_new_tokens=40)
    text = full.text
    stop = text[12:14]
    assert stop and text.find(stop) >= 0
    (g,) = model.generate_ids([p], max_new_tokens=40, stop=[stop, "\x00never"])
    assert g.finish_reason == "stop" and g.text == text[: text.find(stop)]
    deltas = list(model.submit(p, max_new_tokens=40, stop=[stop], stream=True))
    assert "".join(deltas) == g.text


def test_stream_deltas_join_to_the_generated_text(model):
    out = "".join(model.stream("ab", max_new_tokens=25, temperature=1.0, seed=5))
    (g,) = model.generate("ab", max_new_tokens=25, temperature=1.0, seed=5)
    assert out == g.text and len(out) > 0


def test_chat_uses_the_template(model):
    g = model.chat([{"role": "user", "content": "hi"}], max_new_tokens=4)
    ids = model.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert g.prompt_token_ids == ids


def test_submission_from_several_threads(model):
    ps = prompts(8, seed=11)
    expected = [g.token_ids for g in model.generate_ids(ps, max_new_tokens=12)]
    results: dict[int, list[int]] = {}

    def worker(i):
        results[i] = model.generate_ids([ps[i]], max_new_tokens=12)[0].token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(8)] == expected


def test_requests_beyond_the_limits_are_clear_errors(model):
    with pytest.raises(UserError, match=r"max_seq_len=96"):
        model.generate_ids([[5] * 90], max_new_tokens=10)
    with pytest.raises(UserError, match="empty prompt"):
        model.generate_ids([[]])
    with pytest.raises(UserError, match="outside the vocabulary"):
        model.generate_ids([[5, 300]])
    with pytest.raises(UserError, match="max_new_tokens"):
        model.generate_ids([[5]], max_new_tokens=0)
    # A long prompt within max_seq_len is fine: it is prefilled in chunks of max_input_len.
    (g,) = model.generate_ids([list(range(5, 85))], max_new_tokens=4)
    assert len(g.token_ids) <= 4


def test_cancelled_stream_frees_its_slot(model):
    it = iter(model.submit([5, 6, 7], max_new_tokens=80, stream=True, params=SamplingParams(temperature=1.0)))
    next(it, None)
    it.close()
    gens = model.generate_ids(prompts(4, seed=12), max_new_tokens=5)  # all four slots are free again
    assert len(gens) == 4


def test_incremental_detokenizer_handles_multibyte_text(smollm2_path, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer  # noqa: F401 - the artifact's tokenizer library

    from llmbuild.source import open_source

    with open_source(smollm2_path) as source:
        info = source.export_tokenizer(tmp_path)
    from llmbuild.runtime.tokenizer import Tokenizer

    tok = Tokenizer(tmp_path, {"eos_token_ids": [], **{k: info.get(k) for k in ("bos_token_id",)}})
    text = "Grüße — naïve café 東京 🙂🚀 done"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok.decode)
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    tracker = TextTracker(tok.decode, ["東京"])
    streamed = "".join([tracker.add(t) for t in ids] + [tracker.finish()])
    assert tracker.stopped and streamed == tracker.text == "Grüße — naïve café "


# -- CLI: chat and bench -----------------------------------------------------------------------------


def test_cli_chat_reads_messages_until_eof(tiny):
    from click.testing import CliRunner

    from llmbuild.cli import cli

    art, _ = tiny
    m = load(art, backend="onnxruntime")
    first = m.chat([{"role": "user", "content": "hi"}], max_new_tokens=8).text
    m.close()
    result = CliRunner().invoke(cli, ["chat", str(art), "--max-new-tokens", "8"], input="hi\n/reset\nhi\n")
    assert result.exit_code == 0, result.output
    assert result.output.count(first) == 2  # /reset: the second "hi" starts a fresh conversation


def test_cli_bench_reports_every_figure(tmp_path):
    import json

    from click.testing import CliRunner

    from llmbuild.cli import cli

    model_dir = make_tiny_hf(tmp_path / "hf", seed=2)
    art = compile_tiny(model_dir, tmp_path / "out", limits={"max_batch_size": 4, "max_input_len": 64, "max_seq_len": 256})
    result = CliRunner().invoke(cli, ["bench", str(art), "--repeats", "1", "--new-tokens", "4", "--batch", "2", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["prefill_128_tokens_per_s"] > 0 and r["prefill_1024_tokens_per_s"] is None  # max_seq_len 256
    assert r["decode_batch1_tokens_per_s"] > 0 and r["decode_batch2_tokens_per_s"] > 0
    assert 0 < r["itl_batch1_median_ms"] <= r["itl_batch1_p90_ms"]
    assert r["python_overhead_ms_batch1"] >= 0 and 0 <= r["staggered_padding_fraction"] < 1
    assert r["peak_rss_mib"] > 0
    assert r["cpu_kernels"] == "onnxruntime"  # the test session turns llmbuild's off (conftest)
