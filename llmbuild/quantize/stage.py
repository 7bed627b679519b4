"""The quantize stage of `compile`: plan → (calibrate) → rewrite the graph before save;
and the accuracy gate after it (perplexity / KL / top-1 against the unquantized graph).

    model = build_model(source, precision, max_seq_len)          # lazy weights
    info = quantize_model(model, source, recipe, work_dir, rep)  # rewrites `model`
    save_model(model, ...)                                       # quantizes while streaming
    ...
    report = quality_gate(artifact_stage, recipe, work_dir)      # after the manifest exists

`work_dir` (inside the staging directory) holds the float32 reference graph that
calibration slices and the gate compares against; `cleanup(work_dir)` removes it before
the artifact is finalised.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from llmbuild.errors import BuildError, UserError
from llmbuild.graph.builder import SOURCE_LOADER
from llmbuild.quantize.expert_stage import ExpertQuantization
from llmbuild.quantize.graph import linear_weights, quantize_graph, tied_lm_head, untie_lm_head
from llmbuild.quantize.plan import (format_summary, resolve_plan, stored_bytes, summarize, tied_lm_head_refusal,
                                    tied_lm_head_spec, unmatched_overrides)
from llmbuild.quantize.shard import shard_graph_array, shard_quantized

WORK_DIR = ".quantize-work"
GATE_TOKENS = 4096
GATE_SEQ_LEN = 512


def reference_graph(source, work_dir: Path, max_seq_len: int) -> Path:
    """The unquantized float32 graph of `source` (built once per work dir)."""
    from llmbuild.graph.export import MODEL_FILE, save_model
    from llmbuild.models.build import build_model

    path = work_dir / "reference" / MODEL_FILE
    if not path.is_file():
        save_model(build_model(source, "float32", max_seq_len), path.parent)
    return path


def cleanup(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)


def _base_dir(recipe) -> Path:
    return recipe.path.parent if recipe.path is not None else Path.cwd()


def calibration_tokens(source, calibration: dict, base_dir: Path, work_dir: Path) -> np.ndarray:
    from llmbuild.eval import dataset_tokens
    from llmbuild.eval.corpus import token_chunks

    tok_dir = work_dir / "tokenizer"
    source.export_tokenizer(tok_dir)
    ids = dataset_tokens(tok_dir / "tokenizer.json", calibration["dataset"], "calibration", base_dir)
    return token_chunks(ids, calibration["seq_len"], calibration["samples"], seed=calibration["seed"],
                        where=f"calibration dataset {calibration['dataset']!r}")


class QuantizationJob:
    """The recipe's `quantization:` for one source: the plan and (if any module needs it)
    the calibration, computed once on the whole model, then applied to the graph of
    tp = 1 or to every tensor-parallel rank's graph.

    A rank's codes and scales are the whole weight's, sliced along the shard dimension
    in whole groups (`shard_quantized`), so rank r of a quantized tp = N artifact holds
    exactly its part of the tp = 1 artifact's weights.
    """

    def __init__(self, full_model, source, recipe, work_dir: Path, rep=None, threads: int | None = None):
        """`full_model`: the whole model's lazy graph (for tp = 1 the graph that will be
        saved; it is only read here)."""
        from llmbuild.models import spec_for

        rd = recipe.to_dict()
        self.q = q = rd["quantization"]
        arch = spec_for(source.config)
        self.dims = dims = arch.dims(source.config)
        self.lm_head = arch.lm_head  # the weight name an untied lm_head gets
        self.untie = (tied_lm_head(full_model) is not None
                      and _untie_if_quantized(full_model, q, dims.layers, self.lm_head))
        weights = linear_weights(full_model)
        self.shapes = {n: tuple(int(d) for d in v.shape) for n, v in weights.items()}
        self.loaders = {n: v.meta[SOURCE_LOADER] for n, v in full_model.graph.initializers.items()
                        if SOURCE_LOADER in v.meta}
        compute = next(iter(weights.values())).dtype if weights else None
        self.itemsize = compute.itemsize if compute is not None else 4
        self.scale_dtype = compute.numpy() if compute is not None else np.float32
        self.allocation = None
        if q.get("target") is not None:  # every linear's scheme from its measured sensitivity
            self.allocation = _allocate(self, source, recipe, work_dir, rep, threads)
            self.q = q = {**q, **self.allocation.quantization}
        self.plan = resolve_plan(q, list(weights), dims.layers)
        self.experts = ExpertQuantization(full_model, q, dims.layers)  # routed experts (MoE), per expert
        self.unmatched = unmatched_overrides(q, [*weights, *self.experts.plan], dims.layers)
        self.cal = None
        if any(spec.calibrated for spec in self.plan.values()):
            from llmbuild.quantize.calibration import AlgorithmOptions, calibrate

            c = q["calibration"]
            work_dir.mkdir(parents=True, exist_ok=True)
            stage = rep.stage("calibrate") if rep is not None else _null_stage()
            with stage as update:
                tokens = calibration_tokens(source, c, _base_dir(recipe), work_dir)
                ref = reference_graph(source, work_dir, max(rd["limits"]["max_seq_len"], c["seq_len"]))
                self.cal = calibrate(ref, tokens, self.plan, self.loaders, kv_heads=dims.kv_heads,
                                     head_dim=dims.head_dim, work_dir=ref.parent, scale_dtype=self.scale_dtype,
                                     seed=c["seed"], threads=threads, progress=lambda d, t, msg: update(d, t, msg),
                                     options=AlgorithmOptions.from_recipe(q))
        if self.experts.calibrated:
            c = q["calibration"]
            work_dir.mkdir(parents=True, exist_ok=True)
            tokens = calibration_tokens(source, c, _base_dir(recipe), work_dir)
            ref = reference_graph(source, work_dir, max(rd["limits"]["max_seq_len"], c["seq_len"]))
            self.experts.calibrate(ref, tokens, kv_heads=dims.kv_heads, head_dim=dims.head_dim,
                                   scale_dtype=self.scale_dtype, threads=threads, options=q)

    def apply(self, model, shard=None, *, last: bool = True) -> dict[str, int]:
        """Rewrite `model` (lazy, not yet saved): the whole model (`shard` None) or rank
        `shard = (ShardPlan, rank)`'s graph. `last`: no later graph needs the calibration
        results (they are released as the weights are saved)."""
        if self.untie:
            untie_lm_head(model, self.lm_head)
        cal = self.cal

        def whole(name):
            qt = None
            if cal is not None:
                qt = cal.results.pop(name, None) if last else cal.results.get(name)
            if qt is None and shard is not None:  # RTN of the whole weight, then this rank's slice
                qt = self.plan[name].make().quantize(np.asarray(self.loaders[name](), np.float32), self.scale_dtype)
            return qt

        self.experts.apply(model, shard=shard, last=last)
        if shard is None:
            results, floats = whole, (lambda name: cal.floats[name]) if cal is not None else None
        else:
            plan, rank = shard
            results = lambda name: shard_quantized(whole(name), plan, name, rank)  # noqa: E731
            floats = (lambda name: shard_graph_array(cal.floats[name], plan, name, rank)) if cal is not None else None
        return quantize_graph(
            model, self.plan, results=results, replaced_floats=floats,
            replaced_names=tuple(cal.floats) if cal is not None else (),
            activation_amax=cal.activation_amax if cal is not None else None,
        )

    def manifest_entry(self, rep=None) -> dict:
        """The manifest's `quantization` entry (bytes of the whole model's linears)."""
        stored = {n: stored_bytes(self.plan[n], self.shapes[n], self.itemsize) for n in self.plan}
        summary = summarize(self.plan, self.shapes, stored, self.itemsize)
        if self.unmatched:
            summary["unmatched_overrides"] = self.unmatched
        if rep is not None:
            rep.log("quantization:\n" + format_summary(summary) + "".join(
                f"\n  overrides[{i}] selects no linear weight (embeddings stay unquantized)"
                for i in self.unmatched))
        q = self.q
        out = {"weights": q["weights"], "overrides": q.get("overrides") or [], "summary": summary,
               "linear_weight_bytes": int(sum(stored.values()))}
        if self.experts.plan:
            out["experts"] = self.experts.manifest_entry(rep)
        if self.cal is not None:
            out["calibration"] = {"dataset": q["calibration"]["dataset"], **self.cal.report}
        if self.allocation is not None:
            out["target"] = q["target"]
            out["allocation"] = self.allocation.record
            if rep is not None:
                a = self.allocation.record
                rep.log(f"allocation: {a['bits_per_weight']:.3f} bits per weight over {a['linear_parameters']:,}"
                        f" linear parameters ({', '.join(f'{k} x{v}' for k, v in a['schemes'].items())})")
        return out


def _allocate(job, source, recipe, work_dir: Path, rep, threads):
    """quantization.target: the allocation (llmbuild.quantize.allocate) on the calibration
    text through the float32 reference graph, measured (max_perplexity_increase) on the
    gate's evaluation text."""
    from llmbuild.quantize.allocate import allocate_target

    rd = recipe.to_dict()
    q = rd["quantization"]
    target, cal = q["target"], q["calibration"]

    def prepare():
        work_dir.mkdir(parents=True, exist_ok=True)
        tokens = calibration_tokens(source, {**cal, "samples": target["samples"]}, _base_dir(recipe), work_dir)
        return tokens, reference_graph(source, work_dir, max(rd["limits"]["max_seq_len"], cal["seq_len"]))

    stage = rep.stage("sensitivity") if rep is not None else _null_stage()
    return allocate_target(job, target, cal, prepare, lambda: gate_chunks(recipe, work_dir / "tokenizer"), stage,
                           rep, threads)


def quantize_model(model, source, recipe, work_dir: Path, rep=None, threads: int | None = None) -> dict:
    """Rewrite `model` (lazy, not yet saved) as the recipe's `quantization:` says; returns
    the manifest's `quantization` entry."""
    job = QuantizationJob(model, source, recipe, work_dir, rep, threads)
    job.apply(model)
    return job.manifest_entry(rep)


def _untie_if_quantized(model, quantization: dict, num_layers: int, lm_head: str) -> bool:
    """A tied lm_head that an override names gets its own (quantized) weight `lm_head`;
    True when `model` was untied."""
    named = tied_lm_head_spec(quantization, num_layers, lm_head)
    if named is None:
        return False
    spec, index = named
    refusal = tied_lm_head_refusal(spec)
    if refusal:
        raise UserError(f"quantization.overrides[{index}]: {refusal}")
    return untie_lm_head(model, lm_head)


class _null_stage:
    def __enter__(self):
        return lambda *a, **k: None

    def __exit__(self, *exc):
        return False


def gate_thresholds(verify: dict) -> dict:
    return {k: verify.get(k) for k in ("max_perplexity_increase", "max_kl_divergence", "min_top1_agreement")}


def gate_chunks(recipe, tokenizer_dir: Path) -> np.ndarray:
    """The gate's evaluation text as token chunks [count, seq_len] (verify.eval_dataset's
    evaluation split, verify.eval_tokens tokens)."""
    from llmbuild.eval import dataset_tokens
    from llmbuild.eval.corpus import token_chunks

    rd = recipe.to_dict()
    v = rd.get("verify") or {}
    seq_len = min(GATE_SEQ_LEN, rd["limits"]["max_seq_len"])
    tokens = v.get("eval_tokens") or GATE_TOKENS
    dataset = v.get("eval_dataset") or "kjv"
    ids = dataset_tokens(tokenizer_dir / "tokenizer.json", dataset, "evaluation", _base_dir(recipe))
    count = max(1, tokens // seq_len)
    return token_chunks(ids, seq_len, min(count, max(1, len(ids) // seq_len)), where=f"dataset {dataset!r}")


def quality_gate(stage: Path, recipe, source, work_dir: Path, rep=None, threads: int | None = None) -> dict:
    """Evaluate the staged artifact against the unquantized float32 graph on the
    evaluation text; `passed` is False when a `verify:` threshold is missed."""
    from llmbuild.eval import evaluate_runners
    from llmbuild.eval.runners import OrtGraphRunner, artifact_runner

    rd = recipe.to_dict()
    v = rd.get("verify") or {}
    dataset = v.get("eval_dataset") or "kjv"
    start = time.perf_counter()
    ctx = rep.stage("accuracy") if rep is not None else _null_stage()
    with ctx as update:
        chunks = gate_chunks(recipe, stage / "tokenizer")
        seq_len = chunks.shape[1]
        ref_path = reference_graph(source, work_dir, rd["limits"]["max_seq_len"])
        cand, ref = artifact_runner(stage, threads), OrtGraphRunner(ref_path, threads)
        try:
            metrics = evaluate_runners(cand, ref, chunks, progress=lambda d, t: update(d, t))
        finally:
            cand.close()
            ref.close()
    thresholds = gate_thresholds(v)
    failures = [f"non-finite logits from the {side} graph: first at chunk {nf['chunk']}, position {nf['position']}"
                f" ({nf['positions']} positions affected)"
                for side in ("candidate", "reference") if (nf := metrics.get(f"{side}_non_finite"))]
    t = thresholds
    if t["max_perplexity_increase"] is not None and metrics["perplexity_increase"] > t["max_perplexity_increase"]:
        failures.append(f"perplexity +{metrics['perplexity_increase']:.2%} (reference {metrics['reference_perplexity']:.3f}"
                        f" → {metrics['perplexity']:.3f}) > max_perplexity_increase {t['max_perplexity_increase']:g}")
    if t["max_kl_divergence"] is not None and metrics["kl_divergence"] > t["max_kl_divergence"]:
        failures.append(f"KL divergence {metrics['kl_divergence']:.4f} > max_kl_divergence {t['max_kl_divergence']:g}")
    if t["min_top1_agreement"] is not None and metrics["top1_agreement"] < t["min_top1_agreement"]:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < min_top1_agreement"
                        f" {t['min_top1_agreement']:g}")
    return {
        "kind": "accuracy", "passed": not failures, "failures": failures,
        "reference": "unquantized float32 graph of the same source (ONNX Runtime, CPU)",
        "dataset": dataset, "split": "evaluation", "seq_len": seq_len, "chunks": len(chunks),
        "thresholds": thresholds, **metrics, "seconds": round(time.perf_counter() - start, 2),
    }


def format_gate(report: dict) -> str:
    lines = [
        f"accuracy against the unquantized graph ({report['dataset']}, {report['positions']} positions):",
        f"  perplexity {report['reference_perplexity']:.4f} → {report['perplexity']:.4f}"
        f" ({report['perplexity_increase']:+.2%})",
        f"  KL divergence {report['kl_divergence']:.5f} nats/token",
        f"  top-1 agreement {report['top1_agreement']:.4f}",
    ]
    return "\n".join(lines + [f"  FAILED: {f}" for f in report["failures"]])


def maybe_gate(recipe, stage: Path, source, rep, verify: bool | None) -> dict | None:
    """compile's verification of a quantized artifact: the accuracy gate (unless
    `--no-verify` or `verify.enabled: false`); removes the work dir either way."""
    work_dir = stage / WORK_DIR
    try:
        rd = recipe.to_dict()
        settings = rd.get("verify") or {}
        if verify is False or not settings.get("enabled", True):
            return None
        if rd["precision"] == "bfloat16":
            return {"kind": "accuracy", "passed": True,
                    "skipped": "bfloat16 graphs cannot run on ONNX Runtime's CPU provider"}
        report = quality_gate(stage, recipe, source, work_dir, rep)
        if rep is not None:
            rep.log(format_gate(report))
        return report
    finally:
        cleanup(work_dir)


def raise_if_failed(report: dict | None, artifact: Path) -> None:
    """A missed accuracy gate: BuildError (exit 1) with the figures; the full report is
    also written to `<artifact>.accuracy.json` (the artifact itself is not kept)."""
    if report is None or report.get("kind") != "accuracy" or report["passed"]:
        return
    import json

    path = artifact.parent / f"{artifact.name}.accuracy.json"
    path.write_text(json.dumps(report, indent=2))
    raise BuildError("quantized artifact misses its verify: thresholds\n" + format_gate(report)
                     + f"\n(report: {path})")


def record_allocation_result(quantization: dict | None, verification: dict | None) -> None:
    """An automatic allocation's measured result: the accuracy gate's figures on the held-out
    text, copied next to the allocation in the manifest's `quantization`."""
    if not quantization or "allocation" not in quantization or not verification:
        return
    if verification.get("kind") != "accuracy" or "perplexity_increase" not in verification:
        return
    quantization["allocation"]["measured"] = {
        k: verification[k] for k in ("perplexity_increase", "perplexity", "reference_perplexity", "kl_divergence",
                                     "top1_agreement", "positions", "dataset", "split") if k in verification}
