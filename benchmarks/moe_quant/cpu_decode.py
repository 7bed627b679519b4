"""CPU decode tok/s of one random Qwen3-MoE (2 sparse layers, hidden 1024, 8 experts of
width 2048, top-2; float32 activations, 2 threads) with its routed experts float32
(com.microsoft.MoE), int4 g32 symmetric (com.microsoft.QMoE) and int4 g32 asymmetric (the
routed path, codes gathered before the DequantizeLinear); only the experts are quantized.
Rounds interleaved; the 1-minute load average is printed per round (figures in
benchmarks/moe_quant/RESULTS.md).

    PYTHONPATH=. .venv/bin/python benchmarks/moe_quant/cpu_decode.py
"""
import os, time, json, numpy as np
from pathlib import Path
from tests.conformance import make_tiny_model
from tests.test_moe_quant import compile_quantized
from llmbuild.runtime import load
from llmbuild.runtime.executors.base import StepInputs
root = Path(os.environ.get("MOEQ_BENCH_DIR", "/tmp/moeq-bench"))
hf = root/"hf"
if not (hf/"config.json").exists():
    make_tiny_model("Qwen3MoeForCausalLM", hf, overrides=dict(hidden_size=1024, moe_intermediate_size=2048, num_hidden_layers=2,
                    decoder_sparse_step=1, num_attention_heads=8, num_key_value_heads=4, head_dim=128, intermediate_size=2048))
arts = {"float32 MoE": compile_quantized(hf, root/"f", {"scheme": "none"}),
        "int4 g32 QMoE": compile_quantized(hf, root/"q", {"scheme": "int4", "group_size": 32}, experts_only=True),
        "int4 g32 asym standard": compile_quantized(hf, root/"a", {"scheme": "int4", "group_size": 32, "symmetric": False}, experts_only=True)}
models = {k: load(v, backend="onnxruntime", threads=2) for k, v in arts.items()}
def decode(ex, steps=32):
    ex.reset(1)
    ids = np.array([[5, 9, 200, 31]]); pos = np.arange(4)[None]
    ex.forward(StepInputs(ids, pos, np.zeros(1, np.int64), np.array([[3]])))
    t = time.perf_counter(); tok = 4
    for i in range(steps):
        ex.forward(StepInputs(np.array([[7]]), np.array([[tok]]), np.array([tok]), np.zeros((1, 1), np.int64))); tok += 1
    return steps / (time.perf_counter() - t)
res = {k: [] for k in models}
for r in range(4):
    for k, m in models.items():
        res[k].append(decode(m.executor))
    print("round", r, {k: round(v[-1], 1) for k, v in res.items()}, "load1", os.getloadavg()[0], flush=True)
base = np.median(res["float32 MoE"])
for k, v in res.items(): print(f"{k}: median {np.median(v):.1f} tok/s, {np.median(v)/base:.2f}x float32")
print({k: m.executor.graph_source for k, m in models.items()})
