"""The per-layer quantize phase of AWQ / GPTQ calibration, old against new, interleaved.

    python benchmarks/quantization/quantize_phase.py --old /path/to/old/checkout [--rounds 3]

One SmolLM2-shaped layer (q/k/v 576→960, gate/up 576→3072, down 1536→576; H from 4096
random rows with outlier channels), every round runs the `--old` checkout's
llmbuild.quantize.algorithms and this one's on the same matrices, one after the other,
and prints the seconds of each (AWQ: scale search of the three input groups + clip search
of every linear but q/k; GPTQ: every linear). Speed figures are ratios of the two in one
run; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GROUPS = {"qkv": (576, [576, 192, 192]), "gate_up": (576, [1536, 1536]), "down": (1536, [576])}


def load(root: Path, label: str):
    spec = importlib.util.spec_from_file_location(f"algorithms_{label}", root / "llmbuild/quantize/algorithms.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def layer(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, (k, widths) in GROUPS.items():
        x = rng.standard_normal((4096, k)).astype(np.float32)
        x[:, rng.choice(k, 6, replace=False)] *= 30
        out[name] = (x.T @ x, np.abs(x).mean(0), [(rng.standard_normal((k, n)) * 0.05).astype(np.float32)
                                                  for n in widths])
    return out


def awq(alg, data, scheme):
    for name, (h, mean, ws) in data.items():
        s, _ = alg.awq_search_scales(h, mean, ws, scheme)
        hs = h / s[:, None] / s[None, :]
        for i, w in enumerate(ws):
            if name != "qkv" or i == 2:  # q/k are not clipped
                alg.awq_search_clip(hs, w * s[:, None], scheme)


def gptq(alg, data, scheme):
    for h, _, ws in data.values():
        for w in ws:
            alg.gptq_quantize(w, h.astype(np.float64), scheme)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--what", default="awq", choices=("awq", "gptq"))
    args = ap.parse_args()
    from llmbuild.quantize.schemes import Int4

    algs = {"old": load(args.old, "old"), "new": load(ROOT, "new")}
    data, scheme = layer(), Int4(128)
    fn = awq if args.what == "awq" else gptq
    for r in range(args.rounds):
        row = {"round": r, "what": args.what}
        for label, alg in algs.items():
            t0 = time.perf_counter()
            fn(alg, data, scheme)
            row[f"{label}_s"] = round(time.perf_counter() - t0, 2)
        row["old/new"] = round(row["old_s"] / row["new_s"], 2)
        row["load_average"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
