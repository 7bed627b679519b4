"""`llmbuild serve` against `transformers serve` (HF's OpenAI-compatible server) on the
default model, SmolLM2-135M-Instruct from the embedded GGUF, side by side in one run.

    python benchmarks/serve/bench_serve.py [--models /tmp/llmbuild-serve-bench] [--levels 1,4,16]
        [--requests-per-client 1] [--min-requests 4] [--max-tokens 32] [--out benchmarks/serve/results.json]
    python benchmarks/serve/bench_serve.py --table [--out ...]      # RESULTS.md table from the JSON

Both servers read the same weights: our artifact is compiled from
recipes/smollm2-135m-instruct.yaml (float16 ONNX, `~engines`: CPU serving); the HF
checkpoint is the same GGUF loaded by transformers (`gguf_file=`), saved with
save_pretrained (float32, tokenizer alike) by benchmarks/runtime/prepare.py's
hf_checkpoint. Each server runs alone on the machine (one at a time, 2 threads),
driven over loopback by the same asyncio client: at each level, C clients each send
`--requests-per-client` streaming chat requests (at least `--min-requests` per level;
greedy, max_tokens) one after the other,
the prompts differ per request and are the same for both servers.

Figures per level: output tokens/s (the answers' tokens, counted with the model's
tokenizer, over the level's wall time), TTFT (request sent to the first chunk with
text) and ITL (time between two chunks with text, as a client sees them) p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "runtime"))

TOPICS = ["a lighthouse", "the moon", "a lost key", "a red bicycle", "winter", "a robot", "the sea", "a garden",
          "a train", "an old map", "a violin", "a small village", "a storm", "a library", "a fox", "a clock"]


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]} (take {i})."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(models: Path) -> tuple[Path, Path]:
    import prepare as runtime_prepare

    from llmbuild.compile import compile_recipe

    models.mkdir(parents=True, exist_ok=True)
    artifact = models / "smollm2-135m-instruct"
    if not (artifact / "manifest.json").exists():
        compile_recipe(ROOT / "recipes" / "smollm2-135m-instruct.yaml", ["~engines"], models, quiet=True,
                       verify=False)
    hf = models / "hf"
    if not (hf / "config.json").exists():
        runtime_prepare.hf_checkpoint(runtime_prepare.smollm2_gguf(), hf)
    return artifact, hf


class Server:
    def __init__(self, name: str, argv: list[str], port: int, model: str, log: Path):
        self.name, self.port, self.model = name, port, model
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{name} was not ready in 600 s; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


async def one_request(http: httpx.AsyncClient, server: Server, messages, max_tokens: int) -> dict:
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    times, text = [], ""
    async with http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices") or []:
                delta = (c.get("delta") or {}).get("content")
                if delta:
                    times.append(time.perf_counter() - t0)
                    text += delta
    return {"text": text, "times": times}


async def level(server: Server, clients: int, per_client: int, max_tokens: int, start: int) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(1200), limits=httpx.Limits(max_connections=64)) as http:
        async def client(c: int):
            return [await one_request(http, server, prompt(start + c * per_client + k), max_tokens)
                    for k in range(per_client)]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    return {"wall": wall, "results": results}


def summarize(run: dict, tokenizer) -> dict:
    results = run["results"]
    tokens = sum(len(tokenizer.encode(r["text"], add_special_tokens=False).ids) for r in results)
    ttft = [r["times"][0] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    chunks = sum(len(r["times"]) for r in results)

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else None
    return {"requests": len(results), "output_tokens": tokens, "chunks": chunks, "wall_s": run["wall"],
            "output_tok_s": tokens / run["wall"], "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99)}


def servers(artifact: Path, hf: Path, threads: int, slots: int, hf_cb: bool):
    """(name, argv builder) of each contender; argv gets the port."""
    bin_dir = Path(sys.executable).parent
    return {
        "llmbuild": (lambda port: [str(bin_dir / "llmbuild"), "serve", str(artifact), "--port", str(port),
                                   "--backend", "onnxruntime", "--threads", str(threads),
                                   "--max-batch-size", str(slots), "--model-name", "smollm2"], "smollm2"),
        "transformers": (lambda port: [str(bin_dir / "transformers"), "serve", str(hf), "--host", "127.0.0.1",
                                       "--port", str(port), "--device", "cpu", "--dtype", "float32",
                                       "--continuous-batching" if hf_cb else "--no-continuous-batching"], str(hf)),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args) -> dict:
    from tokenizers import Tokenizer

    artifact, hf = prepare(Path(args.models))
    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer" / "tokenizer.json"))
    log_dir = Path(args.models) / "logs"
    log_dir.mkdir(exist_ok=True)
    levels = [int(x) for x in args.levels.split(",")]
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "command": " ".join(sys.argv), "max_tokens": args.max_tokens,
           "requests_per_client": args.requests_per_client, "min_requests": args.min_requests,
           "hf_continuous_batching": args.hf_continuous_batching, "servers": {}}
    for name, (argv, model) in servers(artifact, hf, args.threads, max(levels), args.hf_continuous_batching).items():
        if args.only and name not in args.only.split(","):
            continue
        port = free_port()
        server = Server(name, argv(port), port, model, log_dir / f"{name}.log")
        try:
            asyncio.run(level(server, 1, 1, 8, 999))  # warm-up
            res = {"argv": " ".join(argv(port)), "levels": {}}
            for c in levels:
                before = load_average()
                per_client = max(args.requests_per_client, -(-args.min_requests // c))
                summary = summarize(asyncio.run(level(server, c, per_client, args.max_tokens, 100 * c)), tokenizer)
                summary["load_average_before"], summary["load_average_after"] = before, load_average()
                res["levels"][str(c)] = summary
                print(f"{name} c={c}: {summary['output_tok_s']:.1f} tok/s, TTFT p50 {summary['ttft_p50_s']:.3f} s, "
                      f"ITL p50 {summary['itl_p50_s'] and summary['itl_p50_s'] * 1000:.1f} ms "
                      f"(load {before} -> {summary['load_average_after']})", flush=True)
            out["servers"][name] = res
        finally:
            server.stop()
    return out


def table(results: dict) -> str:
    ours, theirs = results["servers"]["llmbuild"], results["servers"].get("transformers")
    rows = ["| clients | server | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | requests | tokens |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for c, a in ours["levels"].items():
        for name, s in (("llmbuild serve", a), ("transformers serve", theirs and theirs["levels"].get(c))):
            if s is None:
                continue
            rows.append(f"| {c} | {name} | {s['output_tok_s']:.1f} | {s['ttft_p50_s']:.3f} / {s['ttft_p99_s']:.3f} | "
                        f"{s['itl_p50_s'] * 1000:.1f} / {s['itl_p99_s'] * 1000:.1f} | {s['requests']} | "
                        f"{s['output_tokens']} |")
    if theirs:
        rows += ["", "| clients | throughput ratio (ours / theirs) | TTFT p50 ratio (theirs / ours) |", "|---:|---:|---:|"]
        for c, a in ours["levels"].items():
            b = theirs["levels"].get(c)
            if b:
                rows.append(f"| {c} | {a['output_tok_s'] / b['output_tok_s']:.2f}× | "
                            f"{b['ttft_p50_s'] / a['ttft_p50_s']:.2f}× |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="/tmp/llmbuild-serve-bench")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="llmbuild,transformers")
    parser.add_argument("--hf-continuous-batching", action="store_true",
                        help="transformers serve --continuous-batching (paged attention; far slower on this CPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "serve" / "results.json"))
    parser.add_argument("--table", action="store_true", help="print the RESULTS.md table of --out")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    results = run(args)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if "llmbuild" in results["servers"]:
        print(table(results))


if __name__ == "__main__":
    main()
