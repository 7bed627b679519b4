"""`llmbuild eval` and its pieces: the bundled corpus (disjoint calibration / evaluation
parts), dataset files, the metrics against a direct computation, and perplexity of an
artifact equal to HF transformers' on the same chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from llmbuild.errors import UserError
from llmbuild.eval import chunk_metrics, evaluate, log_softmax
from llmbuild.eval.corpus import dataset_problem, read_text, token_chunks
from tests.tiny import load_tiny_hf, make_tiny_hf


def test_bundled_corpus_parts_do_not_overlap():
    cal, ev = read_text("kjv", "calibration"), read_text("kjv", "evaluation")
    assert len(cal) > 500_000 and len(ev) > 250_000
    assert cal.startswith("In the beginning God created the heaven and the earth.")
    assert read_text("kjv:evaluation", "calibration") == ev  # an explicit split wins
    for start in range(0, len(ev) - 200, 997):  # no 200-character passage of one is in the other
        assert ev[start:start + 200] not in cal


def test_dataset_files_and_problems(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"body": 2}\n')
    assert read_text("a.txt", "evaluation", tmp_path) == "plain text"
    assert read_text(str(tmp_path / "b.jsonl"), "calibration") == "one\n\ntwo"
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected a JSON object with a \"text\" field"):
        read_text("bad.jsonl", "evaluation", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        read_text("missing.txt", "evaluation", tmp_path)
    assert "has splits ['calibration', 'evaluation'], not 'test'" in dataset_problem("kjv:test")
    assert "expected a bundled corpus (kjv) or a path to a .txt or .jsonl file" in dataset_problem("wiki")


def test_token_chunks():
    ids = np.arange(1000)
    first = token_chunks(ids, 100, 3)
    np.testing.assert_array_equal(first, np.arange(300).reshape(3, 100))
    drawn = token_chunks(ids, 100, 4, seed=0)
    assert drawn.shape == (4, 100) and (drawn[:, 0] % 100 == 0).all() and len(set(drawn[:, 0])) == 4
    np.testing.assert_array_equal(drawn, token_chunks(ids, 100, 4, seed=0))
    with pytest.raises(UserError, match="10 chunks of 100, 11 requested"):
        token_chunks(ids, 100, 11)


def test_chunk_metrics_against_direct_computation():
    rng = np.random.default_rng(0)
    logits, ref = rng.standard_normal((6, 10)), rng.standard_normal((6, 10))
    ids = np.array([1, 4, 2, 9, 0, 3])
    m = chunk_metrics(logits, ids, ref)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    r = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    assert m["positions"] == 5
    assert m["nll"] == pytest.approx(-sum(np.log(p[i, ids[i + 1]]) for i in range(5)))
    assert m["kl"] == pytest.approx(sum((r[i] * np.log(r[i] / p[i])).sum() for i in range(5)))
    assert m["top1"] == sum(int(p[i].argmax() == r[i].argmax()) for i in range(5))
    same = chunk_metrics(logits, ids, logits)
    assert same["kl"] == pytest.approx(0, abs=1e-12) and same["top1"] == 5
    np.testing.assert_allclose(np.exp(log_softmax(logits)).sum(-1), 1)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from tests.tiny import compile_tiny

    root = tmp_path_factory.mktemp("eval")
    model_dir = make_tiny_hf(root / "hf", layers=2, hidden=64, vocab=256, seed=1)
    return model_dir, compile_tiny(model_dir, root / "out", name="tiny-eval")


def test_perplexity_equals_transformers_and_kl_to_itself_is_zero(tiny_artifact):
    torch = pytest.importorskip("torch")
    model_dir, artifact = tiny_artifact
    report = evaluate(artifact, model_dir, tokens=512, seq_len=128)
    assert report["chunks"] == 4 and report["positions"] == 4 * 127
    assert report["kl_divergence"] == pytest.approx(0, abs=1e-6) and report["top1_agreement"] == 1.0
    # HF transformers' own perplexity on the same chunks
    from llmbuild.eval import dataset_tokens

    ids = dataset_tokens(artifact / "tokenizer" / "tokenizer.json", "kjv", "evaluation")
    chunks = token_chunks(ids, 128, 4)
    hf = load_tiny_hf(model_dir).float()
    with torch.no_grad():
        out = hf(torch.from_numpy(chunks), labels=torch.from_numpy(chunks))
    assert report["perplexity"] == pytest.approx(float(torch.exp(out.loss)), rel=1e-4)
    assert report["reference_perplexity"] == pytest.approx(report["perplexity"], rel=1e-5)


def test_eval_cli(tiny_artifact, tmp_path):
    from llmbuild.cli import cli

    _, artifact = tiny_artifact
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", str(artifact), "--reference", str(artifact), "--dataset", str(text),
                                 "--tokens", "256", "--seq-len", "128", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["chunks"] == 2 and report["dataset"] == str(text)
    assert report["kl_divergence"] == pytest.approx(0, abs=1e-9) and 1 < report["perplexity"] < 1000
    result = runner.invoke(cli, ["eval", str(artifact), "--tokens", "128", "--seq-len", "128", "--no-reference"])
    assert result.exit_code == 0 and "perplexity" in result.output and "KL" not in result.output
    # by default: against the source the manifest records (the HF model the artifact was compiled from)
    result = runner.invoke(cli, ["eval", str(artifact), "--dataset", str(text), "--tokens", "256", "--seq-len", "128",
                                 "--json"])
    assert result.exit_code == 0, result.output
    default = json.loads(result.output)
    assert default["perplexity"] == report["perplexity"]
    assert default["kl_divergence"] == pytest.approx(0, abs=1e-4) and default["top1_agreement"] > 0.99
    result = runner.invoke(cli, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "is not an artifact directory" in result.output
