"""One runtime, one process: prefill and decode figures of a peer on the shared protocol.

    python benchmarks/runtime/peers.py {transformers,llama.cpp,onnxruntime-genai} MODEL [--threads 2]

Protocol (the same as `llmbuild bench`): random token ids of the model's vocabulary
(fixed seeds); prefill = time from the prompt to the logits of its last token, for 128
and 1024 tokens; decode = 64 greedy tokens after a 128-token prompt, each step being one
forward pass plus picking the token; tokens/s = 64 / (time of those steps). Best of
`--repeats` runs after a warm-up. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

VOCAB = 49152
SPECIAL = set(range(0, 17))  # SmolLM2's special tokens


def prompt(n: int, seed: int) -> list[int]:
    ids = np.random.default_rng(seed).integers(0, VOCAB, 2 * n)
    return [int(t) for t in ids if int(t) not in SPECIAL][:n]


def bench_transformers(path: str, threads: int, repeats: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def prefill(ids):
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
        return out

    def decode(ids, n):
        with torch.no_grad():
            out = prefill(ids)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            start = time.perf_counter()
            for _ in range(n):
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            return time.perf_counter() - start

    return run(prefill, decode, repeats) | {"version": f"transformers {transformers.__version__}, torch {torch.__version__}"}


def bench_llama_cpp(path: str, threads: int, repeats: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=1024,
                          n_ubatch=512, verbose=False, logits_all=False)

    def prefill(ids):
        llm.reset()
        llm.eval(ids)

    def decode(ids, n):
        prefill(ids)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(n):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return time.perf_counter() - start

    return run(prefill, decode, repeats) | {"version": f"llama-cpp-python {llama_cpp.__version__}"}


def bench_genai(path: str, threads: int, repeats: int) -> dict:
    import onnxruntime_genai as og

    config = json.load(open(os.path.join(path, "genai_config.json")))
    got = config["model"]["decoder"].get("session_options", {}).get("intra_op_num_threads")
    if got != threads:
        raise SystemExit(f"{path}/genai_config.json sets intra_op_num_threads={got}, not {threads}")
    model = og.Model(path)

    def generator(total):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, do_sample=False)
        return og.Generator(model, params)

    def prefill(ids):
        g = generator(len(ids) + 1)
        g.append_tokens(ids)
        return g

    def decode(ids, n):
        g = generator(len(ids) + n + 1)
        g.append_tokens(ids)
        start = time.perf_counter()
        for _ in range(n):
            g.generate_next_token()
        return time.perf_counter() - start

    return run(prefill, decode, repeats) | {"version": f"onnxruntime-genai {og.__version__}"}


def run(prefill, decode, repeats: int) -> dict:
    prefill(prompt(16, 0))  # warm-up
    out = {}
    for n in (128, 1024):
        times = []
        for r in range(repeats):
            ids = prompt(n, r + 1)
            start = time.perf_counter()
            prefill(ids)
            times.append(time.perf_counter() - start)
        out[f"prefill_{n}_tokens_per_s"] = n / min(times)
    best = min(decode(prompt(128, 100 + r), 64) for r in range(repeats))
    out["decode_batch1_tokens_per_s"] = 64 / best
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


PEERS = {"transformers": bench_transformers, "llama.cpp": bench_llama_cpp, "onnxruntime-genai": bench_genai}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = PEERS[args.peer](args.model, args.threads, args.repeats)
    print(json.dumps({"runtime": args.peer, "model": args.model, "threads": args.threads, **result}))


if __name__ == "__main__":
    main()
