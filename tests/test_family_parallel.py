"""Tensor parallelism (simulated on ONNX Runtime, llmbuild.parallel) on the new families:
tp = 2 gives tp = 1's logits through a batched prefill and decode steps, with windows,
soft-caps, (1 + w) norms and per-head q/k norms replicated on every rank."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_parallel import compile_tp, run_steps
from tests.tiny import make_tiny_from_config
from tests.tiny_configs import TINY_CONFIGS


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_tp2_equals_tp1(arch, tmp_path):
    import llmbuild

    hf = make_tiny_from_config(tmp_path / "hf", arch, TINY_CONFIGS[arch][0])  # 4 heads, 2 KV heads
    runs = {}
    for tp in (1, 2):
        executor = llmbuild.load(compile_tp(hf, tmp_path / "out", f"tp{tp}", tp), backend="onnxruntime").executor
        assert executor.name == ("onnxruntime-tp" if tp == 2 else "onnxruntime")
        runs[tp] = run_steps(executor)
    for a, b in zip(runs[2], runs[1]):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    assert np.abs(runs[1][0]).max() > 0.1
