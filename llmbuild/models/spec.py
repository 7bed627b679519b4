"""What an architecture is, as data: one `ArchitectureSpec` per HF class, pure Python.

Everything outside `llmbuild/models` that needs to know about a model's tensors asks its
spec — `plan` (parameter and byte counts), the sharder (hints on linears), the quantizer
(linears, roles, scale groups), the GGUF source (tensor names and quirks), the manifest
(dims) — so that no other package spells a tensor name. Importing this module imports
neither numpy nor onnx; the graph code of an architecture (`graph_module`) is imported
only when a graph is built.

    spec = spec_for(config)                 # llmbuild.models: registry by architectures[0]
    dims = spec.dims(config)                # Dims: hidden, heads, kv_heads, head_dim, ...
    spec.tensors(dims)                      # HF name -> HF shape of every tensor the graph reads
    spec.linear_weights(dims)               # HF weight name -> LinearWeight(role, layer, in, out, shard)
    spec.scale_groups                       # which norm / linear feeds which linears (AWQ folding)

A variant states only what differs from its parent (`class MistralSpec(LlamaSpec)`).
The table below is the decoder of Llama; `Linear.module` is the HF module path inside
`model.layers.<i>.`:

    role  module              HF shape [out, in]             tensor parallel
    q     self_attn.q_proj    [heads*head_dim, hidden]       column, whole heads
    k     self_attn.k_proj    [kv_heads*head_dim, hidden]    column, whole KV heads (replicated if tp > kv_heads)
    v     self_attn.v_proj    [kv_heads*head_dim, hidden]    column, whole KV heads (replicated if tp > kv_heads)
    o     self_attn.o_proj    [hidden, heads*head_dim]       row (all-reduce after it)
    gate  mlp.gate_proj       [intermediate, hidden]         column
    up    mlp.up_proj         [intermediate, hidden]         column
    down  mlp.down_proj       [hidden, intermediate]         row (all-reduce after it)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

LAYER_PREFIX = "model.layers."


def layer_index(weight_name: str) -> int | None:
    """The decoder layer of an HF weight name (`model.layers.<i>.…`), or None outside them."""
    if not weight_name.startswith(LAYER_PREFIX):
        return None
    layer = weight_name[len(LAYER_PREFIX):].partition(".")[0]
    return int(layer) if layer.isdigit() else None


# -- sharding hints (llmbuild.parallel applies them) ---------------------------------------
@dataclass(frozen=True)
class Shard:
    """Split weight dimension `dim` (HF layout: 0 = out features, 1 = in features)
    into tp parts made of whole blocks: `count` blocks of `block` rows each (both
    named sizes of the architecture, see `Dims.sizes`; block None = single rows)."""

    dim: int
    count: str
    block: str | None = None
    replicate: bool = False  # count < tp allowed if tp % count == 0 (blocks copied)

    @property
    def row_parallel(self) -> bool:
        """Split on input features: each rank computes a partial sum of the output."""
        return self.dim == 1


COLUMN_HEADS = Shard(dim=0, count="heads", block="head_dim")
COLUMN_KV_HEADS = Shard(dim=0, count="kv_heads", block="head_dim", replicate=True)
ROW_HEADS = Shard(dim=1, count="heads", block="head_dim")
COLUMN_MLP = Shard(dim=0, count="intermediate")
ROW_MLP = Shard(dim=1, count="intermediate")


# -- the tables ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Linear:
    """One linear of a decoder layer. `inputs`/`outputs` are named sizes (`Dims.sizes`)."""

    role: str
    module: str
    inputs: str
    outputs: str
    shard: Shard | None = None
    bias: bool = False


@dataclass(frozen=True)
class ScaleGroup:
    """Linears reading one activation, and where a per-input-channel scale of that
    activation can be folded (AutoAWQ's `get_layers_for_scaling`): into the weight of the
    norm that produces it (`kind="norm"`, `source` = the norm's module) or into the output
    columns of the linear whose product produces it (`kind="linear"`, `source` = a role,
    e.g. up for down_proj's input silu(gate) * up)."""

    name: str
    kind: str  # "norm" | "linear"
    source: str
    linears: tuple[str, ...]  # roles


class LinearWeight(NamedTuple):
    """A linear weight of a concrete model (`ArchitectureSpec.linear_weights`)."""

    role: str
    layer: int | None  # None: outside the decoder layers (lm_head)
    in_features: int
    out_features: int
    shard: Shard | None


@dataclass(frozen=True)
class Dims:
    """The sizes a decoder graph is built from, read from an HF-style config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    tied: bool

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def sizes(self) -> dict[str, int]:
        """Named sizes that `Linear.inputs/outputs` and sharding hints refer to."""
        return {"hidden": self.hidden, "intermediate": self.intermediate, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "vocab": self.vocab,
                "q_width": self.q_width, "kv_width": self.kv_width}


def _positive_int(config: dict, key: str, problems: list[str]) -> int | None:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problems.append(f"{key}={value!r} must be a positive integer")
        return None
    return value


@dataclass(frozen=True)
class TextPart:
    """The text decoder of a multimodal checkpoint, built alone (e.g.
    Gemma3ForConditionalGeneration): its config is `config[config_key]` with the wrapper's
    `architectures`, and its tensors are the ones under `prefixes`, renamed to the text
    class's `model.` names. Tensors under `ignored` (vision tower, projector) are not built;
    any other tensor keeps its name (the graph reads only the spec's tensors, as always)."""

    config_key: str
    prefixes: tuple[tuple[str, str], ...]  # (source prefix, HF text-model prefix), first match wins
    ignored: tuple[str, ...]

    def config(self, config: dict) -> dict:
        text = config.get(self.config_key)
        if not isinstance(text, dict):
            return config  # the config check reports what is missing
        out = {**text, "architectures": config.get("architectures")}
        for key in ("tie_word_embeddings", "dtype", "torch_dtype"):  # the wrapper's word wins
            if key in config:
                out[key] = config[key]
        return out

    def tensor_name(self, name: str) -> str | None:
        """The text model's name of source tensor `name`; None for a part not built."""
        for prefix, to in self.prefixes:
            if name.startswith(prefix):
                return to + name[len(prefix):]
        if name.startswith(self.ignored):
            return None
        return name


class ArchitectureSpec:
    """Base of the per-architecture specs: the Llama decoder, which most models refine.

    Subclasses override class attributes (tables) and, where the config is read
    differently, `dims` / `check_config`. The graph is built by `graph_module.build`.
    """

    hf_class: ClassVar[str] = ""
    graph_module: ClassVar[str] = ""
    # llama.cpp architecture names (`general.architecture`) that load as this class.
    gguf_architectures: ClassVar[tuple[str, ...]] = ()
    # A multimodal class whose text decoder is what gets built (llmbuild.source reads it).
    text_part: ClassVar[TextPart | None] = None

    embed: ClassVar[str] = "model.embed_tokens.weight"
    final_norm: ClassVar[str] = "model.norm.weight"
    lm_head: ClassVar[str] = "lm_head.weight"
    layer_norms: ClassVar[tuple[str, ...]] = ("input_layernorm", "post_attention_layernorm")
    # Per-head q and k RMSNorm modules (weights [head_dim]) before rotary, or ().
    head_norms: ClassVar[tuple[str, ...]] = ()
    # RMSNorm scale = offset + w (Gemma: 1); the norm annotation carries it to weight transforms.
    norm_offset: ClassVar[int] = 0
    linears: ClassVar[tuple[Linear, ...]] = ()
    scale_groups: ClassVar[tuple[ScaleGroup, ...]] = ()
    # GGUF tensor names (llama.cpp) -> HF module names; `gguf_permuted_roles`: linears whose
    # rows llama.cpp permuted from HF's half-split rotary layout to the interleaved one,
    # with the named size of their head count.
    gguf_layer_names: ClassVar[dict[str, str]] = {}
    gguf_global_names: ClassVar[dict[str, str]] = {}
    gguf_permuted_roles: ClassVar[dict[str, str]] = {}
    # llama.cpp's per-frequency rope divisors (llama3 rope scaling; read into the config).
    gguf_rope_freqs: ClassVar[str] = "rope_freqs.weight"
    # Fused HF tensors read as row blocks (llmbuild.source.split): fused module ->
    # ((module, named size), ...) in row order; the linears name the blocks.
    fused_tensors: ClassVar[dict[str, tuple[tuple[str, str], ...]]] = {}
    # Derived GGUF tensors with no HF parameter (read into the config instead).
    gguf_derived: ClassVar[tuple[str, ...]] = (gguf_rope_freqs,)
    # Tensor-parallel: named size -> the HF config key a rank's config overrides.
    config_keys: ClassVar[dict[str, str]] = {
        "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
        "intermediate": "intermediate_size", "head_dim": "head_dim",
    }

    # -- config ----------------------------------------------------------------------------
    def check_config(self, config: dict) -> list[str]:
        """Problems that make this config unbuildable by this architecture's graph."""
        problems: list[str] = []
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            _positive_int(config, key, problems)
        return problems

    def dims(self, config: dict) -> Dims:
        heads = int(config["num_attention_heads"])
        return Dims(
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            vocab=int(config["vocab_size"]),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    def rotary_dim(self, config: dict) -> int:
        """Dims of each head that rotary rotates: head_dim x `partial_rotary_factor` (HF's
        `int(head_dim * factor)`; top level or in rope_parameters), default all of them."""
        head_dim = self.dims(config).head_dim
        factor = config.get("partial_rotary_factor")
        if factor is None:
            factor = (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
        return int(head_dim * float(factor))

    def attention_window(self, config: dict, layer: int) -> int | None:
        """Sliding window of layer `layer`'s attention (HF's `sliding_window`: a token sees
        itself and window - 1 tokens before it), or None for full causal attention."""
        return None

    def manifest_dims(self, config: dict, precision: str) -> dict:
        """The `model` entry of the manifest."""
        d = self.dims(config)
        return {
            "architecture": self.hf_class,
            "precision": precision,
            "num_layers": d.layers,
            "hidden_size": d.hidden,
            "intermediate_size": d.intermediate,
            "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads,
            "head_dim": d.head_dim,
            "vocab_size": d.vocab,
            "tie_word_embeddings": d.tied,
            "max_position_embeddings": config.get("max_position_embeddings"),
            "rope_theta": config.get("rope_theta"),
            "rope_scaling": config.get("rope_scaling"),
        }

    def cpu_attention_fallbacks(self, config: dict) -> dict[int, str]:
        """Layers whose attention the CPU lowering (llmbuild.lowering.cpu) is expected
        to keep as the standard `Attention` (layer -> why, e.g. soft-capped attention), with a
        WARNING at run time. Every other layer must become GroupQueryAttention: the
        conformance suite (tests/test_conformance.py) fails when one does not. Llama: none."""
        return {}

    # -- tensors ---------------------------------------------------------------------------
    @staticmethod
    def layer_prefix(layer: int) -> str:
        return f"{LAYER_PREFIX}{layer}."

    def linear(self, role: str) -> Linear:
        for lin in self.linears:
            if lin.role == role:
                return lin
        raise KeyError(f"{self.hf_class} has no linear with role {role!r}")

    def linear_weight_name(self, layer: int, role: str) -> str:
        return f"{self.layer_prefix(layer)}{self.linear(role).module}.weight"

    def linear_bias_name(self, layer: int, role: str) -> str:
        return f"{self.layer_prefix(layer)}{self.linear(role).module}.bias"

    def linear_weights(self, d: Dims) -> dict[str, LinearWeight]:
        """HF weight name -> LinearWeight for every linear (MatMul) weight of the graph,
        in graph order; an untied lm_head last."""
        sizes = d.sizes()
        out = {}
        for layer in range(d.layers):
            for lin in self.layer_linears(d, layer):
                out[self.linear_weight_name(layer, lin.role)] = LinearWeight(
                    lin.role, layer, sizes[lin.inputs], sizes[lin.outputs], lin.shard)
        if not d.tied:
            out[self.lm_head] = LinearWeight("lm_head", None, d.hidden, d.vocab, None)
        return out

    def layer_linears(self, d: Dims, layer: int) -> tuple[Linear, ...]:
        """The linears of decoder layer `layer` (Llama: every layer has all of `linears`)."""
        return self.linears

    def layer_tensors(self, d: Dims, layer: int) -> dict[str, tuple[int, ...]]:
        """Tensors of layer `layer` beyond its norms and linears (a router, experts), HF shapes."""
        return {}

    def tensors(self, d: Dims) -> dict[str, tuple[int, ...]]:
        """HF parameter name -> HF shape, for every tensor the graph reads."""
        sizes = d.sizes()
        shapes: dict[str, tuple[int, ...]] = {self.embed: (d.vocab, d.hidden), self.final_norm: (d.hidden,)}
        if not d.tied:
            shapes[self.lm_head] = (d.vocab, d.hidden)
        for layer in range(d.layers):
            p = self.layer_prefix(layer)
            for norm in self.layer_norms:
                shapes[f"{p}{norm}.weight"] = (d.hidden,)
            for norm in self.head_norms:
                shapes[f"{p}{norm}.weight"] = (d.head_dim,)
            for lin in self.layer_linears(d, layer):
                shapes[f"{p}{lin.module}.weight"] = (sizes[lin.outputs], sizes[lin.inputs])
                if lin.bias:
                    shapes[f"{p}{lin.module}.bias"] = (sizes[lin.outputs],)
            shapes.update(self.layer_tensors(d, layer))
        return shapes

    def role_of(self, weight_name: str) -> tuple[int | None, str] | None:
        """(layer, role) of a linear weight name (`.weight` or a derived suffix after it),
        or None when the name is not a linear of this architecture."""
        cut = weight_name.find(".weight")
        name = weight_name[: cut + len(".weight")] if cut >= 0 else weight_name
        if name == self.lm_head:
            return None, "lm_head"
        if not name.startswith(LAYER_PREFIX):
            return None
        layer, _, rest = name[len(LAYER_PREFIX):].partition(".")
        if not layer.isdigit():
            return None
        for lin in self.linears:
            if rest == f"{lin.module}.weight":
                return int(layer), lin.role
        return None

    def shard_hints(self, config: dict | None = None) -> dict[str, Shard]:
        """HF weight name suffix (after `model.layers.<i>.`) -> hint; the rest is replicated.
        A column-parallel linear's bias [out] is split with its rows (same hint, dim 0).
        `config`: for hints that depend on it (a mixture of experts' per-expert weights)."""
        hints = {}
        for lin in self.linears:
            if lin.shard is None:
                continue
            hints[f"{lin.module}.weight"] = lin.shard
            if lin.bias:
                # A row-parallel bias would be added once per rank before the all-reduce.
                assert not lin.shard.row_parallel, f"{lin.module}: row-parallel linears with a bias are not sharded"
                hints[f"{lin.module}.bias"] = lin.shard
        return hints

    def parameter_count(self, d: Dims) -> dict[str, int]:
        """`layer_matrices` (what tensor parallelism splits: every layer linear) and
        `replicated` (embeddings, lm_head, norms, biases)."""
        layer = replicated = 0
        linears = {n for n, w in self.linear_weights(d).items() if w.layer is not None}
        for name, shape in self.tensors(d).items():
            n = 1
            for s in shape:
                n *= s
            if name in linears:
                layer += n
            else:
                replicated += n
        return {"layer_matrices": layer, "replicated": replicated}

    # -- GGUF ------------------------------------------------------------------------------
    def gguf_to_hf(self, gguf_name: str) -> str:
        """HF name of a GGUF tensor; unknown names pass through unchanged."""
        base, dot, kind = gguf_name.rpartition(".")
        if not dot:
            return gguf_name
        parts = base.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in self.gguf_layer_names:
            return f"{LAYER_PREFIX}{parts[1]}.{self.gguf_layer_names[parts[2]]}.{kind}"
        if base in self.gguf_global_names:
            return f"{self.gguf_global_names[base]}.{kind}"
        return gguf_name

    def hf_to_gguf(self, hf_name: str) -> str | None:
        """GGUF name of an HF tensor name (the inverse of `gguf_to_hf`), or None if unmapped."""
        base, dot, kind = hf_name.rpartition(".")
        if not dot:
            return None
        layer = layer_index(hf_name)
        if layer is not None:
            module = base[len(self.layer_prefix(layer)):]
            names = [g for g, h in self.gguf_layer_names.items() if h == module]
            return f"blk.{layer}.{names[0]}.{kind}" if names else None
        names = [g for g, h in self.gguf_global_names.items() if h == base]
        return f"{names[0]}.{kind}" if names else None

    def gguf_row_permutation(self, hf_name: str, config: dict) -> int | None:
        """Head count whose rotary row permutation llama.cpp applied to this tensor, or None."""
        found = self.role_of(hf_name)
        if found is None or found[1] not in self.gguf_permuted_roles:
            return None
        return getattr(self.dims(config), self.gguf_permuted_roles[found[1]])

    def gguf_config(self, get, config: dict) -> dict:
        """HF config keys this architecture reads from its GGUF metadata beyond the
        generic ones (`get(key)` reads `<arch>.<key>`); merged into `config`."""
        return {}

    def from_gguf(self, hf_name: str, array):
        """A tensor as llama.cpp stored it -> HF's value (identity unless the converter
        transformed it)."""
        return array

    # -- graph -----------------------------------------------------------------------------
    def build(self, gb, config: dict, source, max_seq_len: int) -> None:
        """Add the decoder graph to `gb` (imports the graph code: numpy, onnx_ir)."""
        module = importlib.import_module(self.graph_module)
        module.build(gb, self, config, source, max_seq_len)

