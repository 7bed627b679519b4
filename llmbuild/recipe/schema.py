"""The typed recipe schema (pydantic v2).

Strict: values are not coerced (`"512"` is not an integer, `1` is not `true`), and
unknown keys are errors at every level. Cross-field rules raise `PydanticCustomError`s
whose `type` is listed in `messages.RELOCATE` so the problem points at the right key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator
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


class Limits(_Section):
    max_batch_size: PositiveInt = 4
    max_input_len: PositiveInt = 512
    max_seq_len: PositiveInt = 2048

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


class Verify(_Section):
    # null = the per-precision default of the verify stage.
    max_abs_logit_diff: Annotated[float, Field(gt=0)] | None = None
    min_top1_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    min_greedy_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    prompts: Annotated[list[str], Field(min_length=1)] | None = None
    enabled: bool = True


class Recipe(_Section):
    """A validated, fully resolved recipe (extends and overrides applied).

    Build one with `llmbuild.recipe.load_recipe`. `path` is the recipe file and
    `source_path` the resolved model source; neither is part of `to_dict()`.
    """

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    model: ModelSpec
    precision: Precision = "float16"
    limits: Limits = Limits()
    engines: list[EngineBackend] = []
    verify: Verify = Verify()

    _path: Path | None = PrivateAttr(default=None)
    _source_path: Path | None = PrivateAttr(default=None)

    @field_validator("engines")
    @classmethod
    def _no_duplicate_engines(cls, engines: list[str]) -> list[str]:
        for i, engine in enumerate(engines):
            if engine in engines[:i]:
                raise PydanticCustomError(
                    "duplicate_engine",
                    "engine '{engine}' is listed twice (first at engines[{first}])",
                    {"engine": engine, "index": i, "first": engines.index(engine)},
                )
        return engines

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
