"""GGUF file: metadata -> HF config, GGUF tensors -> HF names and layout.

The header is parsed by `gguf_header` (numpy-free, fast); tensor data is decoded with
the `gguf` package (`gguf.quants.dequantize`), imported only when needed.

Layout differences to HF, undone in `load`:
- GGUF lists dimensions innermost first (ne0 = columns): shape is reversed.
- llama.cpp's converter permutes the rows of some linears (Llama's q_proj / k_proj) per
  head from HF's half-split rotary layout to the interleaved one; `unpermute_qk`
  reverses it (the same formula as transformers' `LlamaTensorProcessor._reverse_permute_weights`).

Tensor names and which tensors were permuted come from the architecture's spec
(`ArchitectureSpec.gguf_to_hf`, `gguf_row_permutation`).
"""

from __future__ import annotations

import mmap
import re
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from llmbuild.errors import UserError
from llmbuild.models import SUPPORTED_ARCHITECTURES as SUPPORTED
from llmbuild.source import tokenizer as tokexport
from llmbuild.source.base import ByteSpan, ModelSource, TensorInfo, missing_tensor
from llmbuild.source.gguf_header import _BF16, _F16, _F32, GGUFHeader, GGUFTensor, config_from_gguf, read_gguf_header


# ggml types kept as stored; everything else is dequantized to float32.
_STORED = {_F32: np.dtype(np.float32), _F16: np.dtype(np.float16), _BF16: np.dtype(ml_dtypes.bfloat16)}

def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q_proj/k_proj weight [n_head*D, ...]."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)



class GGUFSource(ModelSource):
    format = "gguf"

    def __init__(self, path: Path, header: GGUFHeader | None = None):
        self.path = Path(path)
        self.header = header or read_gguf_header(self.path)
        self.config = config_from_gguf(self.header, self.path)
        from llmbuild.models import spec_for

        self._spec = spec_for(self.config, check=False) if self.config["architectures"][0] in SUPPORTED else None
        rename = self._spec.gguf_to_hf if self._spec is not None else (lambda n: n)
        derived = self._spec.gguf_derived if self._spec is not None else ()
        self._by_hf = {rename(t.gguf_name): t for t in self.header.tensors.values() if t.gguf_name not in derived}
        self._map: mmap.mmap | None = None

    def names(self) -> list[str]:
        return list(self._by_hf)

    def _tensor(self, name: str) -> GGUFTensor:
        t = self._by_hf.get(name)
        if t is None:
            raise missing_tensor(name, self.path)
        return t

    def info(self, name: str) -> TensorInfo:
        t = self._tensor(name)
        return TensorInfo(tuple(reversed(t.ne)), _STORED.get(t.ggml_type, np.dtype(np.float32)))

    def load(self, name: str) -> np.ndarray:
        t = self._tensor(name)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        raw = np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        shape = tuple(reversed(t.ne))
        if t.ggml_type in _STORED:
            w = raw.view(_STORED[t.ggml_type]).reshape(shape).copy()
        else:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            rows = int(np.prod(shape[:-1], dtype=np.int64))
            w = dequantize(raw.reshape(rows, -1), GGMLQuantizationType(t.ggml_type)).reshape(shape)
            w = np.ascontiguousarray(w, dtype=np.float32)
        heads = self._spec.gguf_row_permutation(name, self.config) if self._spec is not None else None
        if heads is not None:
            w = unpermute_qk(w, heads)
        if self._spec is not None:
            w = self._spec.from_gguf(name, w)  # e.g. Gemma's norms: llama.cpp stores 1 + w
        return w

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def _fingerprint_files(self):
        spans = [ByteSpan(0, self.header.data_start)]
        spans += [ByteSpan(t.offset, t.offset + t.nbytes) for t in self.header.tensors.values()]
        yield self.path.name, self.path, spans

    def export_tokenizer(self, dst_dir: Path) -> dict:
        """Build tokenizer.json from the GGUF vocabulary with `tokenizers` alone
        (`gguf_tokenizer`: the tokenizer transformers' GGUF converter builds); a kind of
        vocabulary it has no builder for is converted by transformers, if installed."""
        from llmbuild.source.gguf_tokenizer import UnsupportedGGUFTokenizer, tokenizer_from_gguf

        dst_dir = Path(dst_dir)
        try:
            tok, tok_config = tokenizer_from_gguf(self.header.metadata)
        except UnsupportedGGUFTokenizer as unsupported:
            return self._export_tokenizer_with_transformers(dst_dir, unsupported)
        except (KeyError, IndexError) as e:
            raise UserError(f"{self.path}: incomplete tokenizer metadata ({e})") from e
        dst_dir.mkdir(parents=True, exist_ok=True)
        tok.save(str(dst_dir / "tokenizer.json"))
        chat_template = self.header.metadata.get("tokenizer.chat_template")
        if chat_template:
            (dst_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        return tokexport.finish_export(dst_dir, tok_config, chat_template, self.config)

    def _export_tokenizer_with_transformers(self, dst_dir: Path, unsupported: UserError) -> dict:
        try:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError as e:
            raise UserError(f"{self.path}: {unsupported}; converting it needs transformers "
                            "(pip install transformers, or 'llmbuild[reference]')") from e
        import json
        import shutil

        dst_dir = Path(dst_dir)
        dst_dir.mkdir(parents=True, exist_ok=True)
        try:
            tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:  # transformers raises many types for unsupported vocabularies
            raise UserError(f"{self.path}: transformers cannot convert this GGUF tokenizer: {e}") from e
        with tempfile.TemporaryDirectory(dir=dst_dir.parent) as tmp:
            tok.save_pretrained(tmp)
            tmp = Path(tmp)
            shutil.copyfile(tmp / "tokenizer.json", dst_dir / "tokenizer.json")
            tok_config = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
        chat_template = tok.chat_template or self.header.metadata.get("tokenizer.chat_template")
        if chat_template:
            (dst_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        return tokexport.finish_export(dst_dir, tok_config, chat_template, self.config)
