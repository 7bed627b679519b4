"""Checks shared by the per-family tests (tests/test_family_<name>.py) until the
conformance suite runs every registered architecture: one tiny random model per entry of
tests.tiny_configs.TINY_CONFIGS, compiled here and compared with HF transformers.

    models = build_family(tmp_path_factory, "Gemma2ForCausalLM")   # [Tiny, ...] (module fixture)
    check_logits(tiny, lowered=True)                                 # every prompt length
    check_greedy_past_window(tiny, lowered=False)                    # prompt + 64 > window
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmbuild.runtime import load
from llmbuild.runtime.executors.base import StepInputs
from tests.tiny import compile_tiny, make_tiny_from_config
from tests.tiny_configs import TINY_CONFIGS

LIMITS = {"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 128}
PROMPT = [5, 40, 41, 42, 77, 12, 90, 33, 61, 7, 88, 21]  # 12 tokens: longer than every tiny window
NEW_TOKENS = 64


@dataclass
class Tiny:
    arch: str
    index: int
    config: dict
    hf_dir: Path
    artifacts: dict  # precision -> artifact dir
    ref: object  # HF model, float32

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.index}"

    def window(self) -> int | None:
        return self.config.get("sliding_window")


def build_family(tmp_path_factory, arch: str, precisions=("float32", "float16")) -> list[Tiny]:
    import torch
    from transformers import AutoModelForCausalLM

    out = []
    for i, kwargs in enumerate(TINY_CONFIGS[arch]):
        root = tmp_path_factory.mktemp(f"{arch}-{i}")
        hf = make_tiny_from_config(root / "hf", arch, kwargs, seed=i)
        arts = {p: compile_tiny(hf, root / p, name=f"tiny-{p}", precision=p, limits=LIMITS) for p in precisions}
        ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        out.append(Tiny(arch, i, json.loads((hf / "config.json").read_text()), hf, arts, ref))
    return out


def hf_logits(ref, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(ref, prompt: list[int], new_tokens: int) -> list[int]:
    """HF's own KV-cached greedy loop, exactly `new_tokens` tokens (no EOS stop)."""
    import torch

    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                           pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prefill_all(model, ids: list[int]) -> np.ndarray:
    ex = model.executor
    ex.reset(1)
    ar = np.arange(len(ids), dtype=np.int64)[None]
    return ex.forward(StepInputs(np.array([ids]), ar, np.zeros(1, np.int64), ar))[0]


def open_model(tiny: Tiny, precision: str, *, lowered: bool, caplog=None):
    if caplog is not None:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            model = load(tiny.artifacts[precision], backend="onnxruntime", threads=2, cpu_lowering=lowered)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text  # no fallback
    else:
        model = load(tiny.artifacts[precision], backend="onnxruntime", threads=2, cpu_lowering=lowered)
    assert model.executor.lowered == lowered
    return model


def check_logits(tiny: Tiny, precision: str, *, lowered: bool, atol: float, caplog=None) -> None:
    """Teacher-forced logits of one pass equal HF's at lengths below and beyond the window."""
    model = open_model(tiny, precision, lowered=lowered, caplog=caplog)
    try:
        rng = np.random.default_rng(7)
        for length in (1, 5, 30):
            ids = rng.integers(5, 256, length).tolist()
            ours, theirs = prefill_all(model, ids), hf_logits(tiny.ref, ids)
            assert ours.shape == theirs.shape
            err = np.abs(ours - theirs).max()
            assert err < atol, f"{tiny.name} {precision} lowered={lowered} len {length}: max |Δ| {err}"
            assert np.abs(theirs).max() > 10 * atol  # the tolerance is small against the logits
    finally:
        model.close()


def check_greedy_past_window(tiny: Tiny, *, lowered: bool) -> list[int]:
    """Greedy prompt + 64 new tokens (past the window) equal HF's token for token."""
    window = tiny.window()
    assert window is not None and len(PROMPT) + NEW_TOKENS > 4 * window
    want = hf_greedy(tiny.ref, PROMPT, NEW_TOKENS)
    model = open_model(tiny, "float32", lowered=lowered)
    try:
        got = model.submit(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).result().token_ids
    finally:
        model.close()
    assert list(got) == want, f"{tiny.name} lowered={lowered}"
    assert len(set(want)) > 3  # not a degenerate repetition of one token
    return want


def decode_in_steps(ex, ids: list[int]) -> np.ndarray:
    """Logits of positions 8..19 of `ids` (20 ids) from a fresh cache: prefill 8, decode
    8 one at a time, then a chunk of 4 (what a full pass must equal)."""
    ex.reset(1)
    ex.forward(StepInputs(np.array([ids[:8]]), np.arange(8)[None], np.zeros(1, np.int64), np.array([[7]])))
    steps = []
    for pos in range(8, 16):
        out = ex.forward(StepInputs(np.array([[ids[pos]]]), np.array([[pos]]), np.array([pos]), np.array([[0]])))
        steps.append(out[0, 0])
    out = ex.forward(StepInputs(np.array([ids[16:20]]), np.arange(16, 20)[None], np.array([16]), np.arange(4)[None]))
    return np.stack(steps + list(out[0]))


def check_decode_equals_recompute(tiny: Tiny, *, lowered: bool) -> None:
    """Prefill 8, decode one by one, then a chunk of 4: the logits of one pass over all."""
    model = open_model(tiny, "float32", lowered=lowered)
    try:
        ids = np.random.default_rng(1).integers(5, 256, 20).tolist()
        full = prefill_all(model, ids)
        steps = decode_in_steps(model.executor, ids)
        np.testing.assert_allclose(steps, full[8:], atol=1e-4, rtol=0)
    finally:
        model.close()


def check_batched_equals_one_by_one(tiny: Tiny, *, lowered: bool) -> None:
    model = open_model(tiny, "float32", lowered=lowered)
    try:
        rng = np.random.default_rng(2)
        prompts = [rng.integers(5, 256, n).tolist() for n in (3, 17, 9, 1)]
        alone = [model.submit(p, max_new_tokens=14, ignore_eos=True).result().token_ids for p in prompts]
        handles = [model.submit(p, max_new_tokens=14, ignore_eos=True) for p in prompts]
        assert [h.result().token_ids for h in handles] == alone
    finally:
        model.close()


def lowered_attention(tiny: Tiny, precision: str, tmp_path: Path) -> list[dict]:
    """Attributes of each GroupQueryAttention of the lowered graph, and the standard
    Attention nodes left (none when every layer lowered)."""
    import onnx

    from llmbuild.lowering.cpu import save_lowered_graph

    graph = onnx.load(str(save_lowered_graph(tiny.artifacts[precision], tmp_path / "lowered")),
                      load_external_data=False)
    assert not [n for n in graph.graph.node if n.op_type == "Attention"]
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            for n in graph.graph.node if n.op_type == "GroupQueryAttention"]


def check_engine_builds(tiny: Tiny, tmp_path: Path) -> dict:
    """A TensorRT-RTX float16 engine builds from the family's graph; its manifest entry."""
    import pytest

    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    art = compile_tiny(tiny.hf_dir, tmp_path, name="engine", precision="float16", engines=("tensorrt-rtx",),
                       limits=LIMITS)
    (entry,) = json.loads((art / "manifest.json").read_text())["engines"]
    assert (art / entry["file"]).stat().st_size == entry["bytes"] > 0
    return entry


def check_tensorrt_graph_logits(tiny: Tiny, tmp_path: Path, *, atol: float = 1e-4) -> list[dict]:
    """The graph TensorRT parses (cache_len pinned, soft-capped attention decomposed by
    llmbuild.engine.decompose) computes HF's logits, on ONNX Runtime; its records."""
    import onnx

    from llmbuild.engine.build import _pinned_model_bytes
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    src = tiny.artifacts["float32"] / "model" / "model.onnx"
    records: list[dict] = []
    model = onnx.load_model_from_string(_pinned_model_bytes(src, LIMITS["max_seq_len"], records))
    onnx.load_external_data_for_model(model, str(src.parent))
    dst = tmp_path / "trt-graph.onnx"
    onnx.save(model, str(dst))
    ex = OnnxRuntimeExecutor(dst, num_layers=tiny.config["num_hidden_layers"], cache_len=LIMITS["max_seq_len"],
                             batch_size=1, threads=2, cpu_lowering=False)
    ids = np.random.default_rng(5).integers(5, 256, 30).tolist()
    ex.reset(1)
    ar = np.arange(len(ids))[None]
    ours = ex.forward(StepInputs(np.array([ids]), ar, np.zeros(1, np.int64), ar))[0]
    np.testing.assert_allclose(ours, hf_logits(tiny.ref, ids), atol=atol, rtol=0)
    # and decoding with the cache (the causal mask of a one-token pass at an offset)
    ex.reset(1)
    ex.forward(StepInputs(np.array([ids[:20]]), ar[:, :20], np.zeros(1, np.int64), np.array([[19]])))
    steps = [ex.forward(StepInputs(np.array([[ids[p]]]), np.array([[p]]), np.array([p]), np.zeros((1, 1), np.int64)))[0, 0]
             for p in range(20, 30)]
    np.testing.assert_allclose(np.stack(steps), ours[20:], atol=atol, rtol=0)
    return records
