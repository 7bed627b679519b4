"""Paths into the recipe schema: `("engines", 1)` written `engines[1]`, the schema
section a path names, and why a path names no key. Every function takes the schema's
root model, so this module depends on pydantic only (the schema's own validators use it,
as do the messages and the tree below which they sit)."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel

YamlPath = tuple[str | int, ...]


def dotted(path: YamlPath) -> str:
    """`("engines", 1)` -> `engines[1]`; `("limits", "max_seq_len")` -> `limits.max_seq_len`."""
    out = ""
    for seg in path:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else str(seg))
    return out


def _optional(ann: Any) -> Any:
    """`X | None` -> X (an optional section, e.g. `quantization: Quantization | None`)."""
    while typing.get_origin(ann) in (typing.Union, types.UnionType):
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    return ann


def _list_item_model(ann: Any) -> type[BaseModel] | None:
    """`list[Model]` (or `list[Model] | None`) -> Model."""
    ann = _optional(ann)
    if typing.get_origin(ann) is list:
        (item,) = typing.get_args(ann)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


def section_at(root: type[BaseModel], path: YamlPath) -> type[BaseModel] | None:
    """The model of the mapping at `path` below `root` (the recipe schema), or None if
    `path` is not a section.

    An integer segment steps into an item of a list of mappings (`("engines", 0)`); a
    list itself is not a section, so override paths (no integers) never enter one.
    """
    model: type[BaseModel] | None = root
    item: type[BaseModel] | None = None  # item model of the list field just passed
    for seg in path:
        if isinstance(seg, int):
            if item is None:
                return None
            model, item = item, None
            continue
        field = model.model_fields.get(seg) if model is not None else None
        if field is None:
            return None
        ann = _optional(field.annotation)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
            continue
        item = _list_item_model(ann)
        if item is None:
            return None
        model = None
    return model


def did_you_mean(found: object, choices: typing.Iterable[str]) -> str:
    if not isinstance(found, str):
        return ""
    close = difflib.get_close_matches(found, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key(root: type[BaseModel], key: str, section: YamlPath) -> str:
    """`unknown key 'limts'; did you mean 'limits'? (valid keys: ...)`."""
    model = section_at(root, section)
    valid = list(model.model_fields) if model is not None else []
    where = f" under {dotted(section)!r}" if section else ""
    hint = did_you_mean(key, valid)
    return f"unknown key {key!r}{where}{hint} (valid keys: {', '.join(valid)})"


def override_path_problem(root: type[BaseModel], path: tuple[str, ...]) -> str | None:
    """Why `path` (from `a.b=value` / `~a.b`, or a matrix key) names no key of the schema
    `root`, or None."""
    for i, key in enumerate(path):
        model = section_at(root, path[:i])
        if model is None:
            return f"{dotted(path[:i])!r} is not a mapping, so it has no key {key!r}"
        if key not in model.model_fields:
            return unknown_key(root, key, path[:i])
    return None
