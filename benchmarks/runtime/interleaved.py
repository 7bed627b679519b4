"""All runtimes in one process, taking turns in short bursts: the comparison that holds
up on a shared machine (other work slows every runtime alike within a round).

    python benchmarks/runtime/interleaved.py --models /tmp/llmbuild-bench [--rounds 3] [--threads 2]
        [--quantized /tmp/llmbuild-quant-bench/artifacts]

Per round and runtime: prefill of a 128- and a 1024-token prompt (random ids, fixed
seeds; ours in chunks of the artifact's max_input_len = 512), then 32 greedy decode
steps after a 128-token prompt (the first of them not counted). Each step is one forward pass plus the argmax, as the
peers do it (llmbuild's engine adds its scheduling on top: `llmbuild bench` reports that
Python overhead, about 0.1-0.5 ms per step). Prints a markdown table: tokens/s of the
best pass / step, and of the median. Row names carry bits per weight (ours: the
manifest's quantization summary). Each of our quantized artifacts runs twice: ONNX
Runtime's thread pool spinning (its default) and sleeping between kernels
(`spinning=False`); llama.cpp's OpenMP threads sleep instead of spinning with
OMP_WAIT_POLICY=PASSIVE in the environment.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np


def bpw(artifact: Path) -> str:
    """Bits per weight over all matrices of a quantized artifact ("?" before it exists)."""
    from llmbuild.artifact import read_manifest

    if not (artifact / "manifest.json").is_file():
        return "?"
    return f"{read_manifest(artifact)['quantization']['summary']['bits_per_weight']:.2f}"


def ours(artifact: Path, threads: int, spinning: bool = True, cpu_kernels: bool | None = None):
    from llmbuild.artifact import read_manifest
    from llmbuild.lowering.cpu_graph import cpu_graph_file
    from llmbuild.runtime.executors.base import StepInputs
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    from executor_steps import chunked_prefill  # benchmarks/runtime, next to this file

    m = read_manifest(artifact)
    ex = OnnxRuntimeExecutor(artifact / m["graph"]["file"], num_layers=m["model"]["num_layers"],
                             cache_len=m["limits"]["max_seq_len"], threads=threads,
                             cpu_graph=cpu_graph_file(artifact, m),  # the artifact's CPU-ready graph, if shipped
                             spinning=spinning, cpu_kernels=cpu_kernels)
    chunk = m["limits"]["max_input_len"]
    print(f"- {artifact.name} (spinning={spinning}): decode kernels {ex.kernels}", flush=True)

    def prefill(ids):
        return chunked_prefill(ex, ids, chunk)

    def step(token, pos):
        p = np.array([pos])
        return int(ex.forward(StepInputs(np.array([[token]]), p[:, None], p, np.zeros((1, 1), np.int64)))[0, 0].argmax())

    return prefill, step


def genai(path: Path, threads: int):
    import json

    import onnxruntime_genai as og

    decoder = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
    got = decoder["session_options"]
    assert got.get("intra_op_num_threads") == threads, got
    # Windowed layers (Gemma 3): genai sizes their ring cache from max_length, and its
    # GroupQueryAttention requires at least the window's rows. (Phi-4-mini's config names a
    # window, 262144, but no windowed layers.)
    sliding = decoder.get("sliding_window", {})
    window = int(sliding.get("window_size", 0)) if sliding.get("layers") else 0
    model = og.Model(str(path))
    state = {}

    def prefill(ids):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max(len(ids) + 40, window), do_sample=False)
        state["g"] = og.Generator(model, params)
        state["g"].append_tokens(ids)  # get_next_tokens() would be the prompt's last id here
        state["g"].generate_next_token()  # picks the first token from the prompt's logits
        return int(state["g"].get_next_tokens()[0])

    def step(token, pos):
        state["g"].generate_next_token()
        return int(state["g"].get_next_tokens()[0])

    return prefill, step


def llama_cpp(path: Path, threads: int):
    import llama_cpp as lc

    llm = lc.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=1024,
                   verbose=False)

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def step(token, pos):
        llm.eval([token])
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    return prefill, step


def transformers(path: Path, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    state = {}

    def prefill(ids):
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def step(token, pos):
        with torch.no_grad():
            out = model(torch.tensor([[token]]), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    return prefill, step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("/tmp/llmbuild-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantized", type=Path, default=Path("/tmp/llmbuild-quant-bench/artifacts"),
                        help="quantized artifacts (benchmarks/quantization/run.py); rows run when present")
    parser.add_argument("--only", help="comma-separated substrings: run the rows whose name contains one")
    parser.add_argument("--settle", type=float, default=0.1,
                        help="seconds of sleep before each runtime's turn: ONNX Runtime's and OpenMP's "
                             "workers spin for milliseconds after their last work, which slowed the next "
                             "runtime's first prefill (0 = the tables before 2026-12-03)")
    parser.add_argument("--mlas-rows", action="store_true",
                        help="also run each quantized artifact of ours on ONNX Runtime's kernels only")
    parser.add_argument("--no-sleeping", action="store_true",
                        help="leave out the `spinning=False` runs of our quantized artifacts")
    args = parser.parse_args()
    m, t, q = args.models, args.threads, args.quantized
    quantized = {  # bits per weight over every matrix (the manifest's quantization summary)
        f"llmbuild ORT executor, int8 artifact + int8 lm_head ({bpw(path)} bpw)": path
        for path in (q / "smollm2-int8-head8",)
    } | {
        f"llmbuild ORT executor, int4 {kind} artifact ({bpw(path)} bpw)": path
        for kind, path in (("AWQ g128 + int8 lm_head", q / "smollm2-int4-awq-g128-head8"),
                           ("RTN g128 + int8 lm_head", q / "smollm2-int4-rtn-g128-head8"),
                           ("g32 + int4 g32 lm_head", q / "smollm2-int4-rtn-g32-head4"),
                           # g64: 5.0 bits per weight in ONNX Runtime's packed layout against
                           # g32's 6.0 (weight_bytes.py); AWQ holds the accuracy
                           ("AWQ g64 + int4 g64 lm_head", q / "smollm2-int4-awq-g64-head4"),
                           ("AWQ g64 + int8 lm_head", q / "smollm2-int4-awq-g64-head8"),
                           # 8-bit scale codes (scale_bits: 8): Q4_K-like, asym g32
                           ("asym g32 scales 8-bit", q / "smollm2-int4-asym-rtn-g32-s8"),
                           ("asym g32 scales 8-bit + int8 lm_head", q / "smollm2-int4-asym-rtn-g32-s8-head8"),
                           ("auto 4.5 bpw (scales 8-bit) + int8 lm_head", q / "smollm2-auto-4.5bpw-head8"))
    }
    # llama.cpp GGUFs of the quantization benchmark (same weights; its WORK, next to `artifacts`)
    quant_ggufs = {f"llama.cpp {kind} (quantization benchmark's GGUF)": q.parent / f"smollm2-{kind}.gguf"
                   for kind in ("Q4_K_M", "Q4_1", "Q4_0", "Q4_0-pure", "Q8_0")}
    runtimes = {
        "llmbuild ORT executor, fp32 artifact (CPU lowering)": lambda: ours(m / "smollm2-135m-instruct-fp32", t),
        "llmbuild ORT executor, fp16 artifact (CPU lowering)": lambda: ours(m / "smollm2-135m-instruct-fp16", t),
        "onnxruntime-genai fp32": lambda: genai(m / "genai-fp32", t),
        "llama.cpp F16": lambda: llama_cpp(m / "gguf" / "smollm2-f16.gguf", t),
        "llama.cpp Q4_0 (every matrix Q4_0, output too: 4.5 bpw)":
            lambda: llama_cpp(m / "gguf" / "smollm2-q4_0.gguf", t),
        "llama.cpp Q8_0 (every matrix Q8_0: 8.5 bpw)": lambda: llama_cpp(m / "gguf" / "smollm2-q8_0.gguf", t),
        "HF transformers (torch) fp32": lambda: transformers(m / "hf", t),
        **{name: (lambda path=path: ours(path, t)) for name, path in quantized.items() if (path / "manifest.json").is_file()},
        **{f"{name}, threads sleep (no spinning)": (lambda path=path: ours(path, t, spinning=False))
           for name, path in quantized.items() if (path / "manifest.json").is_file() and not args.no_sleeping},
        # the same artifact with decode steps on ONNX Runtime's MatMulNBits (MLAS) instead of
        # llmbuild's kernels (llmbuild/runtime/kernels.py; the rows above use them when built)
        **{f"{name}, ONNX Runtime's kernels only": (lambda path=path: ours(path, t, cpu_kernels=False))
           for name, path in quantized.items() if (path / "manifest.json").is_file() and args.mlas_rows},
        **{name: (lambda path=path: llama_cpp(path, t)) for name, path in quant_ggufs.items() if path.is_file()},
        **({"onnxruntime-genai int4 (g32, float32 scales, lm_head too: 5.0 bpw)": lambda: genai(m / "genai-int4", t)}
           if (m / "genai-int4").is_dir() else {}),
    }
    wanted = args.only.split(",") if args.only else None
    loaded = {name: make() for name, make in runtimes.items() if wanted is None or any(w in name for w in wanted)}
    rng = np.random.default_rng(0)
    times = {name: {"p128": [], "p1024": [], "step": []} for name in loaded}
    loads = []
    for _ in range(args.rounds):
        p128, p1024 = (rng.integers(20, 40000, n).tolist() for n in (128, 1024))
        for name, (prefill, step) in loaded.items():
            time.sleep(args.settle)  # the previous runtime's spinning workers go to sleep first
            for key, ids in (("p128", p128), ("p1024", p1024)):
                start = time.perf_counter()
                prefill(ids)
                times[name][key].append(time.perf_counter() - start)
            token = prefill(p128)
            for k in range(33):  # the first step is not counted
                start = time.perf_counter()
                token = step(token, 128 + k)
                if k:
                    times[name]["step"].append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
    print(f"{args.rounds} rounds, {t} threads each, 1-min load average during the rounds: "
          + ", ".join(f"{x:.1f}" for x in loads) + "\n")
    print("| runtime | prefill 128 (tok/s) best / median | prefill 1024 (tok/s) best / median "
          "| decode b1 (tok/s) best / median |")
    print("|---|---:|---:|---:|")
    for name, d in times.items():
        cells = [f"{n / min(d[k]):.0f} / {n / statistics.median(d[k]):.0f}" for k, n in (("p128", 128), ("p1024", 1024))]
        cells.append(f"{1 / min(d['step']):.1f} / {1 / statistics.median(d['step']):.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
