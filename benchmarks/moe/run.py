"""Routed MoE vs the active-equivalent dense model vs the same MoE computed densely, on the
CPU (ONNX Runtime, batch 1), plus HF transformers on the same weights; side by side in one
run (issue #13).

    python benchmarks/moe/run.py --out benchmarks/moe/RESULTS.md

Models (random weights, float32, made in-process with transformers' config classes, saved
as safetensors into benchmarks/_work/moe/; no hub):

    moe     Qwen3MoeForCausalLM: hidden 1024, 16 heads x 64 (4 KV heads), 8 experts, top-2,
            moe_intermediate 2048, norm_topk_prob; the 1 B design is 18 layers and vocab
            32000 untied (1.02 B total, 0.34 B active per token; `llmbuild plan` figures for
            it come from its config alone, plan_1b below); --layers 18 --vocab 32000 measures
            it; the default, --layers 4 --vocab 8192 (0.23 B total, 0.078 B active), keeps
            the layer shape and needs ~2.5 GB of disk instead of ~10 GB
    dense   Qwen3ForCausalLM, the same but one MLP of intermediate 2 x 2048 = 4096
            -> the MoE's active parameters

The checkpoints are deleted once compiled (disk); the HF side rebuilds the model from the
same config and seed in-process (identical weights: its greedy ids must equal moe-ort's).

Sides (each run is a fresh subprocess, so one model is in memory at a time; the order of
the sides rotates every repetition so load drifts hit every side alike):

    moe-ort          llmbuild's CPU-ready graph of `moe` (model.cpu.onnx: the routed
                     blocks lowered to com.microsoft.MoE) on ONNX Runtime
    dense-ort        llmbuild's CPU-ready graph of `dense`
    moe-dense-ort    the same MoE computed densely: model.cpu.onnx of `moe` with every
                     com.microsoft.MoE node replaced by a graph that computes all E experts
                     on every token (one batched MatMul over the experts) and weights them
                     by the routing weights scattered into [T, E] (zero for the unselected).
                     THIS IS THE BENCHMARK'S REFERENCE CONSTRUCTION (dense_moe_graph below),
                     not product code: llmbuild has no dense-MoE mode.
    moe-hf           HF transformers (torch, float32, same threads) on `moe`'s safetensors:
                     its default Qwen3-MoE experts implementation (records which)

Per run: a 512-token prefill (random ids, one pass; seconds to its logits), then greedy
decode of --tokens tokens at batch 1 (decode tok/s = (tokens - 1) / (time of the last
token - time of the first)). ONNX Runtime sides drive llmbuild's OnnxRuntimeExecutor
directly (the graph llmbuild.load would run, without the scheduler), intra-op threads =
--threads; HF uses torch.set_num_threads(--threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# MOE_BENCH_WORK=/dev/shm/moe-bench puts the checkpoints and artifacts in RAM (the run recorded
# in RESULTS.md did: the shared disk was full)
WORK = Path(os.environ.get("MOE_BENCH_WORK", ROOT / "benchmarks" / "_work" / "moe"))
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 1024, 18, 16, 4, 64, 32000
EXPERTS, TOP_K, MOE_INTER = 8, 2, 2048
PREFILL, SEQ_LEN = 512, 1024
COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=VOCAB, max_position_embeddings=2048,
              tie_word_embeddings=False)
MODELS = {
    "moe": ("Qwen3MoeForCausalLM", dict(COMMON, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                        moe_intermediate_size=MOE_INTER, intermediate_size=TOP_K * MOE_INTER,
                                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    "dense": ("Qwen3ForCausalLM", dict(COMMON, intermediate_size=TOP_K * MOE_INTER)),
}
SIDES = {
    "moe-ort": "routed MoE, llmbuild CPU-ready graph (com.microsoft.MoE), ONNX Runtime",
    "dense-ort": "dense, active-equivalent (intermediate 4096), llmbuild CPU-ready graph, ONNX Runtime",
    "moe-dense-ort": "the MoE computed densely (all 8 experts, benchmark's reference graph), ONNX Runtime",
    "moe-hf": "routed MoE, HF transformers (torch eager), the same weights (rebuilt from the seed)",
}


# ---------------------------------------------------------------- preparation

def hf_config(name: str, layers: int, vocab: int):
    import transformers

    arch, kwargs = MODELS[name]
    return getattr(transformers, arch).config_class(**dict(kwargs, num_hidden_layers=layers, vocab_size=vocab))


def hf_model(name: str, layers: int, vocab: int):
    """The random model `name` (seed 0; the same weights every call)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cls = getattr(transformers, MODELS[name][0])
    return cls(hf_config(name, layers, vocab)).to(torch.float32).eval()


def write_hf(name: str, dst: Path, layers: int, vocab: int, weights: bool = True) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.tiny import write_tiny_tokenizer

    dst.mkdir(parents=True, exist_ok=True)
    if weights:
        hf_model(name, layers, vocab).save_pretrained(dst)
    else:
        config = hf_config(name, layers, vocab)
        config.architectures = [MODELS[name][0]]
        config.save_pretrained(dst)
    write_tiny_tokenizer(dst, vocab, 2048)
    return dst


def recipe(name: str, source: Path, dst: Path) -> Path:
    dst.write_text(json.dumps({
        "name": name, "model": {"source": str(source)}, "precision": "float32",
        "limits": {"max_batch_size": 1, "max_input_len": PREFILL, "max_seq_len": SEQ_LEN}, "engines": []}))
    return dst


def compile_artifact(name: str, layers: int, vocab: int) -> Path:
    """Checkpoint -> artifact (no engines, no verification, no stage cache: disk), then the
    checkpoint's weights are deleted (its config stays, for `plan`)."""
    from llmbuild.compile import compile_recipe

    out = WORK / "artifacts"
    artifact = out / name
    if (artifact / "manifest.json").is_file():
        return artifact
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = write_hf(name, WORK / "hf" / name, layers, vocab)
    compile_recipe(recipe(name, hf_dir, WORK / f"{name}.yaml"), ["~engines"], out, quiet=True, verify=False,
                   cache=False)
    for weights in hf_dir.glob("*.safetensors"):
        weights.unlink()
    return artifact


def dense_moe_graph(artifact: Path) -> Path:
    """The benchmark's reference construction (not product code): `artifact`'s CPU-ready
    graph with each com.microsoft.MoE(x, router_logits, fc1 [E,2I,H] gate/up interleaved,
    -, fc2 [E,H,I]) replaced by

        x ─Reshape [1,T,H]─MatMul(Transpose fc1 [E,H,2I])─► [E,T,2I] ─Reshape [E,T,I,2]─Split─► g, u
        silu(g)·u [E,T,I] ─MatMul(Transpose fc2 [E,I,H])─► [E,T,H]
        logits ─Softmax─TopK(k)─(renormalise)─ScatterElements into zeros [T,E]─Transpose─► w [E,T,1]
        ReduceSum_E(experts · w) [T,H] ─Reshape like x─► y

    i.e. every expert computed on every token, the unselected ones weighted by zero. The
    kernel's "experts" are what the lowering made of them (llmbuild.lowering.moe: each
    expert in S slices of its width, E·S kernel experts, k·S picked, repeated logits): all
    E·S slices computed is all E experts computed, the same bytes and FLOPs.

    The transposed expert weights (the lowering's constant slicing above the MoE node
    evaluated once, with onnx's reference evaluator) are written once, here, as the graph's own initializers
    (model.dense_moe.data), in place of the MoE node's: with Transpose nodes over the
    originals ONNX Runtime's constant folding held the originals, their folded transposes
    and the MatMuls' pre-packed copies at once, and the 1 B model's session was OOM-killed at
    22.6 GB (24 GB machine)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    path = artifact / "model" / "model.dense_moe.onnx"
    if path.is_file():
        return path
    src = artifact / "model" / "model.cpu.onnx"
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    nodes, replaced = [], 0
    inits = {t.name: t for t in graph.initializer}
    data_name = "model.dense_moe.data"
    data = open(path.parent / data_name, "wb")

    def c(name, array):
        graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    producer = {out: node for node in graph.node for out in node.output}

    def constant(name):
        """The value of `name`: an initializer, or what the nodes above it make of initializers
        (the lowering's slicing: Transpose/Mul/Reshape over views of the HF experts),
        evaluated with onnx's reference evaluator."""
        if name in inits:
            return numpy_helper.to_array(inits[name], str(src.parent))
        order, seen = [], set()

        def visit(value):
            if not value or value in inits or value in seen:
                return
            node = producer[value]
            seen.update(node.output)
            if node.op_type == "Shape":  # the lowering's run-time zero, Sub(Shape(x), Shape(x)): any length
                order.append(helper.make_node("Constant", [], list(node.output),
                                              value=numpy_helper.from_array(np.array([1], np.int64))))
                return
            for i in node.input:
                visit(i)
            order.append(node)
        visit(name)
        used = {i for node in order for i in node.input if i in inits}
        sub = helper.make_graph(order, "constant", [], [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
                                [numpy_helper.from_array(constant(i), i) for i in sorted(used)])
        sub_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
        return ReferenceEvaluator(sub_model).run(None, {})[0]

    def transposed(name, new):
        """`name`'s expert weights [E, out, in] as a new external initializer [E, in, out]."""
        array = np.ascontiguousarray(np.swapaxes(constant(name), 1, 2))
        tensor = onnx.TensorProto(name=new, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        offset = data.tell()
        data.write(array.tobytes())
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
        graph.initializer.append(tensor)
        return new

    for node in graph.node:
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, logits, fc1, fc2, y = node.input[0], node.input[1], node.input[2], node.input[4], node.output[0]
        p = f"dense_moe.{replaced}."
        k = int(attrs["k"])
        n = lambda op, ins, outs, **kw: nodes.append(helper.make_node(op, ins, outs, **kw))  # noqa: E731
        n("Reshape", [x, c(p + "s1", np.array([1, -1, HIDDEN], np.int64))], [p + "x"])
        n("MatMul", [p + "x", transposed(fc1, p + "fc1t")], [p + "gu"])
        n("Reshape", [p + "gu", c(p + "s2", np.array([0, 0, -1, 2], np.int64))], [p + "gu4"])  # 0: kept
        n("Split", [p + "gu4"], [p + "g", p + "u"], axis=3, num_outputs=2)
        n("Sigmoid", [p + "g"], [p + "sg"])
        n("Mul", [p + "g", p + "sg"], [p + "silu"])
        n("Mul", [p + "silu", p + "u"], [p + "h4"])
        n("Reshape", [p + "h4", c(p + "s3", np.array([0, 0, -1], np.int64))], [p + "h"])
        n("MatMul", [p + "h", transposed(fc2, p + "fc2t")], [p + "out"])  # [E, T, H]
        n("Softmax", [logits], [p + "prob"], axis=-1)
        n("TopK", [p + "prob", c(p + "k", np.array([k], np.int64))], [p + "top", p + "idx"], axis=-1)
        top = p + "top"
        if attrs.get("normalize_routing_weights", 0):
            n("ReduceSum", [top, c(p + "ax", np.array([-1], np.int64))], [p + "sum"], keepdims=1)
            n("Div", [top, p + "sum"], [p + "topn"])
            top = p + "topn"
        n("Mul", [p + "prob", c(p + "zero", np.array(0, np.float32))], [p + "zeros"])
        n("ScatterElements", [p + "zeros", p + "idx", top], [p + "wte"], axis=1)
        n("Transpose", [p + "wte"], [p + "wet"], perm=[1, 0])
        n("Unsqueeze", [p + "wet", c(p + "ax2", np.array([-1], np.int64))], [p + "w"])
        n("Mul", [p + "out", p + "w"], [p + "weighted"])
        n("ReduceSum", [p + "weighted", c(p + "ax0", np.array([0], np.int64))], [p + "sum_e"], keepdims=0)
        n("Shape", [x], [p + "xshape"])
        n("Reshape", [p + "sum_e", p + "xshape"], [y])
        replaced += 1
    data.close()
    if not replaced:
        sys.exit(f"{src} has no com.microsoft.MoE node to replace")
    live, needed = [], {o.name for o in graph.output}  # the slicing nodes above fc1/fc2 are dead now
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(live))
    kept = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(model, str(path))  # the other initializers keep their external-data references (same folder)
    return path


# ---------------------------------------------------------------- one measured run (a subprocess)

def prompt_ids(vocab: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(0).integers(10, vocab, PREFILL)]


def run_ort(graph: Path, artifact: Path, tokens: int, threads: int, vocab: int) -> dict:
    import numpy as np

    from llmbuild.artifact import read_manifest
    from llmbuild.runtime.executors.base import StepInputs
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    manifest = read_manifest(artifact)
    start = time.perf_counter()
    ex = OnnxRuntimeExecutor(artifact / manifest["graph"]["file"], num_layers=manifest["model"]["num_layers"],
                             cache_len=SEQ_LEN, batch_size=1, threads=threads, cpu_graph=graph)
    load = time.perf_counter() - start
    ids = prompt_ids(vocab)

    def step(tok: list[int], pos: int) -> int:
        s = len(tok)
        logits = ex.forward(StepInputs(np.array([tok], np.int64), np.arange(pos, pos + s, dtype=np.int64)[None],
                                       np.array([pos], np.int64), np.array([[s - 1]], np.int64)))
        return int(logits[0, -1].argmax())

    step(ids[:16], 0)  # warm-up (allocations, kernels), then a fresh cache
    ex.reset(1)
    t0 = time.perf_counter()
    nxt = step(ids, 0)
    prefill = time.perf_counter() - t0
    out, times = [nxt], [time.perf_counter()]
    for i in range(tokens - 1):
        out.append(step([out[-1]], PREFILL + i))
        times.append(time.perf_counter())
    return {"load": load, "prefill": prefill, "decode": (tokens - 1) / (times[-1] - times[0]), "ids": out,
            "graph": graph.name}


def run_hf(layers: int, vocab: int, tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = hf_model("moe", layers, vocab)
    load = time.perf_counter() - start
    impl = getattr(model.config, "_experts_implementation", None) or "default"
    ids = torch.tensor([prompt_ids(vocab)])
    with torch.inference_mode():
        model(ids[:, :16])  # warm-up
        t0 = time.perf_counter()
        res = model(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        past, nxt = res.past_key_values, int(res.logits[0, -1].argmax())
        out, times = [nxt], [time.perf_counter()]
        for _ in range(tokens - 1):
            res = model(torch.tensor([[out[-1]]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            times.append(time.perf_counter())
    return {"load": load, "prefill": prefill, "decode": (tokens - 1) / (times[-1] - times[0]), "ids": out,
            "graph": f"torch eager, experts_implementation={impl}"}


def one_run(side: str, tokens: int, threads: int, layers: int, vocab: int) -> dict:
    moe, dense = WORK / "artifacts" / "moe", WORK / "artifacts" / "dense"
    if side == "moe-ort":
        return run_ort(moe / "model" / "model.cpu.onnx", moe, tokens, threads, vocab)
    if side == "dense-ort":
        return run_ort(dense / "model" / "model.cpu.onnx", dense, tokens, threads, vocab)
    if side == "moe-dense-ort":
        return run_ort(moe / "model" / "model.dense_moe.onnx", moe, tokens, threads, vocab)
    return run_hf(layers, vocab, tokens, threads)


def profile_decode(side: str, threads: int, steps: int = 20) -> str:
    """ONNX Runtime's kernel time per decode step, by operator (batch 1, one token at cache
    position 600, zero cache): is the fused MoE used, and where does the step go."""
    import collections

    import numpy as np
    import onnxruntime as ort

    from llmbuild.runtime.executors.onnxruntime import session_options

    artifact = WORK / "artifacts" / ("dense" if side == "dense-ort" else "moe")
    graph = artifact / "model" / ("model.dense_moe.onnx" if side == "moe-dense-ort" else "model.cpu.onnx")
    opts = session_options(threads, 3)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(WORK / f"profile-{side}")
    session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros((1, i.shape[1], SEQ_LEN, i.shape[3]), np.float32)
             for i in session.get_inputs() if i.name.startswith("past")}
    feeds.update(input_ids=np.array([[5]], np.int64), position_ids=np.array([[600]], np.int64),
                 write_indices=np.array([600], np.int64), logits_indices=np.array([[0]], np.int64))
    for _ in range(steps):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    nodes: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    total = sum(per_op.values())
    lines = [f"{side}, {threads} thread(s), {graph.name}: kernel time per decode step", "| op | nodes | ms | share |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {op} | {nodes[op] // steps} | {us / steps / 1000:.2f} | {100 * us / total:.0f} % |"
              for op, us in per_op.most_common(6)]
    return "\n".join(lines)


# ---------------------------------------------------------------- driver

def plan_1b(name: str) -> Path:
    """A recipe of the 1 B design (config and tokenizer only: `plan` reads no weights)."""
    src = WORK / "plan-1b" / name
    if not (src / "config.json").is_file():
        write_hf(name, src, LAYERS, VOCAB, weights=False)
    return recipe(name, src, WORK / f"plan-1b-{name}.yaml")


def plan_figures(recipe_path: Path) -> dict:
    out = subprocess.run([str(Path(sys.executable).parent / "llmbuild"), "plan", str(recipe_path), "--json"],
                         capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip()[-500:]}
    return json.loads(out.stdout)


def bytes_per_token(plan: dict) -> dict[str, float]:
    """Weight bytes a decoded token reads, per side, from `llmbuild plan` (the embedding
    table is one row per token, left out): the routed MoE's figure is plan's own; the dense
    model and the dense-computed MoE read every weight."""
    def dense(p):
        m = p["model"]
        return p["weight_bytes"] - m["vocab_size"] * m["hidden_size"] * 4  # float32 embedding table
    return {"moe-ort": plan["moe"]["moe"]["bytes_read_per_decoded_token"], "dense-ort": dense(plan["dense"]),
            "moe-dense-ort": dense(plan["moe"]), "moe-hf": plan["moe"]["moe"]["bytes_read_per_decoded_token"]}


def markdown(raw: dict, command: str) -> str:
    """RESULTS.md: the table of medians, the targets, then the raw figures."""
    res, summ = raw["results"], raw["summary"]
    lines = ["| side | what runs | decode tok/s (median) | min - max | prefill 512 s (median) | min - max | runs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for side, runs in res.items():
        dec, pre = [r["decode"] for r in runs], [r["prefill"] for r in runs]
        lines.append(f"| {side} | {SIDES[side]} ({runs[0]['graph']}) | {summ[side]['decode_median']:.2f} | "
                     f"{min(dec):.2f} - {max(dec):.2f} | {summ[side]['prefill_median']:.2f} | "
                     f"{min(pre):.2f} - {max(pre):.2f} | {len(runs)} |")
    ids = {side: {tuple(r["ids"]) for r in runs} for side, runs in res.items()}
    same = [s for s in ("moe-dense-ort", "moe-hf") if s in ids and ids[s] == ids.get("moe-ort")]
    out = ["\n".join(lines), ""]
    if all("error" not in p for p in [*raw["plan"].values(), *raw["plan_1b"].values()]):
        measured, design = bytes_per_token(raw["plan"]), bytes_per_token(raw["plan_1b"])
        out += ["| side | weight bytes read per decoded token (measured model) | (the 1 B design) |",
                "| --- | --- | --- |"]
        out += [f"| {s} | {measured[s] / 1e6:.1f} MB | {design[s] / 1e9:.3f} GB |" for s in res]
        out += [""]
    out += [
           f"Load average (1 min) over the run: {min(raw['loadavg']):.1f} - {max(raw['loadavg']):.1f} "
           f"(2 cores; what else ran is said beside the run). Greedy ids of moe-ort equal those of: "
           f"{', '.join(same) or 'none'} (every run).", ""]
    if {"moe-ort", "dense-ort", "moe-dense-ort"} <= set(summ):
        m, d, x = summ["moe-ort"], summ["dense-ort"], summ["moe-dense-ort"]
        checks = [
            ("MoE decode >= 0.7 x active-equivalent dense", m["decode_median"] / d["decode_median"], 0.7),
            ("MoE decode >= 2.5 x dense-computed MoE", m["decode_median"] / x["decode_median"], 2.5),
            ("prefill 512 no slower than the dense-computed MoE (time ratio dense-computed / MoE >= 1)",
             x["prefill_median"] / m["prefill_median"], 1.0),
        ]
        out += ["| target | measured ratio (medians) | met |", "| --- | --- | --- |"]
        out += [f"| {name} | {ratio:.2f} | {'met' if ratio >= bar else 'NOT met'} |" for name, ratio, bar in checks]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per run")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the sides (order rotates)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the measured models")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary of the measured models")
    parser.add_argument("--side", choices=list(SIDES), action="append", help="default: all")
    parser.add_argument("--out", type=Path, help="also write the raw results (JSON) to this file")
    parser.add_argument("--render", type=Path, help="print the markdown tables of a raw JSON file and exit")
    parser.add_argument("--profile", choices=[s for s in SIDES if s != "moe-hf"],
                        help="print ONNX Runtime's per-operator decode-step profile of a side and exit")
    parser.add_argument("--one", choices=list(SIDES), help=argparse.SUPPRESS)  # internal: a measured run
    args = parser.parse_args()
    if args.render:
        print(markdown(json.loads(args.render.read_text()), ""))
        return
    if args.profile:
        print(profile_decode(args.profile, args.threads))
        return
    if args.one:
        print(json.dumps(one_run(args.one, args.tokens, args.threads, args.layers, args.vocab)))
        return

    for name in MODELS:
        compile_artifact(name, args.layers, args.vocab)
    dense_moe_graph(WORK / "artifacts" / "moe")
    sides = args.side or list(SIDES)
    results: dict[str, list[dict]] = {s: [] for s in sides}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        shift = r % len(sides)
        for side in sides[shift:] + sides[:shift]:
            cmd = [sys.executable, __file__, "--one", side, "--tokens", str(args.tokens), "--threads",
                   str(args.threads), "--layers", str(args.layers), "--vocab", str(args.vocab)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["loadavg"] = os.getloadavg()[0]
            loads.append(res["loadavg"])
            results[side].append(res)
            print(f"rep {r} {side}: prefill {res['prefill']:.2f} s, decode {res['decode']:.2f} tok/s, "
                  f"load avg {res['loadavg']:.1f}", flush=True)
    summary = {s: {"decode_median": statistics.median(x["decode"] for x in v),
                   "prefill_median": statistics.median(x["prefill"] for x in v)} for s, v in results.items()}
    raw = {"args": {k: str(v) for k, v in vars(args).items()}, "loadavg": loads, "results": results,
           "summary": summary, "plan": {n: plan_figures(WORK / f"{n}.yaml") for n in MODELS},
           "plan_1b": {n: plan_figures(plan_1b(n)) for n in MODELS}}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
