"""Compare an artifact's ONNX graph on ONNX Runtime with HF transformers.

Per prompt, the graph the CPU runtime runs decodes a greedy continuation with its KV
cache; the sequence prompt + continuation is then run teacher-forced (one forward pass)
through HF and through each graph checked: max |Δlogit| and top-1 agreement over every
position, and greedy agreement — the leading continuation tokens on which a graph's
next-token choice equals HF's (at an HF argmax that differs, HF's own greedy would have
diverged there: the count equals the one of two independent greedy loops, and an
identical continuation proves the loops' outputs equal). The standard graph (what
TensorRT parses) is checked teacher-forced in two chunks, the prompt then the
continuation over its KV cache.
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


def _artifact_logits(executor, ids: list[int], split: int | None = None) -> np.ndarray:
    """Teacher-forced logits [S, vocab] of one sequence; `split`: run ids[:split] first,
    then the rest over the cache it wrote (the decode path's attention to past keys)."""
    executor.reset(1)
    out = []
    for lo, hi in ((0, split), (split, len(ids))) if split else ((0, len(ids)),):
        positions = np.arange(lo, hi, dtype=np.int64)[None]
        step = StepInputs(np.array([ids[lo:hi]], np.int64), positions, np.array([lo], np.int64), positions - lo)
        out.append(executor.forward(step)[0])
    return np.concatenate(out)


def greedy_agreement(continuation: list[int], stopped: bool, ours_next: list[int] | None, theirs_next: list[int],
                     eos: list[int]) -> tuple[int, int, bool, list[int], list[int]]:
    """Greedy agreement on a teacher-forced continuation (decoded by the CPU runtime's
    graph; it `stopped` at EOS or ran to its length). `theirs_next[i]`, `ours_next[i]`:
    HF's and the checked graph's argmax after prompt + continuation[:i], i = 0..len
    (ours_next None: the checked graph decoded the continuation itself). Returns (equal,
    total, identical, our tokens, HF's tokens), the tokens up to the first divergence."""
    n = len(continuation)
    ours = list(continuation) if ours_next is None else list(ours_next[:n])
    equal, left = 0, False
    for i in range(n):
        if ours[i] != theirs_next[i]:
            break
        equal += 1
        if ours[i] != continuation[i]:  # both left the decoded prefix here: nothing further is known
            left = True
            break
    agreed = equal == n
    if agreed and stopped:  # the decision to stop: both must choose EOS
        agreed = theirs_next[n] in eos and (ours_next is None or ours_next[n] in eos)
    identical = agreed and equal == n
    total = max(n, 1) if identical or equal < n else n + 1
    cut = equal if identical or left else equal + 1  # with the first token that differs
    return equal, total, identical, [t for t in ours[:cut] if t not in eos], \
        [t for t in theirs_next[:cut] if t not in eos]


def fit_prompt(ids: list[int], max_new_tokens: int, max_seq_len: int) -> tuple[list[int], int]:
    """A prompt and greedy length that fit the artifact's max_seq_len: a short artifact
    (max_seq_len 64) compares fewer greedy tokens (at least a quarter of the cache) and,
    if needed, the prompt's first tokens only; both sides see the same ids."""
    new_tokens = max(1, min(max_new_tokens, max_seq_len - len(ids), max_seq_len // 4))
    if len(ids) + max_new_tokens <= max_seq_len:
        new_tokens = max_new_tokens
    return list(ids[: max_seq_len - new_tokens]), new_tokens


def verify_what_runs(artifact, reference, **kwargs) -> dict:
    """Verify every graph a runtime executes on this artifact: the CPU-lowered one (what
    `llmbuild run` executes on ONNX Runtime; it decodes the continuations) and the
    standard graph (what TensorRT parses; teacher-forced on those continuations). One
    report (the standard graph's figures) with the lowered graph's under "cpu_lowered";
    it passes only if both do. The HF reference is loaded once, run once per prompt."""
    from llmbuild.verify.reference import load_reference

    outputs = kwargs.pop("reference_outputs", None)
    if outputs is None:
        ref = kwargs.pop("reference_model", None)
        outputs = _DirectReference(ref if ref is not None else load_reference(reference))
    lowered = verify_artifact(artifact, reference, reference_outputs=outputs, cpu_lowering=None, **kwargs)
    continuations = {row["prompt"]: (row["continuation"], row["stopped"]) for row in lowered["prompts"]}
    report = verify_artifact(artifact, reference, reference_outputs=outputs, continuations=continuations, **kwargs)
    report["cpu_lowered"] = {k: lowered[k] for k in ("passed", "failures", "graph", "max_abs_logit_diff",
                                                     "top1_agreement", "greedy_agreement", "seconds")}
    report["failures"] = report["failures"] + [f"CPU-lowered graph: {f}" for f in lowered["failures"]]
    report["passed"] = report["passed"] and lowered["passed"]
    return report


def verify_artifact(
    artifact: str | Path, reference: str | Path, *, prompts=DEFAULT_PROMPTS, max_new_tokens: int = 16,
    thresholds: Thresholds | None = None, reference_model=None, chat: bool | None = None, reference_outputs=None,
    cpu_lowering: bool | None = False, threads: int | None = None, check_hashes: bool | None = None,
    continuations: dict | None = None,
) -> dict:
    """Run both sides and return a JSON-able report with `passed` and the figures.
    cpu_lowering=False checks the standard graph (what TensorRT parses); None the graph
    the CPU runtime runs (llmbuild.lowering.cpu, fallbacks included).
    `continuations` {prompt: (token ids, stopped at EOS)}: check this graph teacher-forced
    on them (in two chunks); without, it decodes its own greedy continuation.
    `reference_outputs`: an object with `logits(ids)` standing for the HF side (compile
    passes `llmbuild.buildcache.CachedReference`). `threads`, `check_hashes`: ONNX
    Runtime's intra-op threads and the artifact's hash check (`llmbuild.load`)."""
    from llmbuild.runtime import load
    from llmbuild.verify.reference import OutOfVocabulary, check_same_vocabulary, load_reference

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
        if continuations is None:
            (generated,) = model.generate_ids([ids], max_new_tokens=new_tokens)
            continuation, stopped = list(generated.token_ids), generated.finish_reason == "eos"
        else:
            continuation, stopped = continuations[prompt]
        seq = ids + continuation
        ours = _artifact_logits(model.executor, seq, len(ids) if continuations is not None and continuation else None)
        try:
            theirs = reference_outputs.logits(seq)
        except OutOfVocabulary as e:  # our continuation has ids the reference cannot embed
            check_same_vocabulary(reference, np.empty((0, e.vocab)), artifact, ours)
            raise
        check_same_vocabulary(reference, theirs, artifact, ours)
        for side, logits in (("the artifact's graph", ours), ("the reference", theirs)):
            hit = first_non_finite(logits)
            if hit is not None:
                non_finite.append(f"prompt {prompt[:40]!r}: " + non_finite_message(side, logits, hit))
        diff = float(np.abs(ours - theirs).max())
        if not np.isfinite(diff):
            diff = float("inf")  # NaN would compare below every threshold
        agree = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        after = slice(len(ids) - 1, None)  # the next-token choices after prompt + continuation[:i]
        same, total, identical, our_tokens, ref_tokens = greedy_agreement(
            continuation, stopped, None if continuations is None else ours[after].argmax(-1).tolist(),
            theirs[after].argmax(-1).tolist(), eos)
        rows.append({
            "prompt": prompt, "tokens": len(ids), "max_abs_logit_diff": diff, "top1_agreement": agree / len(seq),
            "positions": len(seq), "greedy": "decoded" if continuations is None else "teacher-forced",
            "greedy_tokens_equal": same, "greedy_tokens": total, "identical": identical,
            "text": model.tokenizer.decode(our_tokens), "reference_text": model.tokenizer.decode(ref_tokens),
            "continuation": continuation, "stopped": stopped,
        })
        max_diff = max(max_diff, diff)
        top1_hits += agree
        positions += len(seq)
        greedy_hits += total if identical else same
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
