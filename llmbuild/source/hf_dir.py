"""Hugging Face model directory: config.json + model.safetensors (single or sharded).

The safetensors headers are parsed here (8-byte little-endian length, then JSON), and
each tensor is read from a memory map of its byte range. `safetensors.safe_open` with
numpy cannot return bfloat16; reading the bytes ourselves works for every dtype,
including bf16 as `ml_dtypes.bfloat16`, and touches only the tensor asked for.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from llmbuild.errors import UserError
from llmbuild.models import text_part_of
from llmbuild.source import tokenizer as tokexport
from llmbuild.source.base import ByteSpan, ModelSource, TensorInfo, missing_tensor, whole_file
from llmbuild.source.config import read_hf_config, read_json

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Small files that define the tokenizer; copied on export and part of the fingerprint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(path: Path) -> tuple[dict[str, _Entry], int]:
    """Tensor table of one .safetensors file and the offset where its data begins."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            (n,) = struct.unpack("<Q", raw_len) if len(raw_len) == 8 else (None,)
            if n is None or n > min(size - 8, _MAX_HEADER):
                raise UserError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path}: not a safetensors file (header is not JSON)") from e
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is a JSON {type(header).__name__}, "
                        "expected an object of tensors)")
    base = 8 + n
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _header_entry(path, name, meta)
        begin, end = base + begin, base + end
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > size:
            raise UserError(f"{path}: tensor {name!r} byte range does not match its shape {list(shape)} "
                            f"and dtype {meta['dtype']} (truncated or corrupt file?)")
        entries[name] = _Entry(path, dtype, shape, begin, end)
    _check_no_overlap(path, entries)
    return entries, base


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _header_entry(path: Path, name: str, meta) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
    """dtype, shape and relative (begin, end) of one header entry, or a UserError saying
    which field lies."""
    if not isinstance(meta, dict):
        raise UserError(f"{path}: tensor {name!r}: expected a header entry {{dtype, shape, data_offsets}}, "
                        f"found {type(meta).__name__}")
    dtype = SAFETENSORS_DTYPES.get(meta.get("dtype")) if isinstance(meta.get("dtype"), str) else None
    if dtype is None:
        raise UserError(f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape) or len(shape) > 8:
        raise UserError(f"{path}: tensor {name!r}: shape must be a list of non-negative integers, found {shape!r:.60}")
    offsets = meta.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise UserError(f"{path}: tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                        f"found {offsets!r:.60}")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _check_no_overlap(path: Path, entries: dict[str, "_Entry"]) -> None:
    """Two names over one byte range (or overlapping ranges) are a lying header: the
    same bytes would be loaded as two different weights."""
    spans = sorted((e.start, e.end, name) for name, e in entries.items() if e.end > e.start)
    for (a_start, a_end, a), (b_start, b_end, b) in zip(spans, spans[1:]):
        if b_start < a_end:
            what = "the same bytes" if (a_start, a_end) == (b_start, b_end) else "overlapping bytes"
            raise UserError(f"{path}: tensors {a!r} and {b!r} occupy {what} ({a_start}..{a_end} and "
                            f"{b_start}..{b_end}); a safetensors file stores every tensor in its own range")


def weight_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a model dir, and the index's name -> file map if sharded."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: no 'weight_map'")
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise UserError(f"{index} lists shard(s) that do not exist: {', '.join(absent)}")
        return files, weight_map
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single], None
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    hint = f" (found {', '.join(found)} but no {INDEX_FILE})" if found else ""
    if not found and any(model_dir.glob("*.bin")):
        hint = " (only PyTorch .bin weights; re-save the model with safetensors)"
    raise UserError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


class HFSource(ModelSource):
    format = "hf-safetensors"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = read_hf_config(self.path)
        self._files, weight_map = weight_files(self.path)
        self._entries: dict[str, _Entry] = {}
        self._data_start: dict[Path, int] = {}
        for file in self._files:
            entries, base = read_safetensors_header(file)
            self._data_start[file] = base
            self._entries.update(entries)
        if weight_map is not None:
            for name, fname in weight_map.items():
                entry = self._entries.get(name)
                if entry is None or entry.file.name != fname:
                    raise UserError(f"{self.path / INDEX_FILE} maps {name!r} to {fname}, "
                                    "but that file does not contain it")
        part = text_part_of(self.config)
        if part is not None:  # a multimodal checkpoint: its text decoder's tensors, renamed
            self._entries = {new: e for name, e in self._entries.items()
                             if (new := part.tensor_name(name)) is not None}
        self._maps: dict[Path, mmap.mmap] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            where = self.path / INDEX_FILE if len(self._files) > 1 else self._files[0]
            raise missing_tensor(name, where)
        return entry

    def info(self, name: str) -> TensorInfo:
        e = self._entry(name)
        return TensorInfo(e.shape, e.dtype)

    def load(self, name: str) -> np.ndarray:
        e = self._entry(name)
        mm = self._maps.get(e.file)
        if mm is None:
            with open(e.file, "rb") as f:
                mm = self._maps[e.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        count = (e.end - e.start) // e.dtype.itemsize
        view = np.frombuffer(mm, dtype=e.dtype, count=count, offset=e.start)
        return view.reshape(e.shape).copy()

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()

    def _fingerprint_files(self):
        for file in self._files:
            spans = [ByteSpan(0, self._data_start[file])]
            spans += [ByteSpan(e.start, e.end) for e in self._entries.values() if e.file == file]
            yield file.name, file, spans
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                yield name, self.path / name, [whole_file(self.path / name)]

    def export_tokenizer(self, dst_dir: Path) -> dict:
        src = self.path / "tokenizer.json"
        if not src.is_file():
            raise UserError(f"{self.path}: no tokenizer.json; the runtimes need a fast-tokenizer "
                            "tokenizer.json (save it with transformers' AutoTokenizer.save_pretrained)")
        dst_dir = Path(dst_dir)
        dst_dir.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, dst_dir / name)
        tok_config = {}
        if (self.path / "tokenizer_config.json").is_file():
            tok_config = read_json(self.path / "tokenizer_config.json")
        special_map = {}
        if (self.path / "special_tokens_map.json").is_file():
            special_map = read_json(self.path / "special_tokens_map.json")
        for key in tokexport.SPECIAL_TOKEN_KEYS:
            if key not in tok_config and key in special_map:
                tok_config[key] = special_map[key]
        chat_template = tokexport.pick_chat_template(tok_config.get("chat_template"))
        jinja = self.path / "chat_template.jinja"
        if chat_template is None and jinja.is_file():
            chat_template = jinja.read_text(encoding="utf-8")
        return tokexport.finish_export(dst_dir, tok_config, chat_template, self.config)
