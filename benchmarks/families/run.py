"""Per-family benchmark (issue #12): random-weight models at real checkpoints' shapes,
compiled by llmbuild and by onnxruntime-genai's model builder, decoded on the CPU side by
side with HF transformers on the same weights.

    pip install onnxruntime-genai==0.18.0          # benchmark-only peer (`pip install -e '.[bench]'`)
    python benchmarks/families/run.py --out /tmp/llmbuild-fambench [--only qwen3-0.6b,...] [--rounds 4]

Per family (configs/<name>/config.json: the published config.json values; Gemma-2-2B and
Phi-4-mini trimmed to 2 layers):

1. prepare: the model with transformers' random init (seed 0), saved as float32
   safetensors, plus tests/tiny.py's character-level tokenizer of the model's vocab size;
2. build (each in its own process, wall time and peak RSS from the kernel's rusage):
   `llmbuild compile RECIPE '~engines' verify.enabled=false` (float32, a fresh stage cache;
   the manifest's per-stage timings give the onnx and cpu_graph stages), and
   `python -m onnxruntime_genai.models.builder -p fp32 -e cpu` (Gemma 3: on a copy of the
   checkpoint whose config gives the rope settings in the flat form it reads,
   flat_rope_checkpoint);
3. decode, all three in one process taking turns (`--rounds` rounds; within a round each
   runtime prefills the same 128-token prompt of random ids, then runs 32 greedy steps,
   the first not counted): our artifact's CPU-ready graph on ONNX Runtime through the
   executor (one forward pass + argmax per step), genai's `generate_next_token`, HF
   (torch, float32, use_cache) one forward + argmax per step. 2 threads each. The
   greedy tokens of ours and genai are checked against HF's (random weights: no ties).

Prints a JSON object per family and writes them to OUT/results.json; `--table` prints the
markdown tables of benchmarks/families/RESULTS.md from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "configs"
FAMILIES = {  # name -> layers kept (None = all)
    "qwen2.5-0.5b-instruct": None,
    "qwen3-0.6b": None,
    "gemma-3-270m": None,
    "gemma-2-2b": 2,
    "phi-4-mini-instruct": 2,
}
LIMITS = {"max_batch_size": 1, "max_input_len": 256, "max_seq_len": 512}
PROMPT, STEPS = 128, 32  # interleaved.genai's generator holds the prompt + 40 tokens


def prepare(name: str, layers: int | None, dst: Path) -> Path:
    """The random-weight float32 checkpoint of `name` at dst (kept if already there)."""
    if (dst / "config.json").is_file():
        return dst
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from transformers import AutoConfig, AutoModelForCausalLM
from tests.tiny import write_tiny_tokenizer
config = AutoConfig.from_pretrained({str(CONFIGS / name)!r})
if {layers!r}:
    config.num_hidden_layers = {layers!r}
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:{layers!r}]
config.dtype = torch.float32
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
model.save_pretrained({str(dst)!r})
write_tiny_tokenizer({str(dst)!r}, config.vocab_size, 4096)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return dst


def timed(cmd: list[str], log: Path) -> dict:
    """Run cmd (output to `log`); its wall time (s) and peak RSS (MiB) from wait4's rusage,
    or the last line of its output if it failed."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": log.read_text().strip().splitlines()[-1]}
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def build_ours(name: str, hf: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / f"{name}.yaml"
    recipe.write_text(f"name: {name}\nmodel:\n  source: {hf}\nprecision: float32\n"
                      f"limits: {json.dumps(LIMITS)}\nengines: []\n")
    cache = out / "stage-cache"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out / name, ignore_errors=True)
    figures = timed([str(Path(sys.executable).parent / "llmbuild"), "compile", str(recipe), "-o", str(out), "-q",
                     "--cache-dir", str(cache), "~engines", "verify.enabled=false"], out.parent / "compile.log")
    if "error" in figures:
        raise SystemExit(f"llmbuild compile {recipe} failed: {figures['error']}")
    timings = json.loads((out / name / "manifest.json").read_text())["timings"]
    for stage in ("source", "onnx", "cpu_graph"):
        figures[f"{stage}_s"] = round(timings[stage]["seconds"], 1)
    figures["onnx_peak_rss_mib"] = round(timings["onnx"]["peak_rss_bytes"] / 2**20)
    return figures


def flat_rope_checkpoint(hf: Path, dst: Path) -> Path:
    """Gemma 3's checkpoint for genai's builder: the same weights (symlinked), config.json
    with the rope settings also given in the flat form the builder reads.

    transformers 5 holds Gemma 3's rope settings per layer type (`rope_parameters =
    {"sliding_attention": {...}, "full_attention": {...}}`, from the published
    `rope_theta`, `rope_local_base_freq` and `rope_scaling: null`, and saves them so); the builder's base
    class reads `rope_parameters["rope_type"]` (KeyError) and its Gemma 3 class
    `rope_local_base_freq`, neither of which the nested form has. Given a flat
    `rope_parameters = {"rope_type": "default", "rope_theta": <global>,
    "rope_local_base_freq": <local>}`, transformers keeps those keys and adds the same two
    per-layer-type entries it derives from the published config; checked here: the
    per-layer-type settings transformers reads are equal for both configs."""
    from transformers import AutoConfig

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in hf.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    config = json.loads((hf / "config.json").read_text())  # as transformers saved it: nested
    rope = config["rope_parameters"]
    if any(rope[t].get("rope_type") != "default" for t in ("sliding_attention", "full_attention")):
        raise SystemExit(f"{hf}: rope {rope} is not the default rope of both layer types")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": rope["full_attention"]["rope_theta"],
                                 "rope_local_base_freq": rope["sliding_attention"]["rope_theta"]}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    ours, theirs = AutoConfig.from_pretrained(hf), AutoConfig.from_pretrained(dst)
    for layer_type in ("sliding_attention", "full_attention"):
        if ours.rope_parameters[layer_type] != theirs.rope_parameters[layer_type]:
            raise SystemExit(f"{dst}: {layer_type} rope {theirs.rope_parameters[layer_type]} != "
                             f"{ours.rope_parameters[layer_type]}")
    return dst


GENAI_CHECKPOINT = {"gemma-3-270m": flat_rope_checkpoint}  # name -> the checkpoint genai's builder reads


def build_genai(name: str, hf: Path, out: Path, threads: int) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks" / "runtime"))
    from prepare import genai_command, genai_threads

    shutil.rmtree(out, ignore_errors=True)
    if name in GENAI_CHECKPOINT:
        hf = GENAI_CHECKPOINT[name](hf, out.parent / "hf-genai")
    figures = timed(genai_command(hf, out, "fp32"), out.parent / "genai-builder.log")
    if "error" not in figures:
        genai_threads(out, threads)
    return figures


# -- decode, in one process --------------------------------------------------------------------


def decode(name: str, root: Path, rounds: int, threads: int) -> dict:
    """All three runtimes of one family, interleaved; tokens/s per runtime and the ratios."""
    import numpy as np
    import psutil

    sys.path.insert(0, str(ROOT / "benchmarks" / "runtime"))
    from interleaved import genai, ours, transformers

    proc = psutil.Process()
    loaders = {"llmbuild": lambda: ours(root / "out" / name, threads),
               "onnxruntime-genai": lambda: genai(root / "genai-fp32", threads),
               "transformers": lambda: transformers(root / "hf", threads)}
    if not (root / "genai-fp32" / "genai_config.json").is_file():  # its builder failed (results: build)
        del loaders["onnxruntime-genai"]
    loaded, rss = {}, {}
    for runtime, make in loaders.items():
        before = proc.memory_info().rss
        loaded[runtime] = make()
        rss[runtime] = round((proc.memory_info().rss - before) / 2**20)
    rng = np.random.default_rng(0)
    steps = {r: [] for r in loaded}
    tokens = {r: [] for r in loaded}
    loads = []
    for _ in range(rounds):
        ids = rng.integers(20, 40000, PROMPT).tolist()
        for runtime, (prefill, step) in loaded.items():
            token = prefill(ids)
            out = [token]
            for k in range(STEPS):
                start = time.perf_counter()
                token = step(token, PROMPT + k)
                if k:  # the first step is not counted
                    steps[runtime].append(time.perf_counter() - start)
                out.append(token)
            tokens[runtime].append(out)
        loads.append(round(os.getloadavg()[0], 1))
    res = {"load_average_1min": loads, "rss_delta_at_load_mib": rss}
    for runtime, t in steps.items():
        res[runtime] = {"decode_tok_s_median": round(1 / statistics.median(t), 2),
                        "decode_tok_s_best": round(1 / min(t), 2)}
    for runtime in set(loaded) - {"transformers"}:  # greedy tokens equal to HF's
        same = [a == b for ra, rb in zip(tokens[runtime], tokens["transformers"]) for a, b in zip(ra, rb)]
        res[runtime]["tokens_equal_to_hf"] = f"{sum(same)}/{len(same)}"
    med = {r: res[r]["decode_tok_s_median"] for r in loaded}
    if "onnxruntime-genai" in med:
        res["ratio_llmbuild_vs_genai"] = round(med["llmbuild"] / med["onnxruntime-genai"], 2)
    res["ratio_llmbuild_vs_transformers"] = round(med["llmbuild"] / med["transformers"], 2)
    return res


def table(results: dict) -> str:
    lines = ["| family | ours: onnx stage (s) / its peak RSS (MiB) | ours: cpu_graph (s) "
             "| ours: compile wall (s) / peak RSS (MiB) | genai builder wall (s) / peak RSS (MiB) "
             "| decode tok/s ours / genai / HF (median) | ours ÷ genai | ours ÷ HF | load avg | decode ≥ genai | run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for name, r in results.items():
        o, g, d = r["build"]["llmbuild"], r["build"]["onnxruntime-genai"], r["decode"]
        loads = d["load_average_1min"]
        genai_tok = d.get("onnxruntime-genai", {}).get("decode_tok_s_median", "—")
        ratio = d.get("ratio_llmbuild_vs_genai")
        met = "no genai figure" if ratio is None else ("yes" if ratio >= 1 else "NO")
        builder = g.get("error") or g.get("note") or f"{g['wall_s']} / {g['peak_rss_mib']}"
        lines.append(
            f"| {name} | {o['onnx_s']} / {o['onnx_peak_rss_mib']} | {o['cpu_graph_s']} "
            f"| {o['wall_s']} / {o['peak_rss_mib']} | {builder} | {d['llmbuild']['decode_tok_s_median']} / "
            f"{genai_tok} / {d['transformers']['decode_tok_s_median']} "
            f"| {ratio if ratio is not None else '—'} | {d['ratio_llmbuild_vs_transformers']} "
            f"| {min(loads)}–{max(loads)} | {met} | {r.get('run', '')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/llmbuild-fambench"))
    parser.add_argument("--only", help="comma-separated family names (default: all)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep each family's checkpoint and models")
    parser.add_argument("--table", action="store_true", help="print the tables of OUT/results.json and exit")
    parser.add_argument("--decode-only", help=argparse.SUPPRESS)  # internal: one family's decode process
    args = parser.parse_args()
    results_file = args.out / "results.json"
    if args.table:
        print(table(json.loads(results_file.read_text())))
        return
    if args.decode_only:
        print(json.dumps(decode(args.decode_only, args.out / args.decode_only, args.rounds, args.threads)))
        return
    names = args.only.split(",") if args.only else list(FAMILIES)
    for name in names:
        root = args.out / name
        hf = prepare(name, FAMILIES[name], root / "hf")
        build = {"llmbuild": build_ours(name, hf, root / "out"),
                 "onnxruntime-genai": build_genai(name, hf, root / "genai-fp32", args.threads)}
        run = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--rounds", str(args.rounds),
                              "--threads", str(args.threads), "--decode-only", name],
                             check=True, stdout=subprocess.PIPE, text=True)
        result = {"layers": FAMILIES[name] or "all", "build": build, "decode": json.loads(run.stdout)}
        print(json.dumps({name: result}), flush=True)
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}  # other runs' families
        results_file.write_text(json.dumps({**results, name: result}, indent=2))
        for folder in ("genai-cache", "hf-genai", *(() if args.keep else ("hf", "out", "genai-fp32"))):
            shutil.rmtree(root / folder, ignore_errors=True)  # a family takes up to ~12 GB of disk


if __name__ == "__main__":
    main()
