"""How well the allocation's sensitivities rank like the KL they stand for, on tiny random
Llamas (llmbuild.quantize.allocate): Spearman rank correlation, over every (linear, int
scheme) pair, between the measured KL(p_float ‖ p) of the logits when that linear alone is
quantized and (a) the raw proxy Σᵢ E[xᵢ²]·‖ΔWᵢ‖², (b) the proxy times the per-linear gain
measured on the probe linears (what `quantization.target` uses).

    python benchmarks/quantization/allocate_proxy.py [--layers 4 6] [--seeds 0 1]

Prints one line per model and a JSON summary (recorded in NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from llmbuild.quantize.allocate import (candidate_specs, graph_slices, input_moments, proxy_costs,  # noqa: E402
                                        sensitivities, single_linear_kl)


def spearman(a, b) -> float:
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    return float(np.corrcoef(rank(np.asarray(a)), rank(np.asarray(b)))[0, 1])


def measure(layers: int, seed: int, work: Path) -> dict:
    from llmbuild.graph.builder import SOURCE_LOADER
    from llmbuild.models.build import build_model
    from llmbuild.quantize.graph import linear_weights
    from llmbuild.quantize.stage import reference_graph
    from llmbuild.source import open_source
    from tests.tiny import make_tiny_hf

    model_dir = make_tiny_hf(work / f"hf-{layers}-{seed}", hidden=96, num_heads=6, num_kv_heads=2, layers=layers,
                             intermediate=160, vocab=256, tie=False, seed=seed)
    source = open_source(model_dir)
    ref = reference_graph(source, work / f"w-{layers}-{seed}", 128)
    lin = linear_weights(build_model(source, "float32", 128))
    loaders = {n: v.meta[SOURCE_LOADER] for n, v in lin.items()}
    names = list(lin)
    weights = lambda n: loaders[n]()  # noqa: E731
    tokens = np.random.default_rng(seed).integers(5, 256, size=(4, 64))
    slices = graph_slices(ref)
    cands = [c for c in candidate_specs() if c.scheme != "none"]
    t0 = time.perf_counter()
    costs, report = sensitivities(slices, tokens, weights, names, cands, np.float32, kv_heads=2, head_dim=16,
                                  work_dir=ref.parent)
    t_sens = time.perf_counter() - t0
    moments = input_moments(slices, tokens, names, kv_heads=2, head_dim=16, work_dir=ref.parent)
    proxy = proxy_costs(weights, moments, cands, np.float32)
    t0 = time.perf_counter()
    kl = single_linear_kl(slices, tokens, weights, names, {n: cands for n in names}, np.float32)
    t_kl = time.perf_counter() - t0
    pairs = [(n, c) for n in names for c in cands]
    return {
        "layers": layers, "seed": seed, "pairs": len(pairs), "gain_probes": report["gain_probes"],
        "spearman_raw_proxy": round(spearman([proxy[n][c] for n, c in pairs], [kl[n][c] for n, c in pairs]), 3),
        "spearman_scaled": round(spearman([costs[n][c] for n, c in pairs], [kl[n][c] for n, c in pairs]), 3),
        "seconds_sensitivities": round(t_sens, 2), "seconds_kl_every_pair": round(t_kl, 2),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            for seed in args.seeds:
                rows.append(measure(layers, seed, Path(tmp)))
                print(rows[-1], flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
