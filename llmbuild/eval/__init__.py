"""Accuracy of an artifact on held-out text: perplexity, and against a reference model
the mean KL divergence of the next-token distributions and top-1 agreement.

    report = evaluate("out/smollm2-int4", reference="out/smollm2-fp16")

Every metric is taken over the same positions: in each chunk of `seq_len` tokens,
positions 0..S-2 predict tokens 1..S-1 (no context carried between chunks).

    perplexity        exp(mean −log p(next token))
    kl_divergence     mean over positions of KL(p_ref ‖ p) in nats
    top1_agreement    fraction of positions where argmax p == argmax p_ref
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

from llmbuild.eval.corpus import DEFAULT_DATASET, read_text, token_chunks

DEFAULT_SEQ_LEN = 512
DEFAULT_TOKENS = 16384


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def chunk_metrics(logits: np.ndarray, ids: np.ndarray, ref_logits: np.ndarray | None = None,
                  rows: int = 128) -> dict:
    """Sums over one chunk: nll, kl, top-1 hits, positions (float64, `rows` positions at a
    time so that a 49k vocabulary does not need gigabytes of temporaries)."""
    from llmbuild.verify.finite import first_non_finite

    targets = np.asarray(ids[1:], np.int64)
    n = len(targets)
    out = {"nll": 0.0, "positions": n}
    for side, x in (("candidate", logits), ("reference", ref_logits)):
        hit = first_non_finite(x[:n]) if x is not None else None
        if hit is not None:  # NaN compares below every threshold: count it, the gate fails on it
            out[f"{side}_non_finite"] = {"position": hit[0], "vocab_index": hit[1],
                                         "positions": int((~np.isfinite(np.asarray(x[:n]))).any(-1).sum())}
    if ref_logits is not None:
        out |= {"ref_nll": 0.0, "kl": 0.0, "top1": 0}
    for a in range(0, n, rows):
        b = min(a + rows, n)
        lp = log_softmax(logits[a:b])
        t = targets[a:b]
        out["nll"] += float(-lp[np.arange(b - a), t].sum())
        if ref_logits is not None:
            lr = log_softmax(ref_logits[a:b])
            out["ref_nll"] += float(-lr[np.arange(b - a), t].sum())
            out["kl"] += float((np.exp(lr) * (lr - lp)).sum())
            out["top1"] += int((lp.argmax(-1) == lr.argmax(-1)).sum())
    return out


def summarize(totals: dict) -> dict:
    n = max(totals["positions"], 1)
    out = {"positions": totals["positions"], "perplexity": float(np.exp(totals["nll"] / n))}
    for side in ("candidate", "reference"):
        if f"{side}_non_finite" in totals:
            out[f"{side}_non_finite"] = totals[f"{side}_non_finite"]
    if "kl" in totals:
        ref_ppl = float(np.exp(totals["ref_nll"] / n))
        out |= {
            "reference_perplexity": ref_ppl,
            "perplexity_increase": out["perplexity"] / ref_ppl - 1.0,
            "kl_divergence": totals["kl"] / n,
            "top1_agreement": totals["top1"] / n,
        }
    return out


def dataset_tokens(tokenizer_json: Path, dataset: str = DEFAULT_DATASET, split: str = "evaluation",
                   base_dir: Path | None = None) -> list[int]:
    """The token ids of a dataset's text under a tokenizer (cached per process: several
    compiles of one model tokenize the same corpus once)."""
    import hashlib

    tok_bytes = Path(tokenizer_json).read_bytes()
    key = (hashlib.sha256(tok_bytes).hexdigest(), dataset, split, str(base_dir))
    return list(_tokens(key, tok_bytes))


@functools.lru_cache(maxsize=8)
def _tokens(key: tuple, tok_bytes: bytes) -> tuple[int, ...]:
    from tokenizers import Tokenizer

    _, dataset, split, base_dir = key
    tok = Tokenizer.from_str(tok_bytes.decode("utf-8"))
    text = read_text(dataset, split, Path(base_dir) if base_dir != "None" else None)
    return tuple(tok.encode(text, add_special_tokens=False).ids)


def evaluate_runners(candidate, reference, chunks: np.ndarray, progress=None) -> dict:
    """Metrics of `candidate` (and against `reference`, if given) over token `chunks`."""
    totals = {"nll": 0.0, "positions": 0}
    if reference is not None:
        totals |= {"kl": 0.0, "top1": 0, "ref_nll": 0.0}
    for i, ids in enumerate(chunks):
        ref = reference.logits(ids) if reference is not None else None
        logits = candidate.logits(ids)
        if ref is not None and i == 0:
            from llmbuild.verify.reference import check_same_vocabulary

            check_same_vocabulary(getattr(reference, "path", "?"), ref, getattr(candidate, "path", "?"), logits)
        m = chunk_metrics(logits, ids, ref)
        for k, v in m.items():
            if k.endswith("_non_finite"):  # the first chunk that has one, and a count
                first = totals.setdefault(k, {**v, "chunk": i, "positions": 0})
                first["positions"] += v["positions"]
                continue
            totals[k] += v
        if progress is not None:
            progress(i + 1, len(chunks))
    return summarize(totals)


def evaluate(
    artifact: str | Path, reference: str | Path | None = None, *, dataset: str = DEFAULT_DATASET,
    tokens: int = DEFAULT_TOKENS, seq_len: int = DEFAULT_SEQ_LEN, threads: int | None = None, progress=None,
) -> dict:
    """Evaluate an artifact (or .onnx graph) on `dataset`'s evaluation text."""
    from llmbuild.errors import UserError
    from llmbuild.eval.runners import artifact_graph, open_runner

    start = time.perf_counter()
    artifact = Path(artifact)
    graph = artifact_graph(artifact) if artifact.is_dir() else None
    if graph is None:
        raise UserError(f"{artifact} is not an artifact directory (no manifest.json)")
    from llmbuild.artifact import read_manifest
    from llmbuild.runtime.requests import check_field

    from llmbuild.artifact.integrity import check_artifact_files

    manifest = read_manifest(artifact)
    check_artifact_files(artifact, manifest)
    check_cpu_runnable(manifest, artifact, "eval")
    check_field("max_new_tokens", tokens, field="--tokens")
    check_field("max_new_tokens", seq_len, field="--seq-len")
    max_seq_len = manifest["limits"]["max_seq_len"]
    if seq_len > max_seq_len:
        raise UserError(f"--seq-len {seq_len} is longer than {artifact}'s max_seq_len {max_seq_len}; "
                        f"pass --seq-len {max_seq_len} or less")
    tokenizer_json = artifact / "tokenizer" / "tokenizer.json"
    ids = dataset_tokens(tokenizer_json, dataset, "evaluation", Path.cwd())
    count = max(1, tokens // seq_len)
    chunks = token_chunks(ids, seq_len, min(count, len(ids) // seq_len) if len(ids) >= seq_len else count,
                          where=f"dataset {dataset!r}")
    cand = open_runner(artifact, threads)
    ref = open_runner(reference, threads) if reference is not None else None
    try:
        report = evaluate_runners(cand, ref, chunks, progress)
    finally:
        cand.close()
        if ref is not None:
            ref.close()
    return {"artifact": str(artifact), "reference": str(reference) if reference is not None else None,
            "dataset": dataset, "split": "evaluation", "seq_len": seq_len, "chunks": len(chunks), **report,
            "seconds": round(time.perf_counter() - start, 2)}


def check_cpu_runnable(manifest: dict, artifact, command: str) -> None:
    """`eval` and `verify` run the graph on ONNX Runtime's CPU provider, which has no
    bfloat16 kernels: a UserError saying so, instead of a session error."""
    from llmbuild.errors import UserError

    precision = (manifest.get("model") or {}).get("precision")
    if precision == "bfloat16":
        raise UserError(f"{artifact}: a bfloat16 graph cannot run on ONNX Runtime's CPU provider (no bfloat16 "
                        f"kernels), so `{command}` cannot run it here; compile a float16 or float32 variant "
                        "(precision: float16) to evaluate on the CPU")


__all__ = ["check_cpu_runnable", "evaluate", "evaluate_runners", "chunk_metrics", "summarize", "log_softmax", "dataset_tokens"]
