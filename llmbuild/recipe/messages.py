"""Human messages for schema problems: pydantic errors -> `Problem`s that say what was
expected, what was found, where, and the valid choices."""

from __future__ import annotations

import types
import typing
from typing import TYPE_CHECKING, Any, Literal

from llmbuild.recipe.paths import YamlPath, did_you_mean, dotted, section_at, unknown_key
from llmbuild.recipe.problems import Problem, describe
from llmbuild.recipe.schema import Recipe

if TYPE_CHECKING:
    from pydantic import ValidationError

    from llmbuild.recipe.tree import Tree

# Cross-field errors raised by the schema: error loc -> the key they are about.
RELOCATE = {
    "input_longer_than_sequence": lambda path, ctx: path[:-1] + ("max_input_len",),
    "duplicate_engine": lambda path, ctx: path + (ctx["index"],),
    # engine entries (llmbuild.engine.options): the message already says what was found
    "backend_option": lambda path, ctx: path,
    "compute_capability": lambda path, ctx: path + (ctx["index"],),
    "engine_option": lambda path, ctx: path + tuple(ctx.get("at", ())),
    "too_few_tokens": lambda path, ctx: path,
    "matrix": lambda path, ctx: path + tuple(ctx.get("at", ())),
    # llmbuild.quantize settings: message says what was found
    "quantization": lambda path, ctx: path + tuple(ctx.get("at", ())),
}

# List items that may be written as a plain string standing for a one-key mapping:
# `engines: [tensorrt-rtx]` is `engines: [{backend: tensorrt-rtx}]`. A problem with that
# key is reported at the string itself.
SHORTHAND = {("engines",): "backend"}


def choices_at(path: YamlPath) -> tuple[str, ...]:
    """The allowed values of the enum-like (Literal) field at `path`."""
    last = max((i for i, seg in enumerate(path) if isinstance(seg, str)), default=None)
    model = section_at(Recipe, path[:last]) if last is not None else None
    if model is None or path[last] not in model.model_fields:
        return ()
    ann: Any = model.model_fields[path[last]].annotation
    while typing.get_origin(ann) in (list, typing.Union, types.UnionType):
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    return typing.get_args(ann) if typing.get_origin(ann) is Literal else ()


def _is_int_field(path: YamlPath) -> bool:
    model = section_at(Recipe, path[:-1])
    field = model.model_fields.get(path[-1]) if model is not None else None
    if field is None:
        return False
    ann: Any = field.annotation
    while typing.get_origin(ann) in (typing.Union, types.UnionType):
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    if typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    return ann is int


def _message(kind: str, path: YamlPath, value: object, ctx: dict, default: str) -> str:
    found = describe(value)
    if kind == "extra_forbidden":
        return unknown_key(Recipe, str(path[-1]), path[:-1])
    if kind == "missing":
        return f"required key {path[-1]!r} is missing"
    if kind == "literal_error":
        choices = tuple(str(c) for c in choices_at(path)) or (ctx.get("expected", "?"),)
        return f"expected one of {', '.join(choices)}; found {found}{did_you_mean(value, choices)}"
    expected = {
        "int_type": "an integer",
        "float_type": "a number",
        "bool_type": "true or false",
        "string_type": "a string",
        "list_type": "a list",
        "model_type": "a mapping",
        "dict_type": "a mapping",
    }.get(kind)
    if expected:
        return f"expected {expected}, found {found}"
    if kind == "greater_than" and ctx.get("gt") == 0:
        what = "integer" if _is_int_field(path) else "number"
        return f"expected a positive {what}, found {found}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"expected a number {bounds[kind]} {limit}, found {found}"
    if kind == "string_pattern_mismatch" and path == ("name",):
        return (
            "expected a name of lowercase letters, digits, '.', '_' or '-' starting with"
            f" a letter or digit, found {found}"
        )
    if kind == "string_too_long" and path == ("name",):
        return (f"expected a name of at most {ctx.get('max_length')} characters (the artifact directory"
                f" .<name>.partial-<pid> must fit the filesystem's 255-byte limit), found {found}")
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length', 1)} item(s), found {found}"
    if kind in RELOCATE:
        return default
    return f"{default}; found {found}"


def validation_problems(exc: ValidationError, tree: Tree) -> list[Problem]:
    problems = []
    for err in exc.errors():
        path: YamlPath = tuple(err["loc"])
        kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
        if kind in RELOCATE:
            path = RELOCATE[kind](path, ctx)
        message = _message(kind, path, value, ctx, err["msg"])
        path = _shorthand(path, tree)
        if kind == "missing":
            loc = tree.where(path[:-1], key=True)
        else:
            loc = tree.where(path, key=kind == "extra_forbidden")
        problems.append(Problem(dotted(path), message, loc.file, loc.line, loc.column))
    return problems


def _shorthand(path: YamlPath, tree: Tree) -> YamlPath:
    """`engines.1.backend` -> `engines.1` when the recipe wrote that item as a string."""
    for prefix, key in SHORTHAND.items():
        n = len(prefix)
        if len(path) == n + 2 and path[:n] == prefix and isinstance(path[n], int) and path[n + 1] == key:
            items = tree.get(prefix)
            if isinstance(items, list) and path[n] < len(items) and isinstance(items[path[n]], str):
                return path[: n + 1]
    return path
