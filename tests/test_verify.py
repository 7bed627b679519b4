"""Verification's greedy agreement by teacher forcing (llmbuild.verify.compare): HF runs one
forward pass over prompt + the continuation the CPU runtime's graph decoded, and its
argmax after every prefix gives the count two independent greedy loops give."""

from __future__ import annotations

import numpy as np
import pytest

from llmbuild.verify.compare import _artifact_logits, greedy_agreement, verify_artifact, verify_what_runs
from tests.tiny import compile_tiny, load_tiny_hf, make_tiny_hf

EOS = [2]


@pytest.mark.parametrize("continuation, stopped, ours_next, theirs_next, expected", [
    # decoded, identical, ran to its length: no stop decision
    ([5, 6, 7], False, None, [5, 6, 7, 9], (3, 3, True, [5, 6, 7], [5, 6, 7])),
    # decoded, HF would have chosen 8 at the second token: one equal of three
    ([5, 6, 7], False, None, [5, 8, 7, 9], (1, 3, False, [5, 6], [5, 8])),
    # decoded and stopped at EOS; HF would have continued: three equal of four
    ([5, 6, 7], True, None, [5, 6, 7, 9], (3, 4, False, [5, 6, 7], [5, 6, 7, 9])),
    # ... and HF stops too: identical
    ([5, 6, 7], True, None, [5, 6, 7, 2], (3, 3, True, [5, 6, 7], [5, 6, 7])),
    # stopped at once, both choose EOS: identical, one of one
    ([], True, None, [2], (0, 1, True, [], [])),
    # teacher-forced graph agrees with HF where the decoded graph left both: counted, then unknown
    ([5, 6, 7], False, [5, 8, 7, 9], [5, 8, 1, 9], (2, 3, False, [5, 8], [5, 8])),
    # teacher-forced graph diverges from HF first
    ([5, 6, 7], False, [4, 6, 7, 9], [5, 6, 7, 9], (0, 3, False, [4], [5])),
    # teacher-forced graph would not stop where the decoded graph and HF did
    ([5, 6], True, [5, 6, 9], [5, 6, 2], (2, 3, False, [5, 6], [5, 6])),
])
def test_greedy_agreement_counts(continuation, stopped, ours_next, theirs_next, expected):
    assert greedy_agreement(continuation, stopped, ours_next, theirs_next, EOS) == expected


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    model_dir = make_tiny_hf(root / "hf", seed=5)
    return model_dir, compile_tiny(model_dir, root / "out", precision="float16"), load_tiny_hf(model_dir)


PROMPTS = ("abc", "hello there", "a longer prompt of several words")


def leading_equal(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_teacher_forced_count_equals_two_greedy_loops(tiny16):
    """On a float16 graph (whose continuations can leave HF's), the decoded graph's count
    by teacher forcing equals the count of HF's own generate loop against ours."""
    import llmbuild
    from llmbuild.verify.reference import reference_greedy

    model_dir, art, hf = tiny16
    report = verify_artifact(art, model_dir, prompts=PROMPTS, reference_model=hf, cpu_lowering=None,
                             max_new_tokens=24)
    model = llmbuild.load(art, backend="onnxruntime")
    counts, loops = [], []
    for row in report["prompts"]:
        ids = model.encode(row["prompt"], chat=bool(model.tokenizer.chat_template))
        theirs = reference_greedy(hf, ids, 24, model.eos_token_ids)
        ours = model.generate_ids([ids], max_new_tokens=24)[0].token_ids
        assert row["continuation"] == ours and row["greedy"] == "decoded"
        counts.append((row["greedy_tokens_equal"], row["identical"]))
        loops.append((leading_equal(ours, theirs), ours == theirs))
    model.close()
    assert counts == loops
    assert all(r["positions"] == r["tokens"] + len(r["continuation"]) for r in report["prompts"])


def test_standard_graph_in_two_chunks_equals_one_pass(tiny16):
    """The standard graph's teacher-forced check runs the continuation over the KV cache
    the prompt wrote: the same logits as one pass over the whole sequence."""
    import llmbuild

    _, art, _ = tiny16
    model = llmbuild.load(art, backend="onnxruntime", cpu_lowering=False)
    seq = list(range(3, 40))
    whole, split = _artifact_logits(model.executor, seq), _artifact_logits(model.executor, seq, 11)
    model.close()
    assert whole.shape == split.shape == (len(seq), whole.shape[-1])
    np.testing.assert_allclose(split, whole, atol=2e-3)


def test_what_runs_checks_both_graphs_on_one_continuation(tmp_path):
    """float32: both graphs pass, the standard graph teacher-forced on the CPU graph's
    continuations, HF run once per prompt."""
    from llmbuild.buildcache import CachedReference

    model_dir = make_tiny_hf(tmp_path / "hf", seed=9)
    art = compile_tiny(model_dir, tmp_path / "out")
    hf = load_tiny_hf(model_dir)
    ref = CachedReference(None, "f" * 64, lambda: hf)
    report = verify_what_runs(art, model_dir, prompts=PROMPTS, reference_outputs=ref)
    assert report["passed"] and report["cpu_lowered"]["passed"], report["failures"]
    assert report["max_abs_logit_diff"] < 1e-4 and report["top1_agreement"] == 1.0
    assert report["greedy_agreement"] == 1.0 == report["cpu_lowered"]["greedy_agreement"]
    assert {r["greedy"] for r in report["prompts"]} == {"teacher-forced"}
    assert all(r["identical"] and r["text"] == r["reference_text"] for r in report["prompts"])
    assert ref.misses == len(PROMPTS)  # the second graph's sequences were the first's
