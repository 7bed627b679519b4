"""GGUF header: metadata and tensor table parsed with `struct`, and the HF-style config
synthesized from it. Free of numpy and the `gguf` package (both imported only where
tensor data or quantized sizes are needed), so `read_config` stays fast.

`gguf.GGUFReader` builds numpy views for every token string and takes about 2 s on a
49k-token vocabulary; with `arrays=False` this parser skips the vocabulary and merges
and reads SmolLM2's header in a few milliseconds.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from llmbuild.errors import UserError

MAGIC = b"GGUF"

# GGUF metadata value types: id -> struct format (8 = string, 9 = array).
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_F32, _F16, _BF16 = 0, 1, 30
# general.architecture -> HF architectures[0] for llama.cpp architectures no registered
# spec claims (llmbuild.models.gguf_architectures), so that refusals name the HF class.
# llama.cpp also writes Mistral models as "llama"; they load as LlamaForCausalLM (Mixtral's,
# `llama` with `llama.expert_count`, as MixtralForCausalLM: config_from_gguf).
UNREGISTERED_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def hf_architecture(gguf_arch: str) -> str | None:
    from llmbuild.models import gguf_architectures

    return gguf_architectures().get(gguf_arch) or UNREGISTERED_ARCHITECTURES.get(gguf_arch)


def _registered_spec(hf_class: str | None):
    """The architecture spec of `hf_class`, None when no spec is registered for it."""
    from llmbuild.models import ARCHITECTURES, architecture_spec

    return architecture_spec(hf_class) if hf_class in ARCHITECTURES else None


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


class SkippedArray(list):
    """Placeholder for a metadata array not decoded (`read_gguf_header(..., arrays=False)`):
    only its length is known, which is all a config needs (e.g. the vocabulary size)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __len__(self) -> int:
        return self.n


_U64 = struct.Struct("<Q").unpack_from


def _skip_strings(buf, pos: int, n: int) -> int:
    """Offset after n length-prefixed strings (the hot loop of `read_config` on GGUF)."""
    unpack = _U64
    for _ in range(n):
        pos += 8 + unpack(buf, pos)[0]
    return pos


class _Cursor:
    def __init__(self, buf, path: Path, arrays: bool = True):
        self.buf, self.pos, self.path, self.arrays = buf, 0, path, arrays

    def unpack(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise UserError(f"{self.path}: truncated GGUF header") from e
        self.pos += struct.calcsize(fmt)
        return value

    def count(self, what: str, item_bytes: int = 1) -> int:
        """A length or count field; more items than bytes left is a lying header."""
        n = self.unpack("<Q")
        if n * item_bytes > len(self.buf) - self.pos:
            raise UserError(f"{self.path}: GGUF {what} {n} at byte {self.pos - 8} runs past the end of the file "
                            "(corrupt or truncated GGUF)")
        return n

    def string(self) -> str:
        n = self.count("string length")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack("<I")
            n = self.count("array length", struct.calcsize(_SCALAR[etype]) if etype in _SCALAR else 8)
            if not self.arrays and etype in _SCALAR:
                self.pos += n * struct.calcsize(_SCALAR[etype])
                return SkippedArray(n)
            if not self.arrays and etype == _STRING:
                self.pos = _skip_strings(self.buf, self.pos, n)
                return SkippedArray(n)
            if etype in _SCALAR:
                fmt = f"<{n}{_SCALAR[etype][1:]}"
                values = list(struct.unpack_from(fmt, self.buf, self.pos))
                self.pos += struct.calcsize(fmt)
                return values
            return [self.value(etype) for _ in range(n)]
        raise UserError(f"{self.path}: unknown GGUF metadata type {vtype}")


# (block size, bytes per block) of the unquantized ggml types, enough for `read_config`.
_PLAIN_SIZES = {_F32: (1, 4), _F16: (1, 2), _BF16: (1, 2)}


def read_gguf_header(path: Path, *, arrays: bool = True) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file, without touching tensor data.

    `arrays=False` skips decoding metadata arrays (the vocabulary, merges) and the
    quantized tensors' sizes: enough for a config, in a fraction of the time.
    """
    if arrays:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise UserError(f"{path}: not a GGUF file (expected a .gguf model or a Hugging Face model directory)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        cur = _Cursor(buf, path, arrays)
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise UserError(f"{path}: GGUF version {version} is not supported (2 and 3 are; "
                            "big-endian files are not)")
        n_tensors, n_kv = cur.count("tensor count"), cur.count("metadata count")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > 8:
                raise UserError(f"{path}: tensor {name!r} has {n_dims} dimensions (corrupt GGUF?)")
            ne = tuple(cur.unpack("<Q") for _ in range(n_dims))
            infos.append((name, ne, cur.unpack("<I"), cur.unpack("<Q")))
        align = metadata.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or not 0 < align <= 1 << 20 or align & (align - 1):
            raise UserError(f"{path}: general.alignment {align!r} is not a power of two (corrupt GGUF?)")
        data_start = -(-cur.pos // align) * align
        size = len(buf)
    except (struct.error, OverflowError, MemoryError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: corrupt or truncated GGUF header ({type(e).__name__}: {e})") from None
    finally:
        buf.close()

    tensors = {}
    for name, ne, ggml_type, offset in infos:
        if not arrays:
            block, type_size = _PLAIN_SIZES.get(ggml_type, (1, 0))
            n = 1
            for d in ne:
                n *= d
            tensors[name] = GGUFTensor(name, ne, ggml_type, data_start + offset, n // block * type_size)
            continue
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise UserError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}") from None
        n = 1
        for d in ne:
            n *= d
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

    hf_class = hf_architecture(arch)
    if arch == "llama" and get("expert_count"):  # llama.cpp writes Mixtral as `llama` with experts
        hf_class = "MixtralForCausalLM"
    # Tensor names come from the architecture's spec (llmbuild.models); for a GGUF
    # architecture without one the config only names what is refused, and what the
    # tensor table would tell is left unknown (None).
    spec = _registered_spec(hf_class)
    tensors = header.tensors

    def gguf_tensor(hf_name: str) -> str | None:
        return spec.hf_to_gguf(hf_name) if spec is not None else None

    embed = gguf_tensor(spec.embed) if spec is not None else None
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens)
    elif get("vocab_size") is not None:
        vocab = int(get("vocab_size"))
    else:
        vocab = tensors[embed].ne[-1] if embed in tensors else None
    matrix_types = {t.ggml_type for t in tensors.values() if len(t.ne) == 2}
    dtype = {frozenset({_F16}): "float16", frozenset({_BF16}): "bfloat16"}.get(frozenset(matrix_types), "float32")
    head_dim = int(get("attention.key_length", hidden // heads))
    extra = {}
    rope_dims = get("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:  # partial rotary (Phi-4-mini)
        extra["partial_rotary_factor"] = int(rope_dims) / head_dim
    window = get("attention.sliding_window")
    if window:  # llama.cpp writes 0 for "no window" (Phi-4)
        extra["sliding_window"] = int(window)
    config = {
        **extra,
        "architectures": [hf_class or f"gguf:{arch}"],
        "model_type": arch if hf_class else None,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(header, arch, path, spec),
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": gguf_tensor(spec.lm_head) not in tensors if spec is not None else None,
        "hidden_act": "silu",
        "attention_bias": _has_bias(spec, "q", tensors) if spec is not None else None,
        "mlp_bias": False,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if hf_class is not None and hf_class in _registered():
        from llmbuild.models import architecture_spec

        config.update(architecture_spec(hf_class).gguf_config(get, config))
    return config


def _registered() -> tuple[str, ...]:
    from llmbuild.models import SUPPORTED_ARCHITECTURES

    return SUPPORTED_ARCHITECTURES


def _has_bias(spec, role: str, tensors) -> bool:
    """Whether layer 0's linear `role` has a bias tensor in the GGUF file."""
    try:
        weight = spec.linear_weight_name(0, role)
    except KeyError:
        return False
    return spec.hf_to_gguf(weight.removesuffix("weight") + "bias") in tensors


def _rope_scaling(header: GGUFHeader, arch: str, path: Path, spec) -> dict | None:
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
    if "rope_factors_long.weight" in header.tensors and "rope_factors_short.weight" in header.tensors:
        return _longrope_from_factors(header, arch, path)
    if spec is not None and spec.gguf_rope_freqs in header.tensors:
        return _llama3_scaling_from_freqs(header, arch, path, spec.gguf_rope_freqs)
    return None


def _llama3_scaling_from_freqs(header: GGUFHeader, arch: str, path: Path, name: str) -> dict:
    """Recover HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor.

    llama.cpp stores the per-frequency divisors that HF computes from (factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings). The
    published Llama 3.x settings are tried and accepted only if they reproduce the
    stored divisors.
    """
    import numpy as np

    t = header.tensors[name]
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
    raise UserError(f"{path}: {name} does not match any known llama3 rope scaling; "
                    "convert the model from its Hugging Face checkpoint instead")




def _longrope_from_factors(header: GGUFHeader, arch: str, path: Path) -> dict:
    """HF's longrope rope_scaling from llama.cpp's Phi-3 tensors `rope_factors_{long,short}`
    (the per-dimension divisors, float32) and its original context length / attention factor."""
    import numpy as np

    md = header.metadata
    factors = {}
    with open(path, "rb") as f:
        for kind in ("long", "short"):
            t = header.tensors[f"rope_factors_{kind}.weight"]
            f.seek(t.offset)
            factors[kind] = np.frombuffer(f.read(t.nbytes), dtype=np.float32).astype(float).tolist()
    original = md.get(f"{arch}.rope.scaling.original_context_length")
    if not original:
        raise UserError(f"{path}: rope_factors tensors without {arch}.rope.scaling.original_context_length")
    scaling = {"rope_type": "longrope", "long_factor": factors["long"], "short_factor": factors["short"],
               "original_max_position_embeddings": int(original)}
    attn = md.get(f"{arch}.rope.scaling.attn_factor")
    if attn is not None:
        scaling["attention_factor"] = float(attn)
    return scaling
