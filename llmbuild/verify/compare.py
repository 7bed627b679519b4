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


def verify_artifact(
    artifact: str | Path, reference: str | Path, *, prompts=DEFAULT_PROMPTS, max_new_tokens: int = 16,
    thresholds: Thresholds | None = None, reference_model=None, chat: bool | None = None, reference_outputs=None,
) -> dict:
    """Run both sides and return a JSON-able report with `passed` and the figures.
    `reference_outputs`: an object with `logits(ids)` and `greedy(ids, n, eos)` standing
    for the HF side (compile passes `llmbuild.buildcache.CachedReference`)."""
    from llmbuild.runtime import load
    from llmbuild.verify.reference import load_reference

    start = time.perf_counter()
    model = load(artifact, backend="onnxruntime", cpu_lowering=False)  # the graph TensorRT parses
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
    for prompt in prompts:
        ids = model.encode(prompt, chat=chat)
        ours = _artifact_logits(model.executor, ids)
        theirs = reference_outputs.logits(ids)
        diff = float(np.abs(ours - theirs).max())
        agree = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        ref_tokens = list(reference_outputs.greedy(ids, max_new_tokens, eos))
        our_tokens = model.generate_ids([ids], max_new_tokens=max_new_tokens)[0].token_ids
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
    model.close()
    summary = {
        "max_abs_logit_diff": max_diff,
        "top1_agreement": top1_hits / positions,
        "greedy_agreement": greedy_hits / greedy_total,
    }
    failures = []
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
        "precision": precision,
        "thresholds": asdict(thresholds),
        **summary,
        "prompts": rows,
        "seconds": round(time.perf_counter() - start, 2),
    }
