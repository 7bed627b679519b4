"""The routed experts' part of the quantize stage (llmbuild.quantize.stage.QuantizationJob):
their plan (the recipe's `weights` / `overrides` on the stacked experts' module names), the
per-expert calibration when a projection uses AWQ / GPTQ, the graph rewrite, and the
manifest's `quantization.experts` entry (bytes, and per layer the experts that no
calibration token reached and that were therefore quantized round-to-nearest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmbuild.graph.builder import SOURCE_LOADER
from llmbuild.quantize.expert_plan import PROJECTIONS, expert_stored_bytes, resolve_expert_plan
from llmbuild.quantize.experts import (expert_blocks, quantize_experts_graph, quantize_stacked, shard_stacked,
                                       stacked_expert_weights)
from llmbuild.quantize.plan import module_name


class ExpertQuantization:
    def __init__(self, full_model, quantization: dict, num_layers: int):
        weights = stacked_expert_weights(full_model)
        self.blocks = expert_blocks(full_model)
        self.shapes = {n: tuple(int(d) for d in v.shape) for n, v in weights.items()}
        self.itemsize = next(iter(weights.values())).dtype.itemsize if weights else 4
        self.loaders = {n: v.meta[SOURCE_LOADER] for n, v in weights.items()}
        self.plan = resolve_expert_plan(quantization, list(weights), num_layers) if weights else {}
        self.results: dict = {}
        self.report: list[dict] = []
        self.scale_np = next(iter(weights.values())).dtype.numpy() if weights else np.float32

    @property
    def calibrated(self) -> bool:
        return any(s.algorithm in ("awq", "gptq") and s.scheme != "none" for s in self.plan.values())

    def calibrate(self, ref: Path, tokens: np.ndarray, *, kv_heads: int, head_dim: int, scale_dtype, threads,
                  options: dict) -> None:
        from llmbuild.quantize.calibration import AlgorithmOptions
        from llmbuild.quantize.expert_calibration import calibrate_experts

        self.results, self.report = calibrate_experts(
            ref, tokens, self.blocks, self.plan, self.loaders, kv_heads=kv_heads, head_dim=head_dim,
            scale_dtype=scale_dtype, threads=threads, options=AlgorithmOptions.from_recipe(options))

    def apply(self, model, *, shard=None, last: bool) -> None:
        """Quantize `model`'s stacked experts: the whole model's, or tensor-parallel rank
        `shard = (ShardPlan, rank)`'s slice of the whole model's codes and scales."""
        if not self.plan:
            return
        results = self.results
        if shard is None:
            quantize_experts_graph(model, self.plan, results=(lambda n: results.pop(n, None)) if last else results.get)
            return
        plan, rank = shard
        first = {m["stacked"][p]: m["expert_weights"][p][0] for m in self.blocks for p in PROJECTIONS}

        def rank_part(name):
            sq = results.get(name)
            if sq is None:  # RTN of the whole stacked weight, then this rank's slice
                sq = quantize_stacked(self.plan[name], np.asarray(self.loaders[name](), np.float32), self.scale_np)
            return shard_stacked(sq, plan, first[name], rank)

        quantize_experts_graph(model, self.plan, results=rank_part)
        if last:
            results.clear()

    def manifest_entry(self, rep=None) -> dict:
        stored = {n: expert_stored_bytes(self.plan[n], self.shapes[n], self.itemsize) for n in self.plan}
        out = {"modules": {module_name(n): s.label for n, s in self.plan.items()},
               "weight_bytes": int(sum(stored.values())),
               "unquantized_bytes": int(sum(np.prod(s) for s in self.shapes.values()) * self.itemsize),
               "router": "not quantized (graph dtype)"}
        if self.report:
            out["calibration"] = self.report
            out["round_to_nearest"] = {str(r["layer"]): r["round_to_nearest"] for r in self.report
                                       if r["round_to_nearest"]}
        if rep is not None:
            rep.log(f"routed experts: {len(self.plan)} stacked weights, {out['weight_bytes']:,} bytes "
                    f"({out['unquantized_bytes']:,} unquantized); router not quantized")
            for r in self.report:
                if r["round_to_nearest"]:
                    rep.log(f"  layer {r['layer']}: experts {r['round_to_nearest']} received no calibration token: "
                            "round-to-nearest")
        return out
