"""The scale rules and formats of llmbuild.quantize.schemes on SmolLM2-135M-Instruct's real
weights (its Q4_1 GGUF source, dequantized as the build reads it), and greedy agreement
of int8 artifacts with the fp16 one. Prints one JSON object; NOTES.md records the run.

    python benchmarks/quantization/formats.py weights          # RMS error, Q4_1 round trip
    python benchmarks/quantization/formats.py greedy [--work /tmp/llmbuild-formats] [--tokens 64]
    python benchmarks/quantization/formats.py int8-rules [--work /tmp/llmbuild-quant-bench] [--tokens 64]

weights: every linear weight (graph layout [in, out], float32) is quantized at fp16
scales by
  - int4 sym: the old rule (scale max|w|/7, 15 levels), llama.cpp Q4_0's (signed extreme
    / -8, 16 levels, negative scales where the extreme is positive) and the current one
    (positive scale, 16 levels, searched per block: llmbuild.quantize.schemes), at g32 and
    g128: RMS error over all weights;
  - int4 asym g32 (Q4_1's grid): the source *is* Q4_1 on the same blocks of 32 input
    rows, so this must give back its codes and its weights to fp16 rounding: the max
    |Δ| and the share of codes equal, next to the fp16 rounding of the weights themselves.
  - int8 asym g32: d = (max - min)/255 = d_q4/17 on the same blocks, so every Q4_1 code
    u4 must come back as the level 17·u4 (codes equal share) and the weights to fp16
    rounding of d and o (max |Δ|).
int8-rules: int8 g32 symmetric by three scale rules, each written into a copy of the
int8 g32 artifact's graph (codes and scales replaced; WORK/artifacts from run.py, compiled
if missing) and decoded greedily as run.py does (FoldedGraph, 5 chat prompts): "max127"
(the scheme's max|w|/127, Q8_0's rule: must reproduce the int8-g32 row), "signed_extreme"
(the block's signed extreme / -128, codes in [-128, 127], negative scales where the extreme
is positive: what Q4_0 does at 4 bits; ONNX Runtime takes negative scales, TensorRT does
not) and "tight" (its positive-scale form: max(max w / 127, -min w / 128)); RMS error of
each over all linear weights.
greedy: fp16, int8 (per channel), int8 g32 and int8 g32 asym artifacts (no engines), 5 chat prompts,
greedy: the first token where each int8 artifact leaves the fp16 continuation (or -1:
identical), run two ways:
  - "runtime": the CPU runtime (the lowered graph: MatMulNBits at accuracy level 4, i.e.
    int8 *activations* per block inside the kernel, as llama.cpp's Q8_0 dot products);
  - "graph": the standard graph on ONNX Runtime with float matmuls (what the graph says:
    DequantizeLinear → MatMul), with its KV cache (run.graph_greedy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from run import PROMPTS, SOURCE, graph_greedy as cached_graph_greedy  # noqa: E402


def linear_weights():
    from llmbuild.recipe.model_source import resolve_source
    from llmbuild.source import open_source

    src = open_source(resolve_source(SOURCE, ROOT))
    for name in src.names():
        if name.endswith("_proj.weight"):
            yield name, np.asarray(src.load(name), np.float32).T  # HF [out, in] -> graph [in, out]


def reference_int4_rule(w: np.ndarray, group: int, rule: str) -> np.ndarray:
    """int4 sym at fp16 scales by a fixed rule: "old" (scale max|w| / 7, what llmbuild used
    first) or "q4_0" (llama.cpp's: the block's signed extreme / -8). A short last block is
    padded with its last row (neither extreme changes)."""
    rows = w.shape[0]
    wp = np.concatenate([w, np.repeat(w[-1:], -rows % group, axis=0)]) if rows % group else w
    blocks = wp.reshape(-1, group, w.shape[1])
    if rule == "old":
        s = np.abs(blocks).max(axis=1) / 7
    else:
        idx = np.abs(blocks).argmax(axis=1)[:, None, :]
        s = np.take_along_axis(blocks, idx, axis=1)[:, 0, :] / -8
    s = s.astype(np.float16).astype(np.float32)
    s = np.repeat(np.where(s != 0, s, 1), group, axis=0)
    return (np.clip(np.rint(wp / s), -8, 7) * s)[:rows]


def weights_report() -> dict:
    from llmbuild.quantize.schemes import Int4, Int8

    sq = {f"{rule} g{g}": 0.0 for g in (32, 128) for rule in ("old", "q4_0", "new")}
    count, max_diff, max_fp16, codes_equal, codes_total, tensors = 0, 0.0, 0.0, 0, 0, 0
    max_diff8, codes_equal8 = 0.0, 0
    for name, w in linear_weights():
        tensors += 1
        count += w.size
        for g in (32, 128):
            for rule in ("old", "q4_0"):
                sq[f"{rule} g{g}"] += float(np.sum((reference_int4_rule(w, g, rule) - w) ** 2))
            sq[f"new g{g}"] += float(np.sum((Int4(g).quantize(w, np.float16).dequantize() - w) ** 2))
        q8 = Int8(32, symmetric=False).quantize(w, np.float16)
        max_diff8 = max(max_diff8, float(np.abs(q8.dequantize() - w).max()))
        qt = Int4(32, symmetric=False).quantize(w, np.float16)
        max_diff = max(max_diff, float(np.abs(qt.dequantize() - w).max()))
        max_fp16 = max(max_fp16, float(np.abs(w.astype(np.float16).astype(np.float32) - w).max()))
        # the source's codes: Q4_1 puts each block's min at 0 and max at 15 on the grid d·u + m
        blocks = w.reshape(-1, 32, w.shape[1])
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        u = np.rint((blocks - lo) / np.where(hi > lo, (hi - lo) / 15, 1)).reshape(w.shape)
        codes_equal += int(np.sum(u == qt.data.astype(np.int64) + 8))
        codes_equal8 += int(np.sum(17 * u == q8.data.astype(np.int64) + 128))
        codes_total += w.size
        print(f"  {name}: max |Δ| asym g32 {np.abs(qt.dequantize() - w).max():.2e}", file=sys.stderr, flush=True)
    rms = {k: (v / count) ** 0.5 for k, v in sq.items()}
    return {
        "tensors": tensors, "weights": count,
        "int4_sym_rms": rms,
        "int4_sym_rms_ratio_new_over_old": {g: rms[f"new {g}"] / rms[f"old {g}"] for g in ("g32", "g128")},
        "int4_sym_rms_ratio_new_over_q4_0": {g: rms[f"new {g}"] / rms[f"q4_0 {g}"] for g in ("g32", "g128")},
        "q4_1_requantized_asym_g32": {"max_abs_diff": max_diff, "codes_equal_share": codes_equal / codes_total,
                                      "fp16_rounding_of_the_weights_max_abs": max_fp16},
        "q4_1_requantized_int8_asym_g32": {"max_abs_diff": max_diff8, "codes_equal_share": codes_equal8 / codes_total},
    }


def int8_rule(w: np.ndarray, rule: str, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes [in, out] and fp16-rounded scales [G, out] of `w` [in, out] by `rule`
    (rows a multiple of `group`, as SmolLM2's 576 and 1536)."""
    import ml_dtypes

    blocks = w.reshape(-1, group, w.shape[1])
    if rule == "max127":
        s, lo = np.abs(blocks).max(axis=1) / 127, -127
    elif rule == "signed_extreme":
        idx = np.abs(blocks).argmax(axis=1)[:, None, :]
        s, lo = np.take_along_axis(blocks, idx, axis=1)[:, 0, :] / -128, -128
    elif rule == "tight":
        s, lo = np.maximum(blocks.max(axis=1) / 127, -blocks.min(axis=1) / 128), -128
    else:
        raise ValueError(rule)
    s = s.astype(np.float16).astype(np.float32)
    s = np.where(s != 0, s, np.float32(ml_dtypes.finfo(np.float16).tiny))
    q = np.clip(np.rint(w / np.repeat(s, group, axis=0)), lo, 127).astype(np.int8)
    return q, s


def int8_rules_report(work: Path, tokens: int, rules=("max127", "signed_extreme", "tight")) -> dict:
    import onnx_ir as ir

    from llmbuild.eval.runners import artifact_graph
    from run import FoldedGraph, chat_prompts, greedy_row

    fp16 = compile_artifact("fp16", None, work)
    g32 = compile_artifact("int8-g32", {"scheme": "int8", "group_size": 32}, work)
    prompts, eos = chat_prompts(fp16)

    def greedy(path: Path) -> list[list[int]]:
        runner = FoldedGraph(path)
        try:
            return [cached_graph_greedy(runner, p, tokens, eos) for p in prompts]
        finally:
            runner.close()

    reference = greedy(artifact_graph(fp16))
    report = {"tokens": tokens, "int8-g32 artifact": greedy_row(greedy(artifact_graph(g32)), reference)}
    weights = dict(linear_weights())
    for rule in rules:
        model = ir.load(artifact_graph(g32))
        sq, count = 0.0, 0
        for name, w in weights.items():
            q, s = int8_rule(w, rule)
            model.graph.initializers[name].const_value = ir.tensor(q, name=name)
            model.graph.initializers[name + ".scale"].const_value = ir.tensor(s.astype(np.float16), name=name + ".scale")
            sq += float(np.sum((q.astype(np.float32) * np.repeat(s, 32, axis=0) - w) ** 2))
            count += w.size
        dst = work / f"int8-g32-{rule}"
        dst.mkdir(parents=True, exist_ok=True)
        ir.save(model, dst / "model.onnx", external_data="model.onnx.data")
        del model
        report[rule] = greedy_row(greedy(dst / "model.onnx"), reference) | {"rms": (sq / count) ** 0.5}
        print(json.dumps({rule: report[rule]}), file=sys.stderr, flush=True)
    return report


def compile_artifact(name: str, weights: dict | None, work: Path) -> Path:
    from llmbuild.compile import compile_recipe

    out = work / "artifacts"
    art = out / f"smollm2-{name}"
    if (art / "manifest.json").is_file():
        return art
    text = (f"extends: {ROOT / 'recipes' / 'smollm2-135m-instruct.yaml'}\nname: smollm2-{name}\n"
            "engines: []\nverify: {enabled: false}\n")
    if weights is not None:
        text += "quantization:\n  weights: " + json.dumps(weights) + "\n"
    recipe = work / f"{name}.yaml"
    recipe.write_text(text)
    return compile_recipe(recipe, out_dir=out, quiet=True, verify=False)


def greedy_report(work: Path, tokens: int, ways: tuple[str, ...] = ("runtime", "graph")) -> dict:
    from llmbuild.runtime import load

    work.mkdir(parents=True, exist_ok=True)
    arts = {"fp16": compile_artifact("fp16", None, work),
            "int8": compile_artifact("int8", {"scheme": "int8"}, work),
            "int8-g32": compile_artifact("int8-g32", {"scheme": "int8", "group_size": 32}, work),
            "int8-asym-g32": compile_artifact("int8-asym-g32", {"scheme": "int8", "group_size": 32,
                                                                "symmetric": False}, work)}
    report = {"tokens": tokens, "prompts": PROMPTS}
    for way in ways:
        outputs, texts = {}, {}
        for name, art in arts.items():
            with load(art, backend="onnxruntime", threads=2) as model:
                prompts = [model.encode(p, chat=True) for p in PROMPTS]
                if way == "runtime":
                    outputs[name] = [list(g.token_ids) for g in model.generate_ids(prompts, max_new_tokens=tokens)]
                else:
                    outputs[name] = [graph_greedy(art, p, tokens, set(model.eos_token_ids)) for p in prompts]
                texts[name] = [model.tokenizer.decode(ids) for ids in outputs[name]]
        r = {"first_divergence": {}, "identical": {}, "fp16_lengths": [len(x) for x in outputs["fp16"]],
             "first_text": {k: v[0] for k, v in texts.items()}}
        for name in ("int8", "int8-g32", "int8-asym-g32"):
            firsts = []
            for ref, ids in zip(outputs["fp16"], outputs[name]):
                n = min(len(ref), len(ids))
                firsts.append(next((i for i in range(n) if ref[i] != ids[i]), -1 if len(ref) == len(ids) else n))
            r["first_divergence"][name] = firsts
            r["identical"][name] = sum(f == -1 for f in firsts)
        report[way] = r
        print(json.dumps({way: r}), file=sys.stderr, flush=True)
    return report


def graph_greedy(art: Path, prompt: list[int], tokens: int, eos: set[int]) -> list[int]:
    from llmbuild.eval.runners import OrtGraphRunner, artifact_graph

    runner = OrtGraphRunner(artifact_graph(art), threads=2)
    try:
        return cached_graph_greedy(runner, prompt, tokens, eos)
    finally:
        runner.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["weights", "greedy", "int8-rules"])
    ap.add_argument("--work", default="/tmp/llmbuild-formats")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ways", default="runtime,graph", help="greedy: runtime and/or graph (graph is slow)")
    args = ap.parse_args()
    if args.what == "weights":
        report = weights_report()
    elif args.what == "int8-rules":
        report = int8_rules_report(Path(args.work), args.tokens)
    else:
        report = greedy_report(Path(args.work), args.tokens, tuple(args.ways.split(",")))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
