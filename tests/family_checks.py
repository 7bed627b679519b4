"""Checks every architecture family runs on its tiny random models (tests/tiny_configs.py),
against HF transformers (float32 reference), until tests/test_conformance.py covers them:

    fp32 / fp16 logits = HF             decode with cache = recompute
    batched = one by one, greedy = HF   CPU lowering: one GroupQueryAttention per layer,
                                        no fallback WARNING, logits = the standard graph's
    simulated tp=2 = tp=1               int4 RTN / int8 accuracy gates pass
    TensorRT-RTX fp16 engine builds (and keeps the I/O contract)

Each family's test file calls these with its model directory (`make_tiny_hf`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from llmbuild.runtime import load
from llmbuild.runtime.executors.base import StepInputs
from tests.family import decode_in_steps
from tests.tiny import compile_tiny

LIMITS = {"max_batch_size": 4, "max_input_len": 64, "max_seq_len": 128}
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


def hf_reference(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logits(ref, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float().numpy()


def prefill_all(model, ids: list[int]) -> np.ndarray:
    ex = model.executor
    ex.reset(1)
    ar = np.arange(len(ids), dtype=np.int64)[None]
    return ex.forward(StepInputs(np.array([ids]), ar, np.zeros(1, np.int64), ar))[0]


def vocab_of(model_dir: Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def check_logits_match_hf(art: Path, ref, precision: str, *, lowered: bool = False, lengths=(1, 5, 37)) -> float:
    """Max |Δlogit| of the artifact's graph (standard or CPU-lowered) against HF over prompts of `lengths`."""
    model = load(art, backend="onnxruntime", cpu_lowering=lowered)
    assert model.executor.lowered == lowered
    vocab = ref.config.vocab_size
    rng = np.random.default_rng(7)
    worst = 0.0
    for length in lengths:
        ids = rng.integers(5, vocab, length).tolist()
        ours, theirs = prefill_all(model, ids), hf_logits(ref, ids)
        assert ours.shape == theirs.shape == (length, vocab)
        err = float(np.abs(ours - theirs).max())
        assert err < TOLERANCE[precision], f"{precision} len {length}: max |Δ| {err}"
        # the tolerance is small against the logits themselves (else it would hide a wrong model)
        assert np.abs(theirs).max() > 10 * TOLERANCE[precision]
        worst = max(worst, err)
    return worst


def check_decode_equals_recompute(art: Path, vocab: int, *, lowered: bool = False) -> None:
    model = load(art, backend="onnxruntime", cpu_lowering=lowered)
    ids = np.random.default_rng(1).integers(5, vocab, 20).tolist()
    full = prefill_all(model, ids)
    steps = decode_in_steps(model.executor, ids)  # prefill 8, 8 single steps, a chunk of 4
    np.testing.assert_allclose(steps, full[8:], atol=1e-5, rtol=0)


def check_batched_equals_one_by_one_and_hf(art: Path, ref, *, lowered: bool = False, new_tokens: int = 12) -> None:
    model = load(art, backend="onnxruntime", cpu_lowering=lowered)
    vocab = ref.config.vocab_size
    rng = np.random.default_rng(2)
    prompts = [rng.integers(5, vocab, n).tolist() for n in (3, 17, 9, 1)]
    alone = [model.generate_ids([p], max_new_tokens=new_tokens)[0].token_ids for p in prompts]
    batched = [g.token_ids for g in model.generate_ids(prompts, max_new_tokens=new_tokens)]
    assert batched == alone
    assert all(len(t) > 0 for t in alone)
    for p, toks in zip(prompts, alone):  # and the greedy tokens are HF's
        seq = list(p)
        for t in toks:
            assert int(hf_logits(ref, seq)[-1].argmax()) == t
            seq.append(t)


def lowered_ops(art: Path) -> Counter:
    from llmbuild.artifact import read_manifest
    from llmbuild.lowering.cpu import lowered_model_bytes

    graph = read_manifest(art)["graph"]
    model = onnx.load_from_string(lowered_model_bytes(Path(art) / graph["file"]))
    return Counter(n.op_type for n in model.graph.node)


def check_cpu_lowering_applies(art: Path, layers: int, caplog) -> None:
    """Every layer's attention becomes one GroupQueryAttention; no per-layer fallback WARNING."""
    with caplog.at_level(logging.WARNING, logger="llmbuild.cpu_lowering"):
        ops = lowered_ops(art)
    assert ops["GroupQueryAttention"] == layers, ops
    assert ops["Attention"] == 0 and ops["RotaryEmbedding"] == 0, ops
    assert not [r for r in caplog.records if r.name == "llmbuild.cpu_lowering"], caplog.text


def check_lowered_equals_standard(art: Path, vocab: int, atol: float = 1e-4) -> None:
    std = load(art, backend="onnxruntime", cpu_lowering=False)
    low = load(art, backend="onnxruntime", cpu_lowering=True)
    ids = np.random.default_rng(5).integers(5, vocab, 29).tolist()
    a, b = prefill_all(std, ids), prefill_all(low, ids)
    np.testing.assert_allclose(b, a, atol=atol, rtol=0)


def compile_recipe_dict(out: Path, name: str, recipe: dict, *, verify: bool = False) -> Path:
    from llmbuild.compile import compile_recipe

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, "engines": [], "limits": LIMITS, **recipe}))
    return compile_recipe(path, out_dir=out, quiet=True, verify=verify)


def tp_steps(executor, vocab: int) -> list[np.ndarray]:
    """Batched prefill of two right-padded prompts, then three greedy decode steps."""
    prompts = [[1, 40, 71, 72, 83, 14, 90, 33, 7], [1, 55, 56, 9]]
    executor.reset(2)
    s = max(map(len, prompts))
    ids = np.zeros((2, s), np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    pos = np.tile(np.arange(s), (2, 1))
    lengths = np.array([len(p) for p in prompts])
    out = [executor.forward(StepInputs(ids, pos, np.zeros(2, np.int64), np.arange(s)[None].repeat(2, 0)))]
    nxt = out[0][np.arange(2), lengths - 1].argmax(-1)
    for _ in range(3):
        out.append(executor.forward(StepInputs(nxt[:, None], lengths[:, None], lengths.copy(),
                                               np.zeros((2, 1), np.int64))))
        nxt, lengths = out[-1][:, 0].argmax(-1), lengths + 1
    return out


def check_tp2_equals_tp1(model_dir: Path, out: Path, tp1: Path) -> None:
    two = compile_recipe_dict(out, "tp2", {"model": {"source": str(model_dir)}, "precision": "float32",
                                           "parallel": {"tp": 2}})
    vocab = vocab_of(model_dir)
    ref = tp_steps(load(tp1, backend="onnxruntime").executor, vocab)
    sim_model = load(two, backend="onnxruntime")
    assert sim_model.executor.name == "onnxruntime-tp" and sim_model.executor.tp == 2
    got = tp_steps(sim_model.executor, vocab)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    assert np.abs(ref[0]).max() > 0.1


def check_quantized_gate(model_dir: Path, out: Path, weights: dict) -> dict:
    """Compile with weight quantization and the accuracy gate; returns the verification record."""
    from llmbuild.artifact import read_manifest

    label = "-".join(str(v) for v in weights.values())
    art = compile_recipe_dict(out, f"q-{label}", {
        "model": {"source": str(model_dir)}, "precision": "float32",
        "quantization": {"weights": weights, "calibration": {"samples": 4, "seq_len": 64}},
        "verify": {"eval_tokens": 512}}, verify=True)
    v = read_manifest(art)["verification"]
    assert v["kind"] == "accuracy" and v["passed"], v
    ops = {n.op_type for n in onnx.load(str(art / read_manifest(art)["graph"]["file"]),
                                        load_external_data=False).graph.node}
    assert "DequantizeLinear" in ops
    return v


def check_trt_rtx_engine(model_dir: Path, out: Path) -> Path:
    """A TensorRT-RTX fp16 engine builds (CPU-only build) and the manifest records its contract."""
    from llmbuild.artifact import read_manifest

    art = compile_tiny(model_dir, out, name="trt", precision="float16", engines=("tensorrt-rtx",),
                       limits={"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 64})
    m = read_manifest(art)
    engines = m["engines"]
    assert engines, m
    for e in engines if isinstance(engines, list) else engines.values():
        assert (art / e["file"]).stat().st_size > 0
    return art


def safetensors_names(model_dir: Path) -> set[str]:
    """Tensor names of an HF directory's model.safetensors (what the GGUF must give back)."""
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "np") as f:
        return set(f.keys())


def split_names(spec, names: set[str]) -> set[str]:
    """HF checkpoint names as the spec reads them: fused tensors replaced by their blocks."""
    out = set()
    for name in names:
        for fused, parts in spec.fused_tensors.items():
            if f".{fused}." in name:
                out |= {name.replace(f".{fused}.", f".{part}.") for part, _ in parts}
                break
        else:
            out.add(name)
    return out


def split_tensor(spec, config: dict, state: dict, name: str) -> np.ndarray:
    """Tensor `name` (a row block of a fused tensor, or a plain one) from an HF state dict."""
    if name in state:
        return state[name]
    sizes = spec.dims(config).sizes()
    for fused, parts in spec.fused_tensors.items():
        start = 0
        for part, size in parts:
            if f".{part}." in name:
                return state[name.replace(f".{part}.", f".{fused}.")][start:start + sizes[size]]
            start += sizes[size]
    raise KeyError(name)


def tokenizers_with_template(model_dir: Path, template: str, out: Path):
    """(our artifact's tokenizer, HF's AutoTokenizer) of `model_dir` with its chat template
    set to `template` (a real checkpoint's, tests.llama_cpp.template)."""
    from transformers import AutoTokenizer

    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg))
    art = compile_tiny(model_dir, out, limits=LIMITS)
    return load(art, backend="onnxruntime").tokenizer, AutoTokenizer.from_pretrained(model_dir)
