"""`llmbuild bench ARTIFACT`: speed of the runtime on this machine.

    prefill tokens/s     one prompt of 128 and of 1024 tokens (time to its first token)
    decode tokens/s      batch 1 and batch 8: real tokens per second of the decode steps
    time to first token  128-token prompt, batch 1
    inter-token latency  median and p90 between consecutive tokens, batch 1 and batch 8
    python overhead      per decode step, time outside the executor call (batch 1, batch 8)
    padding              tokens computed for no request, in a run of 16 staggered requests
    peak RSS             of this process

Prompts are random token ids (special tokens avoided) and every request generates its
full max_new_tokens (EOS ignored), so figures do not depend on what the model says.
Each figure is the best of `repeats` runs after a warm-up.
"""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

PREFILL_LENGTHS = (128, 1024)


def _prompt(model, n: int, seed: int) -> list[int]:
    vocab = int(model.manifest["model"]["vocab_size"])
    special = set(model.eos_token_ids) | {model.tokenizer.bos_token_id}
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, n * 2)
    return [int(t) for t in ids if int(t) not in special][:n]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _itl(gens) -> list[float]:
    gaps = []
    for g in gens:
        gaps += list(np.diff(g.token_times))
    return gaps


def run_bench(model, *, new_tokens: int = 64, batch: int = 8, repeats: int = 3, progress=None) -> dict:
    """All figures for one loaded model (see the module docstring)."""
    say = progress or (lambda _msg: None)
    engine = model.engine
    seq_len = model.limits.max_seq_len
    results: dict = {"artifact": str(model.path), "executor": model.executor.name,
                     "threads": getattr(model.executor, "threads", None),
                     "cpu_lowering": getattr(model.executor, "lowered", None),
                     # ONNX Runtime executor: whose kernels decode ("llmbuild (...)" or "onnxruntime")
                     "cpu_kernels": getattr(model.executor, "kernels", None),
                     "slots": engine.scheduler.num_slots, "max_num_tokens": engine.scheduler.max_num_tokens,
                     "precision": model.manifest["model"]["precision"], "new_tokens": new_tokens}
    model.generate_ids([_prompt(model, 16, 0)], max_new_tokens=4)  # warm-up: allocations, kernels

    for n in PREFILL_LENGTHS:
        if n + 1 > seq_len:
            results[f"prefill_{n}_tokens_per_s"] = None
            continue
        say(f"prefill {n}")
        best = min(model.submit(_prompt(model, n, r + 1), max_new_tokens=1, ignore_eos=True).result().time_to_first_token
                   for r in range(repeats))
        results[f"prefill_{n}_tokens_per_s"] = n / best
        if n == 128:
            results["ttft_128_s"] = best

    decode_prompt = max(1, min(128, seq_len - new_tokens))
    results["decode_prompt_tokens"] = decode_prompt
    for b in (1, batch):
        if b > engine.scheduler.num_slots:
            results[f"decode_batch{b}_tokens_per_s"] = None
            continue
        say(f"decode batch {b}")
        runs = []
        for r in range(repeats):
            engine.reset_stats()
            handles = [model.submit(_prompt(model, decode_prompt, 100 + 10 * r + i), max_new_tokens=new_tokens,
                                    ignore_eos=True)
                       for i in range(b)]
            gens = [h.result() for h in handles]
            s = engine.stats
            runs.append((s.decode_only_tokens / s.decode_step_seconds, s.overhead_per_decode_step, _itl(gens)))
        tps, overhead, gaps = max(runs, key=lambda x: x[0])
        results[f"decode_batch{b}_tokens_per_s"] = tps
        results[f"python_overhead_ms_batch{b}"] = 1e3 * overhead
        results[f"itl_batch{b}_median_ms"] = 1e3 * statistics.median(gaps)
        results[f"itl_batch{b}_p90_ms"] = 1e3 * _percentile(gaps, 90)

    say("staggered requests")
    engine.reset_stats()
    rng = np.random.default_rng(7)
    handles = []
    longest = max(2, min(400, seq_len - 48))
    for i in range(16):  # arrivals while others decode, prompts of 16..400 tokens
        handles.append(model.submit(_prompt(model, int(rng.integers(min(16, longest - 1), longest)), 200 + i),
                                    max_new_tokens=int(rng.integers(8, 48)), ignore_eos=True))
        time.sleep(float(rng.uniform(0, 0.05)))
    for h in handles:
        h.result()
    s = engine.stats
    results["staggered_padding_fraction"] = s.padding_fraction
    results["staggered_padded_tokens"] = s.padded_tokens
    results["staggered_real_tokens"] = s.prefill_tokens + s.decode_tokens
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


FIGURES = [
    ("prefill_128_tokens_per_s", "prefill, 128-token prompt", "tok/s"),
    ("prefill_1024_tokens_per_s", "prefill, 1024-token prompt", "tok/s"),
    ("decode_batch1_tokens_per_s", "decode, batch 1", "tok/s"),
    ("decode_batch8_tokens_per_s", "decode, batch 8", "tok/s"),
    ("ttft_128_s", "time to first token (128)", "s"),
    ("itl_batch1_median_ms", "inter-token latency b1, median", "ms"),
    ("itl_batch1_p90_ms", "inter-token latency b1, p90", "ms"),
    ("itl_batch8_median_ms", "inter-token latency b8, median", "ms"),
    ("itl_batch8_p90_ms", "inter-token latency b8, p90", "ms"),
    ("python_overhead_ms_batch1", "python overhead/decode step b1", "ms"),
    ("python_overhead_ms_batch8", "python overhead/decode step b8", "ms"),
    ("staggered_padding_fraction", "padding (16 staggered requests)", "fraction"),
    ("peak_rss_mib", "peak RSS", "MiB"),
]


def format_results(r: dict) -> str:
    lines = [f"{r['artifact']}  ({r['executor']}, {r['precision']}, threads {r['threads']}, "
             f"cpu lowering {r['cpu_lowering']}, decode kernels {r.get('cpu_kernels')}, {r['slots']} slots)"]
    for key, label, unit in FIGURES:
        value = r.get(key)
        text = "n/a" if value is None else f"{value:.3f}" if unit in ("s", "fraction") else f"{value:.1f}"
        lines.append(f"  {label:<34} {text:>10} {unit}")
    return "\n".join(lines)
