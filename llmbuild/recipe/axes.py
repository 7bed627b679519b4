"""One axis of a recipe's `matrix:` (llmbuild.recipe.matrix): its key must be an override
path of the schema, its values scalars or a mapping label -> value, and its labels usable
in an artifact name. The schema's validator calls `axis_problem` with itself as `root`."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel

from llmbuild.recipe.paths import override_path_problem
from llmbuild.recipe.problems import describe

LABEL = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_KEY_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NOT_AXES = ("name", "matrix")


def label_of(value: Any) -> str:
    """The label of a scalar matrix value: `float16`, `4096`, `true`."""
    text = json.dumps(value) if isinstance(value, bool) else str(value)
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-")


def axis_labels(values: Any) -> list[tuple[str, Any]]:
    """(label, value) pairs of one matrix axis (assumed valid: see axis_problem)."""
    if isinstance(values, dict):
        return list(values.items())
    return [(label_of(v), v) for v in values]


def axis_problem(root: type[BaseModel], key: str, values: Any) -> tuple[str, tuple] | None:
    """(message, path below matrix.<key>) for an axis of the schema `root` that cannot be
    expanded, or None."""
    if not _KEY_PATH.match(key):
        return f"matrix key {key!r} is not a key path like 'precision' or 'limits.max_seq_len'", ()
    if key.split(".")[0] in _NOT_AXES:
        return f"matrix key {key!r}: a variant's name is the recipe name plus its labels; expected another key", ()
    bad_path = override_path_problem(root, tuple(key.split(".")))
    if bad_path is not None:
        return f"matrix key {key!r}: {bad_path}", ()
    if isinstance(values, list):
        if not values:
            return "expected at least one value, found an empty list", ()
        for i, value in enumerate(values):
            if not isinstance(value, (str, int, float, bool)):
                return (
                    f"expected a scalar value (it becomes the variant's label), found {describe(value)};"
                    " give such values labels with a mapping `label: value`",
                    (i,),
                )
    elif isinstance(values, dict):
        if not values:
            return "expected at least one value, found an empty mapping", ()
    else:
        return f"expected a list of values or a mapping label: value, found {describe(values)}", ()
    labels = [label for label, _ in axis_labels(values)]
    for i, label in enumerate(labels):
        at = (list(values)[i],) if isinstance(values, dict) else (i,)
        if not LABEL.match(label):
            return (f"label {label!r} is not usable in an artifact name: expected lowercase letters, digits,"
                    " '.', '_' or '-'"), at
        if label in labels[:i]:
            return f"label {label!r} appears twice on this axis", at
    return None
