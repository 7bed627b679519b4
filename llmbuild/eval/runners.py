"""Things that give full-sequence logits for a token chunk: an artifact's or a bare
ONNX graph on ONNX Runtime (CPU), or HF transformers (torch) from a checkpoint dir or
GGUF file. `open_runner(path)` picks by what `path` is."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from llmbuild.errors import UserError
from llmbuild.graph import io

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def float_matmuls(opts) -> None:
    """Keep ONNX Runtime's DequantizeLinear → MatMul fusion (MatMulNBits) computing in
    float32: its default (accuracy level 4) quantizes the activations to int8 on the fly,
    which is faster but not what the graph says. Accuracy figures measure the graph."""
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")


class OrtGraphRunner:
    """The decoder graph on ONNX Runtime, one sequence at a time from an empty cache."""

    kind = "onnxruntime"

    def __init__(self, model_path: Path, threads: int | None = None, *, model_bytes: bytes | None = None):
        """`model_bytes`: a serialized graph whose external weights are relative to
        `model_path` (a folder), e.g. the merged rank graphs of a tensor-parallel artifact."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        float_matmuls(opts)
        self.path = Path(model_path)
        source: str | bytes = str(model_path)
        if model_bytes is not None:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path))
            source = model_bytes
        self.session = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
        self.caches = [i for i in self.session.get_inputs()
                       if i.name.rpartition("/")[2].startswith(("past_key", "past_value"))]
        for c in self.caches:
            if c.type not in _NP:
                raise UserError(f"{model_path}: ONNX Runtime (CPU) cannot run a {c.type} KV cache; "
                                "evaluate a float32 or float16 artifact")

    def logits(self, ids: np.ndarray) -> np.ndarray:
        s = len(ids)
        pos = np.arange(s, dtype=np.int64)[None]
        feeds = {io.INPUT_IDS: np.asarray(ids, np.int64)[None], io.POSITION_IDS: pos,
                 io.WRITE_INDICES: np.zeros(1, np.int64), io.LOGITS_INDICES: pos}
        for c in self.caches:
            feeds[c.name] = np.zeros((1, int(c.shape[1]), s, int(c.shape[3])), _NP[c.type])
        return self.session.run([io.LOGITS], feeds)[0][0]

    def close(self) -> None:
        self.session = None


class TorchRunner:
    """HF transformers (float32, CPU) from a checkpoint directory or GGUF file."""

    kind = "transformers"

    def __init__(self, path: Path):
        from llmbuild.verify.reference import load_reference

        self.path = Path(path)
        self.model = load_reference(path)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        from llmbuild.verify.reference import reference_logits

        return reference_logits(self.model, [int(i) for i in ids])

    def close(self) -> None:
        self.model = None


def artifact_graph(path: Path) -> Path | None:
    """The ONNX graph of an artifact directory, or None if `path` is not an artifact."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    return Path(path) / m["graph"]["file"]


def artifact_runner(path: Path, threads: int | None = None) -> OrtGraphRunner:
    """The graph of an artifact on ONNX Runtime: the model's graph, or for a tensor-parallel
    artifact all rank graphs merged, each all-reduce point a Sum (llmbuild.parallel.simulate)."""
    m = json.loads((Path(path) / "manifest.json").read_text())
    ranks = m["graph"].get("ranks")
    if not ranks:
        return OrtGraphRunner(Path(path) / m["graph"]["file"], threads)
    from llmbuild.parallel.simulate import merged_model

    return OrtGraphRunner(Path(path), threads, model_bytes=merged_model(Path(path), ranks).SerializeToString())


def open_runner(path: str | Path, threads: int | None = None):
    """An artifact dir, a model.onnx, an HF checkpoint dir or a .gguf file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist (expected an artifact directory, an .onnx graph, an HF checkpoint"
                        " directory or a .gguf file)")
    if path.is_dir() and artifact_graph(path) is not None:
        return artifact_runner(path, threads)
    if path.suffix == ".onnx":
        return OrtGraphRunner(path, threads)
    if (path.is_dir() and (path / "config.json").is_file()) or path.suffix == ".gguf":
        return TorchRunner(path)
    raise UserError(f"{path}: not an artifact (no manifest.json), an .onnx graph, an HF checkpoint (no config.json)"
                    " or a .gguf file")
