"""The typed recipe schema (pydantic v2).

Strict: values are not coerced (`"512"` is not an integer, `1` is not `true`), and
unknown keys are errors at every level. Cross-field rules raise `PydanticCustomError`s
whose `type` is listed in `messages.RELOCATE` so the problem points at the right key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_serializer,
                      model_validator)
from pydantic_core import PydanticCustomError

PRECISIONS = ("float32", "float16", "bfloat16")
# The engine backends a recipe may name (see llmbuild.engine). `[]` = ONNX artifact only.
ENGINE_BACKENDS = ("tensorrt-rtx", "tensorrt")
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"

Precision = Literal["float32", "float16", "bfloat16"]
EngineBackend = Literal["tensorrt-rtx", "tensorrt"]
assert Precision.__args__ == PRECISIONS and EngineBackend.__args__ == ENGINE_BACKENDS

PositiveInt = Annotated[int, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSpec(_Section):
    # Path to an HF checkpoint dir or a .gguf file, relative to the recipe file that
    # sets it, or `package:<module>/<file>` inside an installed Python package.
    source: str


# Upper bounds no runtime can allocate past (a KV cache of 4096 slots x 2**20 tokens of
# even a tiny model is terabytes); checked at validate, before any work.
MAX_BATCH_SIZE = 4096
MAX_TOKENS = 1 << 20
# An artifact directory is <name> and, while it is written, .<name>.partial-<pid>:
# both must fit the filesystem's 255-byte file name limit.
MAX_NAME_LENGTH = 200


class Limits(_Section):
    max_batch_size: Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE)] = 4
    max_input_len: Annotated[int, Field(gt=0, le=MAX_TOKENS)] = 512
    max_seq_len: Annotated[int, Field(gt=0, le=MAX_TOKENS)] = 2048
    # Tokens of one forward pass (all sequences together); null = max_batch_size x
    # max_input_len. Bounds the prefill optimization profile (llmbuild.engine.profiles).
    max_num_tokens: PositiveInt | None = None

    # A field validator (not a model validator) so that it runs even when another
    # limit is invalid; it sees max_input_len in `info.data` only if that one is valid.
    @field_validator("max_seq_len")
    @classmethod
    def _input_fits_sequence(cls, max_seq_len: int, info: ValidationInfo) -> int:
        max_input_len = info.data.get("max_input_len")
        if max_input_len is not None and max_input_len > max_seq_len:
            raise PydanticCustomError(
                "input_longer_than_sequence",
                "max_input_len {max_input_len} is larger than max_seq_len {max_seq_len};"
                " expected max_input_len <= max_seq_len",
                {"max_input_len": max_input_len, "max_seq_len": max_seq_len},
            )
        return max_seq_len

    @field_validator("max_num_tokens")
    @classmethod
    def _tokens_fit_one_pass(cls, max_num_tokens: int | None, info: ValidationInfo) -> int | None:
        need = [(info.data.get(k), k) for k in ("max_input_len", "max_batch_size")]
        need = [(v, k) for v, k in need if v is not None]
        if max_num_tokens is not None and need and max_num_tokens < max(need)[0]:
            value, key = max(need)
            why = "a whole prompt" if key == "max_input_len" else "a decode step of every sequence"
            raise PydanticCustomError(
                "too_few_tokens",
                "max_num_tokens {found} is smaller than {key} {value}; expected at least {value}"
                " ({why} must fit one forward pass)",
                {"found": max_num_tokens, "key": key, "value": value, "why": why},
            )
        return max_num_tokens


class EngineEntry(_Section):
    """One engine to build. `engines: [tensorrt-rtx]` is short for
    `engines: [{backend: tensorrt-rtx}]`. Which backend offers which setting, and why,
    is in llmbuild.engine.options; a setting the backend lacks is a recipe problem."""

    backend: EngineBackend
    # tensorrt-rtx: GPUs to compile for (sm75 sm80 sm86 sm89 sm120 sm121, or current);
    # null = one portable engine for sm80, sm86, sm89, sm120 and later.
    compute_capabilities: Annotated[list[str], Field(min_length=1)] | None = None
    # tensorrt: null/none = the build GPU only; ampere+ = any Ampere or later GPU.
    hardware_compatibility: Literal["none", "ampere+", "same-compute-capability"] | None = None
    optimization_level: Annotated[int, Field(ge=0, le=5)] | None = None  # null = backend default (3)
    workspace_limit_mib: PositiveInt | None = None  # null = the GPU's memory
    tiling_optimization_level: Literal["none", "fast", "moderate", "full"] | None = None  # tensorrt
    l2_limit_for_tiling_kib: PositiveInt | None = None  # tensorrt
    strongly_typed: bool = True  # false: tensorrt 10.x only (weakly typed network)
    # Keep weights in host memory and stream them to the GPU (TensorRT WEIGHT_STREAMING);
    # budget = MiB of weights kept on the GPU, null = TensorRT's automatic budget at load.
    weight_streaming: bool = False
    weight_streaming_budget_mib: PositiveInt | None = None

    @field_validator(
        "hardware_compatibility", "optimization_level", "workspace_limit_mib", "tiling_optimization_level",
        "l2_limit_for_tiling_kib", "strongly_typed",
    )
    @classmethod
    def _offered_by_backend(cls, value, info: ValidationInfo):
        from llmbuild.engine.options import backend_option_problem

        backend = info.data.get("backend")
        problem = backend_option_problem(backend, info.field_name, value) if backend else None
        if problem:
            raise PydanticCustomError("backend_option", problem)
        return value

    @field_validator("compute_capabilities")
    @classmethod
    def _rtx_targets(cls, values: list[str] | None, info: ValidationInfo):
        from llmbuild.engine.options import (
            backend_option_problem,
            compute_capability_problem,
            normalize_compute_capabilities,
        )

        backend = info.data.get("backend")
        if values is None or backend is None:
            return values
        problem = backend_option_problem(backend, "compute_capabilities", values)
        if problem:
            raise PydanticCustomError("backend_option", problem)
        values = normalize_compute_capabilities(values)
        for i, value in enumerate(values):
            problem = compute_capability_problem(value, values)
            if problem is None and value in values[:i]:
                problem = f"compute capability {value} is listed twice (first at [{values.index(value)}])"
            if problem:
                raise PydanticCustomError("compute_capability", problem, {"index": i})
        return values

    @field_validator("weight_streaming")
    @classmethod
    def _streaming_needs_strong_types(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("strongly_typed") is False:
            raise PydanticCustomError(
                "engine_option", "weight_streaming needs a strongly typed network; remove strongly_typed: false"
            )
        return value

    @field_validator("weight_streaming_budget_mib")
    @classmethod
    def _budget_needs_streaming(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("weight_streaming") is False:
            raise PydanticCustomError(
                "engine_option", "weight_streaming_budget_mib is set but weight_streaming is false; expected"
                " weight_streaming: true"
            )
        return value

    def options(self) -> dict[str, Any]:
        """The settings besides `backend` (llmbuild.engine.build_engine's `options`)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k != "backend"}

    @property
    def label(self) -> str:
        """The engine's target as in its file name: portable, sm86-sm89, native, ampere-plus."""
        from llmbuild.engine.options import target_label

        return target_label(self.backend, self.options())


# `matrix:` keys are override paths (`precision`, `limits.max_seq_len`); values are a
# list of scalars (labelled by their value) or a mapping label -> value; checked by
# llmbuild.recipe.axes.axis_problem.
MatrixValues = Any


class Parallel(_Section):
    # Tensor parallelism: every layer split over `tp` GPUs, one engine per rank
    # (llmbuild.parallel). `tp` must divide the attention heads and the MLP size, and
    # divide the KV heads or be a multiple of them (KV heads are then replicated).
    tp: PositiveInt = 1


class Runtime(_Section):
    # What the artifact carries for its runtimes. cpu_graph: also write the graph lowered
    # for ONNX Runtime's CPU kernels (model/model.cpu.onnx: fused attention, float32
    # compute, quantized weights packed once for MatMulNBits), which the Python and C++
    # runtimes load as is instead of lowering the standard graph at every load.
    cpu_graph: bool = True


class Verify(_Section):
    # null = the per-precision default of the verify stage.
    max_abs_logit_diff: Annotated[float, Field(gt=0)] | None = None
    min_top1_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    min_greedy_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    prompts: Annotated[list[str], Field(min_length=1)] | None = None
    enabled: bool = True
    # Accuracy gate of a quantized artifact against the unquantized graph, on held-out
    # text (llmbuild.quantize.stage.quality_gate). min_top1_agreement above applies to it
    # too. max_perplexity_increase is relative: 0.05 = at most 5 % above the reference.
    max_perplexity_increase: Annotated[float, Field(ge=0)] | None = None
    max_kl_divergence: Annotated[float, Field(ge=0)] | None = None  # nats per token
    eval_dataset: str | None = None  # null = the bundled corpus's evaluation split
    eval_tokens: PositiveInt | None = None  # null = 4096

    @field_validator("eval_dataset")
    @classmethod
    def _known_eval_dataset(cls, value: str | None) -> str | None:
        return _check_dataset(value)


# -- quantization (llmbuild.quantize) -----------------------------------------------------

QuantScheme = Literal["int8", "int4", "fp8", "none"]
QuantAlgorithm = Literal["rtn", "awq", "gptq"]
GroupSize = Literal[32, 64, 128]
ScaleBits = Literal[8, 16]  # int4: 8 = scales (+ offsets) as 8-bit codes per block; 16 = the graph dtype


def _check_dataset(value: str | None) -> str | None:
    from llmbuild.eval.corpus import dataset_problem

    problem = dataset_problem(value) if value is not None else None
    if problem:
        raise PydanticCustomError("quantization", problem)
    return value


def _int4_only(field: str, value, scheme: str | None, schemes: tuple[str, ...] = ("int4",)):
    """awq / gptq exist for int4 only; group_size and symmetric for int4 and int8."""
    if scheme is not None and scheme not in schemes:
        raise PydanticCustomError(
            "quantization", "{field} {value} applies to scheme {schemes} only; the scheme here is {scheme}",
            {"field": field, "value": repr(value), "scheme": scheme, "schemes": " and ".join(schemes)},
        )
    return value


BLOCKED = ("int4", "int8")  # the schemes that take group_size and symmetric: false


def _without_unset_scale_bits(data: dict) -> dict:
    """The resolved recipe leaves out an unset `scale_bits`, so recipes written before it
    existed keep their content hash (engine cache keys)."""
    if isinstance(data, dict) and data.get("scale_bits") is None:
        data.pop("scale_bits", None)
    return data


def _no_gptq_coded_scales(algorithm, scale_bits) -> None:
    """GPTQ fixes each block's scale as it goes; 8-bit scale codes need a column's scales first."""
    if algorithm == "gptq" and scale_bits == 8:
        raise PydanticCustomError(
            "quantization", "scale_bits 8 does not apply to algorithm gptq (GPTQ fixes each block's scale as it"
            " quantizes, before a column's 8-bit scale step is known); use rtn or awq, or scale_bits 16")


class QuantWeights(_Section):
    scheme: QuantScheme
    algorithm: QuantAlgorithm = "rtn"
    # blocks along the input dim: int4 (null = 128), int8 (null = one scale per output channel)
    group_size: GroupSize | None = None
    symmetric: bool = True  # int4, int8 blocks: false = a scale + float offset per block (Q4_1's)
    scale_bits: ScaleBits | None = None  # int4: 8 = the block scales (+ offsets) as 8-bit codes

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return _without_unset_scale_bits(handler(self))

    @field_validator("algorithm")
    @classmethod
    def _algorithm_for_int4(cls, value: str, info: ValidationInfo) -> str:
        return value if value == "rtn" else _int4_only("algorithm", value, info.data.get("scheme"))

    @field_validator("group_size")
    @classmethod
    def _group_for_int4(cls, value, info: ValidationInfo):
        return value if value is None else _int4_only("group_size", value, info.data.get("scheme"), BLOCKED)

    @field_validator("symmetric")
    @classmethod
    def _offsets_for_blocks(cls, value: bool, info: ValidationInfo) -> bool:
        return value if value else _int4_only("symmetric", value, info.data.get("scheme"), BLOCKED)

    @field_validator("scale_bits")
    @classmethod
    def _scale_bits_for_int4(cls, value, info: ValidationInfo):
        return value if value in (None, 16) else _int4_only("scale_bits", value, info.data.get("scheme"))

    @model_validator(mode="after")
    def _coded_scales_not_gptq(self):
        _no_gptq_coded_scales(self.algorithm, self.scale_bits)
        return self

    @model_validator(mode="after")
    def _int8_asym_blocks(self):
        """Asymmetric int8 has an offset per block: per output channel it does not exist."""
        if self.scheme == "int8" and not self.symmetric and self.group_size is None:
            raise PydanticCustomError(
                "quantization", "symmetric false with scheme int8 needs a group_size (32, 64 or 128): per output"
                " channel int8 is symmetric only")
        return self


class QuantOverride(_Section):
    """Weights whose module name matches the glob `match` (e.g. `lm_head`,
    `*.mlp.down_proj`) and/or lie in `layers` (negative = from the end) take these
    settings; unset ones are inherited. Later overrides win."""

    match: Annotated[str, Field(min_length=1)] | None = None
    layers: Annotated[list[int], Field(min_length=1)] | None = None
    scheme: QuantScheme | None = None
    algorithm: QuantAlgorithm | None = None
    group_size: GroupSize | None = None
    symmetric: bool | None = None
    scale_bits: ScaleBits | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return _without_unset_scale_bits(handler(self))

    @model_validator(mode="after")
    def _selects_something(self):
        if self.match is None and self.layers is None:
            raise PydanticCustomError("quantization", "an override needs `match` (a glob on module names) or"
                                      " `layers` (layer indices); found neither")
        return self

    @model_validator(mode="after")
    def _coded_scales_not_gptq(self):
        _no_gptq_coded_scales(self.algorithm, self.scale_bits)
        return self

    @field_validator("algorithm", "group_size", "symmetric", "scale_bits")
    @classmethod
    def _int4_settings(cls, value, info: ValidationInfo):
        scheme = info.data.get("scheme")
        if value is None or value == "rtn" or value is True or value == 16 or scheme is None:
            return value
        if info.field_name == "scale_bits":
            return _int4_only("scale_bits", value, scheme)
        # symmetric: false on a module that resolves to int8 per channel stays symmetric
        # (llmbuild.quantize.plan.resolve_plan): its group_size may be inherited
        return _int4_only(info.field_name, value, scheme, ("int4",) if info.field_name == "algorithm" else BLOCKED)


class Calibration(_Section):
    dataset: str = "kjv"  # a bundled corpus (its calibration split) or a .txt / .jsonl file
    samples: PositiveInt = 128  # sequences
    seq_len: PositiveInt = 512  # tokens per sequence
    seed: Annotated[int, Field(ge=0)] = 0
    # What the layer after a calibrated one sees: "quantized" (the quantized layer's
    # outputs, a second ONNX Runtime pass per layer), "float" (the float layer's, as
    # AutoAWQ), "auto" (quantized when any weight uses GPTQ, else float).
    propagate: Literal["auto", "quantized", "float"] = "auto"

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        return _check_dataset(value)


class QuantTarget(_Section):
    """Automatic bit allocation (llmbuild.quantize.allocate): every linear's scheme is
    chosen from its measured sensitivity. Exactly one of the two targets."""

    # Average stored bits per weight of the quantized linears (codes + scales + offsets);
    # the embedding (and an lm_head tied to it) keep the graph dtype, outside the budget.
    bits_per_weight: Annotated[float, Field(gt=0, le=16)] | None = None
    # The cheapest allocation whose perplexity on the evaluation text is at most this much
    # above the unquantized graph's (relative: 0.05 = +5 %).
    max_perplexity_increase: Annotated[float, Field(gt=0)] | None = None
    # Calibration sequences (of calibration.seq_len tokens) the sensitivity pass runs.
    samples: PositiveInt = 8
    # How the int4 linears of the allocation are quantized: round to nearest, or calibrated
    # (awq / gptq, with calibration.* and the awq / gptq options) on their allocated settings.
    algorithm: Literal["rtn", "awq", "gptq"] = "rtn"

    @model_validator(mode="after")
    def _exactly_one(self):
        both = self.bits_per_weight is not None and self.max_perplexity_increase is not None
        if both or (self.bits_per_weight is None and self.max_perplexity_increase is None):
            raise PydanticCustomError(
                "quantization", "a target needs exactly one of bits_per_weight (e.g. 4.5) or"
                " max_perplexity_increase (e.g. 0.05); found {found}",
                {"found": "both" if both else "neither"})
        return self


class AwqOptions(_Section):
    clip: bool = True  # per block and output channel clipping search after the scales (AutoAWQ auto_clip)
    # H = XᵀX (the searches' output-error matrix) from every k-th calibration token; mean |x|
    # and the propagated hidden states use every token, and so does H of an input a GPTQ
    # linear reads, or a routed expert's (few tokens each). Unset: the largest k ≤ 8 that
    # keeps 4096 rows (quantize.calibration.auto_hessian_stride). Measured: benchmarks/quantization/RESULTS.md
    hessian_stride: Annotated[int, Field(ge=1, le=64)] | None = None


class GptqOptions(_Section):
    act_order: bool = True  # rows in decreasing diag(XᵀX), static groups (AutoGPTQ desc_act); measured: NOTES.md
    damp: Annotated[float, Field(gt=0, le=1)] = 0.01  # × mean diag(XᵀX) added to it (AutoGPTQ percdamp)


class Quantization(_Section):
    # One setting for every linear (plus overrides), or a `target` the allocation meets.
    weights: QuantWeights | None = None
    overrides: list[QuantOverride] = []
    calibration: Calibration = Calibration()
    awq: AwqOptions = AwqOptions()  # settings of algorithm awq, wherever it is used
    gptq: GptqOptions = GptqOptions()
    target: QuantTarget | None = None

    @model_validator(mode="after")
    def _weights_or_target(self):
        if self.target is None and self.weights is None:
            raise PydanticCustomError(
                "quantization", "quantization needs `weights` (e.g. {scheme: int4}) or `target` (e.g."
                " {bits_per_weight: 4.5}: schemes chosen per linear); found neither")
        if self.target is not None and self.weights is not None:
            raise PydanticCustomError(
                "quantization", "target chooses every linear's scheme; it conflicts with weights.scheme"
                " {scheme}: remove one of them", {"scheme": self.weights.scheme, "at": ("weights", "scheme")})
        if self.target is not None and self.overrides:
            raise PydanticCustomError(
                "quantization", "target chooses every linear's scheme; overrides cannot be combined with it"
                " (found {n}): remove them", {"n": len(self.overrides), "at": ("overrides",)})
        return self


class Recipe(_Section):
    """A validated, fully resolved recipe (extends and overrides applied).

    Build one with `llmbuild.recipe.load_recipe`. `path` is the recipe file and
    `source_path` the resolved model source; neither is part of `to_dict()`.
    """

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME_LENGTH)]
    model: ModelSpec
    precision: Precision = "float16"
    limits: Limits = Limits()
    engines: list[EngineEntry] = []
    parallel: Parallel = Parallel()
    quantization: Quantization | None = None
    verify: Verify = Verify()
    runtime: Runtime = Runtime()
    # Variants `llmbuild compile` expands into separately named artifacts
    # (llmbuild.recipe.matrix): {override path: [values] or {label: value}}.
    matrix: dict[str, MatrixValues] = {}

    _path: Path | None = PrivateAttr(default=None)
    _source_path: Path | None = PrivateAttr(default=None)
    _variant: dict | None = PrivateAttr(default=None)

    @field_validator("engines", mode="before")
    @classmethod
    def _backend_shorthand(cls, engines: Any) -> Any:
        """`- tensorrt-rtx` stands for `- backend: tensorrt-rtx`."""
        if isinstance(engines, list):
            return [{"backend": e} if isinstance(e, str) else e for e in engines]
        return engines

    @field_validator("engines")
    @classmethod
    def _no_duplicate_engines(cls, engines: list[EngineEntry], info: ValidationInfo) -> list[EngineEntry]:
        from llmbuild.engine.options import precision_target_problem

        precision = info.data.get("precision")
        if precision is not None:  # the graph's precision is the engines' precision
            for i, engine in enumerate(engines):
                found = precision_target_problem(precision, engine.compute_capabilities)
                if found:
                    raise PydanticCustomError("engine_option", found[1], {"at": (i, "compute_capabilities", found[0])})
        for i, engine in enumerate(engines):
            first = next((j for j, other in enumerate(engines[:i]) if (other.backend, other.label)
                          == (engine.backend, engine.label)), None)
            if first is None:
                continue
            if engine == engines[first]:
                name = engine.backend if engine == EngineEntry(backend=engine.backend) else (
                    f"{engine.backend} ({engine.label})")
                message = "engine '{engine}' is listed twice (first at engines[{first}])"
            else:
                name = f"{engine.backend} ({engine.label})"
                message = ("engine '{engine}' is listed twice with different settings (first at "
                           "engines[{first}]); an artifact holds one engine per backend and target")
            raise PydanticCustomError("duplicate_engine", message, {"engine": name, "index": i, "first": first})
        return engines

    @field_validator("matrix")
    @classmethod
    def _matrix_axes(cls, matrix: dict[str, Any]) -> dict[str, Any]:
        from llmbuild.recipe.axes import axis_problem

        for key, values in matrix.items():
            problem = axis_problem(cls, key, values)
            if problem is not None:
                message, at = problem
                raise PydanticCustomError("matrix", message, {"at": (key, *at)})
        return matrix

    @property
    def variant(self) -> dict | None:
        """For a matrix variant: {"of": base recipe name, "values": {key: label}}."""
        return self._variant

    @property
    def path(self) -> Path | None:
        """The recipe file this was loaded from (None if built from a dict)."""
        return self._path

    @property
    def source_path(self) -> Path:
        """The model source (checkpoint dir or .gguf file) as an absolute path."""
        if self._source_path is None:
            from llmbuild.recipe.model_source import resolve_source

            base = self._path.parent if self._path is not None else Path.cwd()
            self._source_path = resolve_source(self.model.source, base)
        return self._source_path

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain JSON-able data, keys in schema order
        (for manifest.json and content hashing)."""
        return self.model_dump(mode="json")
