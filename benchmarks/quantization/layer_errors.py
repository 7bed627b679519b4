"""Output error of each int4 algorithm on SmolLM2's real layer inputs, layer by layer.

    python benchmarks/quantization/layer_errors.py [--layers 2] [--samples 8] [--work DIR]

Runs the float32 reference graph's first `--layers` decoder layers over `--samples` × 512
calibration tokens (bundled `kjv`, seed 0) with llmbuild.quantize.calibration's slices,
collects H = Σ xᵀx and mean |x| per linear input, and prints per linear the output
error Σ‖x·(W − Ŵ)‖² = tr(ΔᵀHΔ) of int4 g128: rtn, awq (scales only), awq + clip, gptq,
gptq + act-order, relative to rtn. A quick, per-layer view of each step's effect (the
whole-model perplexity/KL rows are run.py's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--work", default="/tmp/llmbuild-layer-errors")
    args = ap.parse_args()
    from llmbuild.models import spec_for
    from llmbuild.models.build import build_model
    from llmbuild.quantize.algorithms import awq_search_clip, awq_search_scales, gptq_quantize
    from llmbuild.quantize.calibration import ActStats, GraphSlices, decoder_feeds, ort_session
    from llmbuild.quantize.schemes import Int4
    from llmbuild.quantize.stage import calibration_tokens, reference_graph
    from llmbuild.recipe import load_recipe
    from llmbuild.source import open_source

    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m-instruct.yaml")
    source = open_source(recipe.source_path)
    dims = spec_for(source.config).dims(source.config)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokens = calibration_tokens(source, {"dataset": "kjv", "seq_len": 512, "samples": args.samples, "seed": 0},
                                ROOT, work)
    ref = reference_graph(source, work, 2048)
    model = build_model(source, "float32", 2048)
    loaders = {n: v.meta["llmbuild.source_loader"] for n, v in model.graph.initializers.items()
               if "llmbuild.source_loader" in v.meta}
    slices = GraphSlices(ref, lambda n: n in loaders)
    path, _ = slices.slice([slices.layer_inputs[0]], None, ref.parent / "prefix.onnx")
    sess = ort_session(path, None)
    hidden = np.concatenate([sess.run(None, decoder_feeds(sess, tokens[i:i + 8], dims.kv_heads, dims.head_dim))[0]
                             for i in range(0, len(tokens), 8)])
    scheme = Int4(128)
    for layer in range(args.layers):
        lin = slices.linear_inputs(layer)
        acts = sorted(set(lin.values()))
        path, inputs = slices.slice(acts + [slices.layer_inputs[layer + 1]], slices.layer_inputs[layer],
                                    ref.parent / f"layer{layer}.onnx", lambda v, i=layer: slices.weight_layer(v) == i)
        sess = ort_session(path, None)
        weights = {w: np.asarray(loaders[w](), np.float32) for w in dict.fromkeys([*inputs, *lin])}
        stats, nxt = {}, []
        for i in range(0, len(tokens), 8):
            feeds = decoder_feeds(sess, tokens[i:i + 8], dims.kv_heads, dims.head_dim) | {slices.layer_inputs[layer]: hidden[i:i + 8]}
            outs = sess.run(acts + [slices.layer_inputs[layer + 1]], feeds | {w: weights[w] for w in inputs})
            for a, x in zip(acts, outs):
                stats.setdefault(a, ActStats(x.shape[-1])).update(x, True)
            nxt.append(outs[-1])
        hidden = np.concatenate(nxt)
        for w, a in lin.items():
            h, wt = stats[a].xtx.astype(np.float32), weights[w]

            def err(deq):
                d = (wt - deq).astype(np.float32)
                return float(np.einsum("ij,ij->", h @ d, d))

            rtn = err(scheme.quantize(wt).dequantize())
            s, _ = awq_search_scales(h, stats[a].mean_abs, [wt], scheme)  # this linear alone
            hs = h / s[:, None] / s[None, :]
            awq = err(scheme.quantize(wt * s[:, None]).dequantize() / s[:, None])
            shrink = awq_search_clip(hs, wt * s[:, None], scheme)
            clip = err(scheme.quantize(wt * s[:, None], shrink=shrink).dequantize() / s[:, None])
            g = err(gptq_quantize(wt, stats[a].xtx, scheme).dequantize())
            ga = err(gptq_quantize(wt, stats[a].xtx, scheme, act_order=True).dequantize())
            print(json.dumps({"layer": layer, "linear": w.split(".")[-2], "rtn": rtn, "awq/rtn": round(awq / rtn, 4),
                              "awq+clip/rtn": round(clip / rtn, 4), "gptq/rtn": round(g / rtn, 4),
                              "gptq+act_order/rtn": round(ga / rtn, 4)}), flush=True)


if __name__ == "__main__":
    main()
