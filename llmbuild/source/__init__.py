"""Model sources: lazy named tensors in HF layout plus an HF-style config.

    cfg = read_config(path)            # fast, reads no tensor data
    with open_source(path) as src:     # HF directory (safetensors) or .gguf file
        for name in src.names():       # HF parameter names
            shape, dtype = src.info(name)
            w = src.load(name)         # numpy array, HF [out, in] layout

Importing this package is cheap: `gguf` is imported when a GGUF file is opened,
transformers only when a GGUF tokenizer is exported.
"""

from __future__ import annotations

from pathlib import Path

from llmbuild.errors import UserError
from llmbuild.source.base import ModelSource, TensorInfo, check_shapes, expected_shapes
from llmbuild.source.config import normalize_config, read_hf_config
from llmbuild.source.gguf_file import MAGIC, GGUFSource, config_from_gguf, read_gguf_header
from llmbuild.source.hf_dir import HFSource

__all__ = [
    "GGUFSource",
    "HFSource",
    "ModelSource",
    "TensorInfo",
    "check_shapes",
    "expected_shapes",
    "normalize_config",
    "open_source",
    "read_config",
]


def _kind(path: Path) -> str:
    """'hf' or 'gguf', or a UserError saying what the path is not."""
    if not path.exists():
        raise UserError(f"model path not found: {path}")
    if path.is_dir():
        return "hf"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    if magic == MAGIC:
        return "gguf"
    raise UserError(f"{path}: not a GGUF file and not a directory; expected a .gguf model "
                    "or a Hugging Face model directory with config.json and *.safetensors")


def read_config(path) -> dict:
    """HF-style config of the model at `path` (see `config.normalize_config`)."""
    path = Path(path).expanduser()
    if _kind(path) == "hf":
        return read_hf_config(path)
    return config_from_gguf(read_gguf_header(path), path)


def open_source(path, *, check: bool = True) -> ModelSource:
    """Open a model for lazy tensor access; `check` validates the standard decoder shapes."""
    path = Path(path).expanduser()
    source = HFSource(path) if _kind(path) == "hf" else GGUFSource(path)
    if check:
        try:
            check_shapes(source)
        except UserError:
            source.close()
            raise
    return source
