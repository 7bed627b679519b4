"""Benchmark: TensorRT-RTX engine builds on the CPU — wall time and peak RSS of the engine
stage alone, for SmolLM2-135M (fp16) and a ~1.1B-parameter Llama-shaped model with random
weights (TinyLlama's shape, made here); a second compile reusing the engine cache; and
`llmbuild plan` on a 70B-class config.

    .venv/bin/python benchmarks/engine/bench_engine_build.py        # writes results.md + results.json

Each engine build runs in a fresh process (`--build ONNX LIMITS_JSON`) that imports
llmbuild, builds one engine from an existing ONNX graph and reports its wall time
(build_engine only) and its peak RSS (getrusage, the whole process). Both profiles
(prefill + decode) and the portable default target are built, as `compile` does.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
MiB = 2**20

# TinyLlama-1.1B's shape: 22 layers, hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000.
ONE_B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 64,
    "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float16",
    "bos_token_id": 1, "eos_token_id": 2,
}
LIMITS = {"max_batch_size": 4, "max_input_len": 512, "max_seq_len": 2048}
LLAMA3_70B = {**ONE_B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
              "max_position_embeddings": 8192}


def make_random_llama(dst: Path, config: dict, seed: int = 0) -> Path:
    """An HF checkpoint dir (config.json + model.safetensors) with N(0, 0.02) fp16 weights."""
    import numpy as np
    from safetensors.numpy import save_file

    from llmbuild.models import get_architecture

    arch = get_architecture(config)

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in arch.expected_shapes(arch.LlamaDims.from_config(config)).items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, np.float16)
        else:
            tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def export_onnx(source_path: Path, dst: Path, max_seq_len: int) -> tuple[Path, int]:
    from llmbuild.graph.export import save_model
    from llmbuild.models.build import build_model
    from llmbuild.source import open_source

    with open_source(source_path) as source:
        layers = int(source.config["num_hidden_layers"])
        return save_model(build_model(source, "float16", max_seq_len), dst), layers


def build_in_fresh_process(onnx_path: Path, layers: int, out: Path, profiles: str = "both") -> dict:
    proc = subprocess.run([sys.executable, __file__, "--build", str(onnx_path), str(layers), str(out), profiles],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"engine build failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_build(onnx_path: str, layers: str, out: str, profiles: str = "both") -> None:
    from llmbuild.engine import build as build_mod
    from llmbuild.engine.build import build_engine

    if profiles == "prefill-only":  # for comparison: the single profile engines had before
        both = build_mod.profiles_from_limits
        build_mod.profiles_from_limits = lambda *a, **k: both(*a, **k)[:1]

    start = time.perf_counter()
    info = build_engine(Path(onnx_path), Path(out), backend="tensorrt-rtx", precision="float16", limits=LIMITS,
                        num_layers=int(layers))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss": peak, "engine_bytes": info["bytes"],
                      "trt_version": info["trt_version"], "profiles": len(info["profiles"])}))


def onnx_bytes(onnx_path: Path) -> int:
    return sum(p.stat().st_size for p in onnx_path.parent.iterdir())


def compile_twice(tmp: Path) -> dict:
    """SmolLM2 compiled twice into the same (fresh) engine cache: engine stage miss vs hit."""
    out = {}
    for run in ("first", "second"):
        proc = subprocess.run(
            [sys.executable, "-m", "llmbuild.cli", "compile", str(ROOT / "recipes" / "smollm2-135m-instruct.yaml"),
             "-o", str(tmp / run), "--no-verify", "--json", "--cache-dir", str(tmp / "cache")],
            capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        summary = json.loads(proc.stdout)
        stage = next(v for k, v in summary["timings"].items() if k.startswith("engine:"))
        out[run] = {"engine_stage_seconds": stage["seconds"], "cached": summary["artifacts"][0]["engines"][0]["cached"],
                    "total_seconds": round(sum(v["seconds"] for v in summary["timings"].values()), 2)}
    return out


def plan_70b(tmp: Path, repeats: int = 5) -> float:
    src = tmp / "llama3-70b"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA3_70B))
    recipe = tmp / "big.yaml"
    recipe.write_text("name: big\nmodel: {source: llama3-70b}\nprecision: bfloat16\n"
                      "limits: {max_batch_size: 8, max_input_len: 2048, max_seq_len: 8192}\n"
                      "engines: [tensorrt]\nparallel: {tp: 8}\n")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llmbuild.cli", "plan", str(recipe), "--json"], check=True,
                       capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return round(sorted(times)[len(times) // 2], 2)


def main() -> None:
    import os

    from tests.conftest import smollm2_gguf

    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        tmp = Path(tmp)
        smollm2_onnx, layers = export_onnx(smollm2_gguf(), tmp / "smollm2-onnx", LIMITS["max_seq_len"])
        r = build_in_fresh_process(smollm2_onnx, layers, tmp / "smollm2.engine")
        rows.append({"model": "SmolLM2-135M-Instruct (fp16)", "parameters": 134_515_008,
                     "onnx_bytes": onnx_bytes(smollm2_onnx), **r})
        r = build_in_fresh_process(smollm2_onnx, layers, tmp / "smollm2-1.engine", "prefill-only")
        rows.append({"model": "SmolLM2-135M-Instruct (fp16), prefill profile only", "parameters": 134_515_008,
                     "onnx_bytes": onnx_bytes(smollm2_onnx), **r})

        t = time.perf_counter()
        one_b = make_random_llama(tmp / "llama-1b", ONE_B)
        made = time.perf_counter() - t
        one_b_onnx, layers = export_onnx(one_b, tmp / "llama-1b-onnx", LIMITS["max_seq_len"])
        for f in one_b.iterdir():
            f.unlink()  # free the disk before the build
        r = build_in_fresh_process(one_b_onnx, layers, tmp / "llama-1b.engine")
        from llmbuild.plan import parameter_groups

        params = sum(parameter_groups(ONE_B).values())
        rows.append({"model": "Llama-shaped 1.1B, random weights (fp16)", "parameters": params,
                     "onnx_bytes": onnx_bytes(one_b_onnx), "weights_made_seconds": round(made, 1), **r})
        cache = compile_twice(tmp / "compile")
        plan_seconds = plan_70b(tmp)

    load = (round(load_before, 1), round(os.getloadavg()[0], 1))
    results = {"machine": f"{platform.machine()}, {platform.python_version()}", "load_average": load,
               "limits": LIMITS, "builds": rows,
               "smollm2_compile_twice": cache, "plan_70b_seconds": plan_seconds}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Engine build benchmark (TensorRT-RTX, CPU only)",
        "",
        "`.venv/bin/python benchmarks/engine/bench_engine_build.py` — each engine is built in a fresh process "
        f"from an existing ONNX graph; limits {LIMITS}, two optimization profiles (prefill + decode), the "
        "portable default target. Peak RSS is the whole build process's (getrusage).",
        "",
        "| model | parameters | ONNX on disk | profiles | engine | build wall time | peak RSS | TensorRT-RTX |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:,.0f} M | {r['onnx_bytes'] / MiB:,.0f} MiB | "
                     f"{r['profiles']} | {r['engine_bytes'] / MiB:,.0f} MiB | {r['seconds']:.1f} s | "
                     f"{r['peak_rss'] / MiB:,.0f} MiB | {r['trt_version']} |")
    first, second = cache["first"], cache["second"]
    lines += [
        "",
        "Engine cache (`llmbuild compile recipes/smollm2-135m-instruct.yaml` twice, same cache, fresh processes):",
        "",
        "| compile | engine stage | cached | all stages |",
        "|---|---:|---|---:|",
        f"| first | {first['engine_stage_seconds']:.2f} s | {first['cached']} | {first['total_seconds']:.1f} s |",
        f"| second | {second['engine_stage_seconds']:.2f} s | {second['cached']} | {second['total_seconds']:.1f} s |",
        "",
        f"`llmbuild plan` on a Llama-3-70B-shaped config (config.json only, tp 8): {plan_seconds:.2f} s wall "
        "(median of 5, whole process incl. Python start-up).",
        "",
        f"Machine: 2 cores, 24 GB, no GPU ({results['machine']}); 1-minute load average {load[0]} at the start, "
        f"{load[1]} at the end (other work on the same cores stretches wall times).",
    ]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        child_build(*sys.argv[2:6])
    else:
        main()
