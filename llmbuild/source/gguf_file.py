"""GGUF file: metadata -> HF config, GGUF tensors -> HF names and layout.

The header (metadata and tensor table) is parsed here with `struct`: `gguf.GGUFReader`
builds numpy views for every token string and takes about 2 s on a 49k-token vocabulary,
while this parser takes a few tens of milliseconds, which keeps `read_config` and
`open_source` fast. Tensor data is decoded with the `gguf` package
(`gguf.quants.dequantize`, `GGML_QUANT_SIZES`), imported only when needed.

Layout differences to HF, undone in `load`:
- GGUF lists dimensions innermost first (ne0 = columns): shape is reversed.
- llama.cpp's converter permutes the rows of q_proj / k_proj of Llama models per head
  from HF's half-split rotary layout to the interleaved one; `unpermute_qk` reverses it
  (the same formula as transformers' `LlamaTensorProcessor._reverse_permute_weights`).
"""

from __future__ import annotations

import mmap
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from llmbuild.errors import UserError
from llmbuild.source import tokenizer as tokexport
from llmbuild.source.base import ByteSpan, ModelSource, TensorInfo, missing_tensor

MAGIC = b"GGUF"

# GGUF metadata value types: id -> struct format (8 = string, 9 = array).
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}

# ggml types kept as stored; everything else is dequantized to float32.
_F32, _F16, _BF16 = 0, 1, 30
_STORED = {_F32: np.dtype(np.float32), _F16: np.dtype(np.float16), _BF16: np.dtype(ml_dtypes.bfloat16)}

# general.architecture -> HF architectures[0]. llama.cpp also writes Mistral models as
# "llama"; they load as LlamaForCausalLM (without sliding window), which is fine.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# GGUF tensor name -> HF parameter name.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Derived tensors with no HF parameter: llama3 rope frequency factors (read into the
# config's rope_scaling instead).
_DERIVED = {"rope_freqs.weight"}
# Architectures whose q/k rows llama.cpp permuted.
_PERMUTED_QK = {"llama", "mistral"}


def hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to its HF name; unknown names pass through unchanged."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return gguf_name


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q_proj/k_proj weight [n_head*D, ...]."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class GGUFTensor:
    gguf_name: str
    ne: tuple[int, ...]  # GGUF order, innermost first
    ggml_type: int
    offset: int  # absolute offset in the file
    nbytes: int


@dataclass
class GGUFHeader:
    version: int
    metadata: dict
    tensors: dict[str, GGUFTensor]  # by GGUF name, file order
    data_start: int


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise UserError(f"{self.path}: truncated GGUF header") from e
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype in _NUMPY:
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        raise UserError(f"{self.path}: unknown GGUF metadata type {vtype}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file, without touching tensor data."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise UserError(f"{path}: not a GGUF file (expected a .gguf model or a Hugging Face model directory)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        cur = _Cursor(buf, path)
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise UserError(f"{path}: GGUF version {version} is not supported (2 and 3 are; "
                            "big-endian files are not)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            ne = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
            infos.append((name, ne, cur.unpack("<I"), cur.unpack("<Q")))
        align = int(metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
        size = len(buf)
    finally:
        buf.close()

    tensors = {}
    for name, ne, ggml_type, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise UserError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}") from None
        n = int(np.prod(ne, dtype=np.int64))
        nbytes = n // block * type_size
        start = data_start + offset
        if ne[0] % block or start + nbytes > size:
            raise UserError(f"{path}: tensor {name!r} does not fit the file (truncated or corrupt GGUF?)")
        tensors[name] = GGUFTensor(name, ne, ggml_type, start, nbytes)
    return GGUFHeader(version, metadata, tensors, data_start)


def config_from_gguf(header: GGUFHeader, path: Path) -> dict:
    """An HF-style config synthesized from GGUF metadata."""
    md = header.metadata
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{path}: GGUF metadata has no general.architecture")

    def get(key, default=None):
        return md.get(f"{arch}.{key}", default)

    def need(key):
        value = get(key)
        if value is None:
            raise UserError(f"{path}: GGUF metadata key {arch}.{key} is missing")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens)
    elif get("vocab_size") is not None:
        vocab = int(get("vocab_size"))
    else:
        vocab = header.tensors["token_embd.weight"].ne[-1] if "token_embd.weight" in header.tensors else None
    tensors = header.tensors
    matrix_types = {t.ggml_type for t in tensors.values() if len(t.ne) == 2}
    dtype = {frozenset({_F16}): "float16", frozenset({_BF16}): "bfloat16"}.get(frozenset(matrix_types), "float32")
    return {
        "architectures": [ARCHITECTURES.get(arch, f"gguf:{arch}")],
        "model_type": arch if arch in ARCHITECTURES else None,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(header, arch, path),
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _rope_scaling(header: GGUFHeader, arch: str, path: Path) -> dict | None:
    md = header.metadata
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor")
    original = md.get(f"{arch}.rope.scaling.original_context_length")
    if kind in ("linear", "yarn") and factor:
        scaling = {"rope_type": kind, "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none"):
        raise UserError(f"{path}: rope scaling type {kind!r} in GGUF metadata is not supported")
    if "rope_freqs.weight" in header.tensors:
        return _llama3_scaling_from_freqs(header, arch, path)
    return None


def _llama3_scaling_from_freqs(header: GGUFHeader, arch: str, path: Path) -> dict:
    """Recover HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor.

    llama.cpp stores the per-frequency divisors that HF computes from (factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings). The
    published Llama 3.x settings are tried and accepted only if they reproduce the
    stored divisors.
    """
    t = header.tensors["rope_freqs.weight"]
    with open(path, "rb") as f:
        f.seek(t.offset)
        stored = np.frombuffer(f.read(t.nbytes), dtype=np.float32)
    md = header.metadata
    theta = float(md.get(f"{arch}.rope.freq_base", 10000.0))
    dim = int(md.get(f"{arch}.rope.dimension_count", 2 * stored.size))
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor = float(stored.max())
    for low, high, original in ((1.0, 4.0, 8192), (1.0, 4.0, 4096)):
        wavelen = 2 * np.pi / inv_freq
        low_wl, high_wl = original / low, original / high
        smooth = (original / wavelen - low) / (high - low)
        divisor = np.where(wavelen > low_wl, factor,
                           np.where(wavelen < high_wl, 1.0, 1.0 / ((1 - smooth) / factor + smooth)))
        if divisor.shape == stored.shape and np.allclose(divisor, stored, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": original}
    raise UserError(f"{path}: rope_freqs.weight does not match any known llama3 rope scaling; "
                    "convert the model from its Hugging Face checkpoint instead")


class GGUFSource(ModelSource):
    format = "gguf"

    def __init__(self, path: Path, header: GGUFHeader | None = None):
        self.path = Path(path)
        self.header = header or read_gguf_header(self.path)
        self.config = config_from_gguf(self.header, self.path)
        self._arch = self.header.metadata["general.architecture"]
        self._by_hf = {hf_name(t.gguf_name): t for t in self.header.tensors.values()
                       if t.gguf_name not in _DERIVED}
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
        if self._arch in _PERMUTED_QK:
            if ".self_attn.q_proj." in name:
                w = unpermute_qk(w, self.config["num_attention_heads"])
            elif ".self_attn.k_proj." in name:
                w = unpermute_qk(w, self.config["num_key_value_heads"])
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
        """Convert the GGUF vocabulary with transformers, as the HF reference does."""
        try:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError as e:
            raise UserError("exporting the tokenizer of a GGUF model needs transformers "
                            "(pip install 'llmbuild[reference]')") from e
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
