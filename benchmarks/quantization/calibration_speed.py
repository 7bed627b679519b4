"""Time the calibrate stage alone on SmolLM2 (the default recipe's model), as compile runs it.

    python benchmarks/quantization/calibration_speed.py [--samples 64] [--algorithm awq]
        [--group-size 128] [--work /tmp/llmbuild-calib-bench] [--repeat 1] [--option 'awq: {clip: false}']
        [--profile out.prof] [--save results.npz] [--serial]

Builds the QuantizationJob of `recipes/smollm2-135m-instruct.yaml` with
`quantization.weights = {scheme: int4, algorithm: ALGORITHM, group_size: G}` and
`samples × 512` calibration tokens; the float32 reference graph is kept in WORK between
runs (its export is not part of the calibrate stage's own timer, which is what is
reported). `--option` adds a line to the quantization section (`'awq: {clip: false}'`). Prints one
JSON line per run: calibration seconds (wall), the CPU seconds of the process over the
job (every thread: ONNX Runtime's, BLAS's and ours; steadier than wall on a shared
machine), peak RSS of the process during calibration (psutil, sampled after every ONNX
Runtime call), and the per-phase totals (wall: `statistics_s` = pass 1 on ONNX Runtime,
`quantize_s`, and `waited_s`, the time quantization waited for pass 1; with float
propagation pass 1 of the next layer overlaps the quantization, so the wall phases add up
to more than `calibrate_s`). `--serial` turns that overlap off
(LLMBUILD_CALIBRATION_OVERLAP=0), which also gives the phases' CPU seconds
(`statistics_cpu_s`, `quantize_cpu_s`). `--profile` writes a cProfile of the job and
prints the cumulative seconds of the calls that make up calibration. `--save` writes the
calibrated weights (codes, scales, offsets; AWQ's rescaled floats) to compare two
checkouts (`--compare A.npz B.npz`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "smollm2-135m-instruct.yaml"


def run_once(args) -> dict:
    from llmbuild.models.build import build_model
    from llmbuild.quantize.stage import QuantizationJob
    from llmbuild.recipe import load_recipe
    from llmbuild.source import open_source

    # a recipe file, not `quantization.*` overrides (those fail today, issue #17)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    options = "".join(f"\n  {line}" for line in args.option)
    path = work / "calibration-speed.yaml"
    path.write_text(f"extends: {RECIPE}\nname: calibration-speed\nengines: []\nquantization:\n"
                    f"  weights: {{scheme: int4, algorithm: {args.algorithm}, group_size: {args.group_size}}}\n"
                    f"  calibration: {{dataset: kjv, samples: {args.samples}, seq_len: 512, seed: 0}}{options}\n")
    recipe = load_recipe(path)
    rd = recipe.to_dict()
    source = open_source(recipe.source_path)
    model = build_model(source, rd["precision"], rd["limits"]["max_seq_len"])
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    start, cpu0 = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    job = QuantizationJob(model, source, recipe, work)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    if args.save:
        import numpy as np

        arrays = {f"float:{k}": v for k, v in job.cal.floats.items()}
        for k, q in job.cal.results.items():
            arrays |= {f"codes:{k}": q.data, f"scale:{k}": q.scale}
            if q.offset is not None:
                arrays[f"offset:{k}"] = q.offset
        np.savez(args.save, **arrays)
    rep = job.cal.report
    phases = {k: round(sum(layer[k] for layer in rep["layers"]), 2)
              for k in ("statistics_s", "waited_s", "quantize_s", "propagate_s", "statistics_cpu_s", "quantize_cpu_s")
              if all(k in layer for layer in rep["layers"])}
    return {"algorithm": args.algorithm, "samples": args.samples, "options": args.option, "overlap": rep["overlap"],
            "calibrate_s": rep["seconds"], "calibrate_cpu_s": rep["cpu_seconds"],
            "job_wall_s": round(wall, 2), "job_cpu_s": round(cpu, 2), **phases,
            "peak_rss_mib": round(rep["peak_rss_bytes"] / 2**20), "rss_before_mib": round(rep["rss_before_bytes"] / 2**20),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--algorithm", default="awq", choices=("awq", "gptq"))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--work", default="/tmp/llmbuild-calib-bench")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--option", action="append", default=[],
                    help="an extra line of the quantization section, e.g. 'awq: {clip: false}'")
    ap.add_argument("--profile", help="write a cProfile of the job to this file and print its main calls")
    ap.add_argument("--save", help="write the calibrated weights to this .npz")
    ap.add_argument("--compare", nargs=2, metavar="NPZ", help="compare two --save files and exit")
    ap.add_argument("--serial", action="store_true", help="no overlap of pass 1 and quantization (phase CPU seconds)")
    args = ap.parse_args()
    if args.serial:
        os.environ["LLMBUILD_CALIBRATION_OVERLAP"] = "0"
    if args.compare:
        compare(*args.compare)
        return
    for _ in range(args.repeat):
        print(json.dumps(run_once(args)), flush=True)
    if args.profile:
        print_profile(args.profile)


def compare(a: str, b: str) -> None:
    """Per kind of array: how many weights are identical, and the worst mismatch."""
    import numpy as np

    za, zb = np.load(a), np.load(b)
    if set(za.files) != set(zb.files):
        raise SystemExit(f"different weights: {sorted(set(za.files) ^ set(zb.files))[:5]}")
    for kind in ("codes", "scale", "offset", "float"):
        names = [k for k in za.files if k.startswith(kind + ":")]
        if not names:
            continue
        same = sum(np.array_equal(za[k], zb[k]) for k in names)
        if kind == "codes":
            worst = min(float(np.mean(za[k] == zb[k])) for k in names)
            detail = {"lowest_fraction_equal": round(worst, 6)}
        else:
            worst = max(float(np.max(np.abs(za[k] - zb[k]) / np.maximum(np.abs(za[k]), 1e-30))) for k in names)
            detail = {"worst_relative_difference": worst}
        print(json.dumps({"kind": kind, "weights": len(names), "identical": int(same), **detail}))


# The calls whose cumulative time splits calibration into its parts.
PROFILE_CALLS = ("run", "update", "awq_search_scales", "awq_search_clip", "gptq_quantize", "quantize",
                 "_search_factor", "_output_errors", "_side_by_side", "default_shrink", "dequantize", "matmul",
                 "cholesky", "inv", "slice", "ort_session", "_quantize_layer", "einsum", "gram")


def print_profile(path: str) -> None:
    import pstats

    stats = pstats.Stats(path).stats
    rows = [(ct, nc, f"{Path(fn).name}:{ln}:{name}") for (fn, ln, name), (_cc, nc, _tt, ct, _callers) in stats.items()
            if name in PROFILE_CALLS or name.endswith(tuple(f".{c}" for c in PROFILE_CALLS))
            or any(f"'{c}'" in name for c in PROFILE_CALLS)]
    for ct, nc, where in sorted(rows, reverse=True)[:25]:
        print(json.dumps({"cumulative_s": round(ct, 2), "calls": nc, "where": where}))


if __name__ == "__main__":
    main()
