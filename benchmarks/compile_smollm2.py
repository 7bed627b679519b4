"""Benchmark: compiling SmolLM2-135M-Instruct (the default recipe, as `llmbuild compile`
runs it: fp16, TensorRT-RTX engine, verification against HF transformers when torch and
transformers are installed) — in one run, against #16's targets:

    first compile     <= 1.5 x the engine stage alone
    no-op recompile   <= 5 % of the first compile

    .venv/bin/python benchmarks/compile_smollm2.py [--runs N]   # writes benchmarks/compile_smollm2.md

1. first compile: `llmbuild compile RECIPE -o OUT -q --cache-dir EMPTY` in a fresh process
   (an empty private cache: nothing reused, HF reference outputs computed);
2. no-op recompile: the same command again (every stage reused from the cache);
3. engine stage alone: a fresh process that builds the same engine from the first
   artifact's ONNX graph with `llmbuild.engine.build.build_engine`, as compile's engine
   stage does, without cache; the build's own seconds (imports excluded) are the figure,
   the process's wall time is given too;

Wall times are the whole command's (process start to exit). Per-stage figures come from
the manifests (wall time, RSS at stage start, peak RSS sampled every 20 ms; verification
runs concurrently with the engine build, so stage times overlap).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-instruct.yaml"
LLMBUILD = [sys.executable, "-m", "llmbuild.cli"]
MiB = 2**20

ENGINE_ALONE = """
import json, sys, time
from pathlib import Path
from llmbuild.engine.build import build_engine
art, out = Path(sys.argv[1]), Path(sys.argv[2])
m = json.loads((art / "manifest.json").read_text())
rd = m["recipe"]
entry = rd["engines"][0]
start = time.perf_counter()
build_engine(art / m["graph"]["file"], out, backend=entry["backend"], precision=rd["precision"],
             limits=dict(rd["limits"]), num_layers=m["model"]["num_layers"],
             options={k: v for k, v in entry.items() if k != "backend"})
print(json.dumps({"build_seconds": time.perf_counter() - start}))
"""


def run_time(argv: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes, from GNU time) and stdout of a command."""
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], capture_output=True, text=True, cwd=ROOT,
                         env=None if env is None else {**os.environ, **env})
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{out.stderr}")
    return seconds, int(out.stderr.strip().splitlines()[-1]) * 1024, out.stdout


def startup(argv: list[str], n: int = 7) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, cwd=ROOT, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_table(m: dict) -> list[str]:
    lines = ["| stage | reused | wall (s) | RSS at start (MiB) | peak RSS (MiB) |", "|---|---|---:|---:|---:|"]
    for stage, t in m["timings"].items():
        lines.append(f"| {stage} | {'yes' if t.get('reused') else 'no'} | {t['seconds']:.2f} | "
                     f"{t['start_rss_bytes'] / MiB:.0f} | {t['peak_rss_bytes'] / MiB:.0f} |")
    return lines


def one_run(tmp: Path) -> dict:
    """First compile, no-op recompile, engine stage alone, back to back (one fresh cache)."""
    load_before = os.getloadavg()
    command = [*LLMBUILD, "compile", str(RECIPE), "-o", str(tmp / "out"), "-q", "--cache-dir", str(tmp / "cache")]
    first_s, first_peak, _ = run_time(command)
    art = tmp / "out" / "smollm2-135m-instruct"
    first = json.loads((art / "manifest.json").read_text())
    noop_s, noop_peak, _ = run_time(command)
    noop = json.loads((art / "manifest.json").read_text())
    alone_wall, alone_peak, out = run_time([sys.executable, "-c", ENGINE_ALONE, str(art), str(tmp / "alone.engine")])
    alone = json.loads(out.strip().splitlines()[-1])["build_seconds"]
    return {"first_s": first_s, "first_peak": first_peak, "first": first, "noop_s": noop_s, "noop_peak": noop_peak,
            "noop": noop, "alone_wall": alone_wall, "alone_peak": alone_peak, "alone": alone,
            "weights": (art / first["graph"]["weights"]).stat().st_size, "load_before": load_before,
            "load_after": os.getloadavg()}


def run_section(i: int, r: dict) -> list[str]:
    first, noop, alone, first_s, noop_s = r["first"], r["noop"], r["alone"], r["first_s"], r["noop_s"]
    engine_stage = next(t["seconds"] for s, t in first["timings"].items() if s.startswith("engine:"))
    verified = first["verification"]
    verify_text = ("passed" if verified and verified.get("passed") else "not run" if not verified else "FAILED")
    all_reused = all(t.get("reused") for t in noop["timings"].values())
    ratio_first, ratio_noop = first_s / alone, noop_s / first_s
    load = "/".join(f"{x:.1f}" for x in r["load_before"]), "/".join(f"{x:.1f}" for x in r["load_after"])
    return [
        f"## Run {i}: first compile, no-op recompile, engine stage alone",
        "",
        f"1/5/15-minute load average {load[0]} before, {load[1]} after (on {os.cpu_count()} cores); "
        f"verification: {verify_text}.",
        "",
        "| measurement | wall (s) | peak RSS (MiB) | target | met |",
        "|---|---:|---:|---|---|",
        f"| first compile (empty cache) | {first_s:.1f} | {r['first_peak'] / MiB:.0f} | ≤ 1.5 × engine stage alone = "
        f"{1.5 * alone:.1f} s (is {ratio_first:.2f} ×) | {'yes' if ratio_first <= 1.5 else 'NO'} |",
        f"| no-op recompile | {noop_s:.1f} | {r['noop_peak'] / MiB:.0f} | ≤ 5 % of the first = {0.05 * first_s:.1f} s "
        f"(is {ratio_noop:.1%}) | {'yes' if ratio_noop <= 0.05 else 'NO'} |",
        f"| engine stage alone (build_engine) | {alone:.1f} | {r['alone_peak'] / MiB:.0f} | — | — |",
        "",
        f"The engine stage alone ran in a process of {r['alone_wall']:.1f} s wall (imports of TensorRT-RTX and onnx "
        f"included); inside the first compile the engine stage took {engine_stage:.1f} s. The no-op recompile "
        f"reused {'every stage' if all_reused else 'NOT every stage'} "
        f"({', '.join(s for s, t in noop['timings'].items() if t.get('reused'))}).",
        "",
        "### First compile, per stage",
        "",
        *stage_table(first),
        "",
        "### No-op recompile, per stage",
        "",
        *stage_table(noop),
        "",
    ]


def main() -> None:
    import argparse

    from llmbuild.source import read_config  # noqa: F401  (fails early outside the venv)

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1, help="repeat the three measurements (each with a fresh cache)")
    args = parser.parse_args()
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one_run(Path(tmp)))
        write_report(args, runs, None, None)  # after every run: a run cut short keeps the ones before
    write_report(args, runs, startup([*LLMBUILD, "--help"]), startup([*LLMBUILD, "validate", str(RECIPE)]))


def write_report(args, runs: list[dict], help_s: float | None, validate_s: float | None) -> None:
    lines = [
        "# Compile benchmark: SmolLM2-135M-Instruct (`recipes/smollm2-135m-instruct.yaml`)",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; measured "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')} (1-minute load averages per run below: on a machine shared with other "
        "jobs the absolute figures are slower than idle; the ratios, measured back to back in one run, are what the "
        "run compares).",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/compile_smollm2.py --runs {args.runs}"
        "` (method: the script's "
        f"docstring). Command measured: `llmbuild compile {RECIPE.relative_to(ROOT)} -o OUT -q --cache-dir FRESH` "
        "(fp16, TensorRT-RTX portable engine, verification against HF transformers on).",
        "",
        "| run | 1-min load avg before → after | first compile (s) | engine stage alone (s) | first / engine | "
        "no-op (s) | no-op / first |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(f"| {i} | {r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} | {r['first_s']:.1f} | {r['alone']:.1f} | "
          f"{r['first_s'] / r['alone']:.2f} × | {r['noop_s']:.1f} | {r['noop_s'] / r['first_s']:.1%} |"
          for i, r in enumerate(runs, 1)),
        "",
        *(line for i, r in enumerate(runs, 1) for line in run_section(i, r)),
        f"fp16 weights written to ONNX external data: {runs[0]['weights'] / MiB:.0f} MiB (30 layers, 135M parameters).",
        "",
        *([] if help_s is None else [
            "## CLI start-up (median of 7 runs, fresh process each)",
            "",
            f"- `llmbuild --help`: {help_s * 1000:.0f} ms",
            f"- `llmbuild validate recipes/smollm2-135m-instruct.yaml` (reads the GGUF header): {validate_s * 1000:.0f} ms",
            "",
        ]),
    ]
    out = Path(__file__).with_suffix(".md")
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
