"""Compare an artifact's ONNX graph on ONNX Runtime with HF transformers.

Per prompt: teacher-forced logits over the whole sequence (max |Δlogit|, top-1
agreement), and greedy continuations generated independently by both sides
(greedy-token agreement: tokens equal up to the first divergence, over all tokens).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmbuild.runtime.executors.base import StepInputs
from llmbuild.verify.finite import first_non_finite, non_finite_message

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a compiler does.",
)

# Chosen from measured figures (docs/architecture.md, "Verification thresholds"):
# float32 sits orders of magnitude below its bound; float16 moved SmolLM2's logits by
# 0.083 at most (top-1 and 48-token greedy identical), so 0.5 leaves a 6x margin.
_DEFAULTS = {
    "float32": (1e-3, 0.99, 1.0),
    "float16": (0.5, 0.95, 0.75),
    "bfloat16": (2.0, 0.90, 0.5),
}


@dataclass(frozen=True)
class Thresholds:
    max_abs_logit_diff: float
    min_top1_agreement: float
    min_greedy_agreement: float


def default_thresholds(precision: str, overrides: dict | None = None) -> Thresholds:
    a, t, g = _DEFAULTS[precision]
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    return Thresholds(
        max_abs_logit_diff=o.get("max_abs_logit_diff", a),
        min_top1_agreement=o.get("min_top1_agreement", t),
        min_greedy_agreement=o.get("min_greedy_agreement", g),
    )


class _DirectReference:
    def __init__(self, model):
        self.model = model

    def logits(self, ids):
        from llmbuild.verify.reference import reference_logits

        return reference_logits(self.model, ids)

    def greedy(self, ids, max_new_tokens, eos_token_ids):
        from llmbuild.verify.reference import reference_greedy

        return reference_greedy(self.model, ids, max_new_tokens, eos_token_ids)


def _artifact_logits(executor, ids: list[int]) -> np.ndarray:
    executor.reset(1)
    n = len(ids)
    arange = np.arange(n, dtype=np.int64)[None]
    step = StepInputs(np.array([ids], np.int64), arange, np.zeros(1, np.int64), arange)
    return executor.forward(step)[0]


def fit_prompt(ids: list[int], max_new_tokens: int, max_seq_len: int) -> tuple[list[int], int]:
    """A prompt and greedy length that fit the artifact's max_seq_len: a short artifact
    (max_seq_len 64) compares fewer greedy tokens (at least a quarter of the cache) and,
    if needed, the prompt's first tokens only; both sides see the same ids."""
    new_tokens = max(1, min(max_new_tokens, max_seq_len - len(ids), max_seq_len // 4))
    if len(ids) + max_new_tokens <= max_seq_len:
        new_tokens = max_new_tokens
    return list(ids[: max_seq_len - new_tokens]), new_tokens


def verify_what_runs(artifact, reference, **kwargs) -> dict:
    """Verify every graph a runtime executes on this artifact: the standard graph (what
    TensorRT parses) and the CPU-lowered one (what `llmbuild run` executes on ONNX
    Runtime). One report (the standard graph's figures) with the lowered graph's under
    "cpu_lowered"; it passes only if both do. The HF reference is loaded once."""
    from llmbuild.verify.reference import load_reference

    outputs = kwargs.pop("reference_outputs", None)
    if outputs is None:
        ref = kwargs.pop("reference_model", None)
        outputs = _DirectReference(ref if ref is not None else load_reference(reference))
    report = verify_artifact(artifact, reference, reference_outputs=outputs, **kwargs)
    lowered = verify_artifact(artifact, reference, reference_outputs=outputs, cpu_lowering=None, **kwargs)
    report["cpu_lowered"] = {k: lowered[k] for k in ("passed", "failures", "graph", "max_abs_logit_diff",
                                                     "top1_agreement", "greedy_agreement", "seconds")}
    report["failures"] = report["failures"] + [f"CPU-lowered graph: {f}" for f in lowered["failures"]]
    report["passed"] = report["passed"] and lowered["passed"]
    return report


def verify_artifact(
    artifact: str | Path, reference: str | Path, *, prompts=DEFAULT_PROMPTS, max_new_tokens: int = 16,
    thresholds: Thresholds | None = None, reference_model=None, chat: bool | None = None, reference_outputs=None,
    cpu_lowering: bool | None = False, threads: int | None = None, check_hashes: bool | None = None,
) -> dict:
    """Run both sides and return a JSON-able report with `passed` and the figures.
    cpu_lowering=False checks the standard graph (what TensorRT parses); None the graph
    the CPU runtime runs (llmbuild.lowering.cpu, fallbacks included).
    `reference_outputs`: an object with `logits(ids)` and `greedy(ids, n, eos)` standing
    for the HF side (compile passes `llmbuild.buildcache.CachedReference`). `threads`, `check_hashes`:
    ONNX Runtime's intra-op threads and the artifact's hash check (`llmbuild.load`)."""
    from llmbuild.runtime import load
    from llmbuild.verify.reference import check_same_vocabulary, load_reference

    start = time.perf_counter()
    model = load(artifact, backend="onnxruntime", threads=threads, cpu_lowering=cpu_lowering, check_hashes=check_hashes)
    precision = model.manifest["model"]["precision"]
    thresholds = thresholds or default_thresholds(precision)
    if reference_outputs is None:
        reference_outputs = _DirectReference(reference_model if reference_model is not None
                                             else load_reference(reference))
    if chat is None:
        chat = bool(model.tokenizer.chat_template)
    eos = model.eos_token_ids
    rows = []
    max_diff, top1_hits, positions, greedy_hits, greedy_total = 0.0, 0, 0, 0, 0
    non_finite = []
    max_seq_len = model.limits.max_seq_len
    for prompt in prompts:
        ids = model.encode(prompt, chat=chat)
        ids, new_tokens = fit_prompt(ids, max_new_tokens, max_seq_len)
        ours = _artifact_logits(model.executor, ids)
        theirs = reference_outputs.logits(ids)
        check_same_vocabulary(reference, theirs, artifact, ours)
        for side, logits in (("the artifact's graph", ours), ("the reference", theirs)):
            hit = first_non_finite(logits)
            if hit is not None:
                non_finite.append(f"prompt {prompt[:40]!r}: " + non_finite_message(side, logits, hit))
        diff = float(np.abs(ours - theirs).max())
        if not np.isfinite(diff):
            diff = float("inf")  # NaN would compare below every threshold
        agree = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        ref_tokens = list(reference_outputs.greedy(ids, new_tokens, eos))
        our_tokens = model.generate_ids([ids], max_new_tokens=new_tokens)[0].token_ids
        same = 0
        for a, b in zip(ref_tokens, our_tokens):
            if a != b:
                break
            same += 1
        total = max(len(ref_tokens), len(our_tokens), 1)
        rows.append({
            "prompt": prompt, "tokens": len(ids), "max_abs_logit_diff": diff, "top1_agreement": agree / len(ids),
            "greedy_tokens_equal": same, "greedy_tokens": total,
            "identical": ref_tokens == our_tokens,
            "text": model.tokenizer.decode(our_tokens), "reference_text": model.tokenizer.decode(ref_tokens),
        })
        max_diff = max(max_diff, diff)
        top1_hits += agree
        positions += len(ids)
        greedy_hits += same if ref_tokens != our_tokens else total
        greedy_total += total
    graph = getattr(model.executor, "graph_source", "standard")  # tensor-parallel ranks: standard graphs
    model.close()
    summary = {
        "max_abs_logit_diff": max_diff,
        "top1_agreement": top1_hits / positions,
        "greedy_agreement": greedy_hits / greedy_total,
    }
    failures = list(non_finite)
    if summary["max_abs_logit_diff"] > thresholds.max_abs_logit_diff:
        failures.append(f"max |Δlogit| {max_diff:.3g} > {thresholds.max_abs_logit_diff:g}")
    if summary["top1_agreement"] < thresholds.min_top1_agreement:
        failures.append(f"top-1 agreement {summary['top1_agreement']:.3f} < {thresholds.min_top1_agreement:g}")
    if summary["greedy_agreement"] < thresholds.min_greedy_agreement:
        failures.append(f"greedy agreement {summary['greedy_agreement']:.3f} < {thresholds.min_greedy_agreement:g}")
    return {
        "passed": not failures,
        "failures": failures,
        "reference": str(reference),
        "backend": "onnxruntime-cpu",
        # which graph ran: standard, cpu_graph (the artifact's CPU-ready graph, what ships) or
        # "lowered at load" (an artifact without one)
        "graph": graph,
        "precision": precision,
        "thresholds": asdict(thresholds),
        **summary,
        "prompts": rows,
        "seconds": round(time.perf_counter() - start, 2),
    }
