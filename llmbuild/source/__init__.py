"""Model sources: lazy named tensors in HF layout plus an HF-style config.

    cfg = read_config(path)            # fast, reads no tensor data
    with open_source(path) as src:     # HF directory (safetensors) or .gguf file
        for name in src.names():       # HF parameter names
            shape, dtype = src.info(name)
            w = src.load(name)         # numpy array, HF [out, in] layout

Importing this package is cheap: `gguf` is imported when a GGUF file is opened;
a GGUF's tokenizer is built with `tokenizers` alone (`gguf_tokenizer`), transformers
only for a vocabulary kind that module has no builder for.
"""

from __future__ import annotations

from pathlib import Path

from llmbuild.errors import UserError
from llmbuild.source.config import normalize_config, read_hf_config
from llmbuild.source.gguf_header import MAGIC, config_from_gguf, read_gguf_header

# numpy-backed classes, imported on first use so `read_config` (recipe validation)
# does not pay for numpy.
_LAZY = {
    "ModelSource": "llmbuild.source.base",
    "TensorInfo": "llmbuild.source.base",
    "GGUFSource": "llmbuild.source.gguf_file",
    "HFSource": "llmbuild.source.hf_dir",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "GGUFSource",
    "HFSource",
    "ModelSource",
    "TensorInfo",
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
    return config_from_gguf(read_gguf_header(path, arrays=False), path)


def open_source(path, *, check: bool = True):
    """Open a model (a `ModelSource`) for lazy tensor access; `check` validates the
    tensors the architecture reads (llmbuild.models.shapes)."""
    from llmbuild.models.shapes import check_shapes
    from llmbuild.source.gguf_file import GGUFSource
    from llmbuild.source.hf_dir import HFSource

    from llmbuild.source.checks import config_problems

    path = Path(path).expanduser()
    source = HFSource(path) if _kind(path) == "hf" else GGUFSource(path)
    problems = config_problems(source.config)
    if problems:
        source.close()
        raise UserError(f"{path}: the model config cannot be built: " + "; ".join(problems))
    source = _split_fused(source)
    if check:
        try:
            check_shapes(source)
        except UserError:
            source.close()
            raise
    return source


def _split_fused(source):
    """The source as its architecture's spec reads it: fused tensors (Phi-3's qkv_proj,
    gate_up_proj) served as their row blocks, a GGUF file's stacked experts per expert
    (llmbuild.source.split)."""
    from llmbuild.models import SUPPORTED_ARCHITECTURES, spec_for

    archs = source.config.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        return source
    spec = spec_for(source.config, check=False)
    from llmbuild.source.split import SplitSource, StackedExpertsSource

    if getattr(spec, "experts", None) is not None and source.format == "gguf":
        source = StackedExpertsSource(source, spec)  # llama.cpp's *_exps tensors, per expert
    if not spec.fused_tensors:
        return source
    return SplitSource(source, spec)
